"""The loss a micro-batch trains on: the sum of its tokens' cross-entropies, from full logits or chunk by chunk.

The full-logits loss runs the model's LM head over every position and upcasts the logits to fp32: at
4 × 4096 tokens and a 128k vocabulary that alone is 8.6 GB, more than a checkpointed model's activations.
The chunked loss computes the head and the cross-entropy over a chunk of trained positions at a time and
never holds more than one chunk's logits. It computes the gradients of the hidden states and of the head's
weight during the forward pass (one logits matmul instead of two) and only scales them in backward, so any
factor applied to the loss afterwards (the trainer's `loss × replicas / targets`, fp16 loss scaling) reaches
both gradients. DeepSpeed's TiledFusedLogitsLoss backpropagates the weight gradient inside its forward with
a scale of 1 and so ignores that factor for the head's weight; that is why this module exists.

The chunk loop runs inside the LM head module's own forward, through the engine: at ZeRO-3 DeepSpeed's
module hooks gather the head's weight once for the whole loop and release it afterwards. The module tree,
parameter names and state-dict keys stay as they are, so checkpoints and exports do not change.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F

from launcher.contract.errors import UserError
from launcher.planning.chunked_loss import chunked_loss_blocker, loss_chunk_tokens
from trainer.data.collate import IGNORE, Batch
from trainer.model import token_loss_sum

LossFn = Callable[[Any, Batch], torch.Tensor]
"""(engine, batch) -> the batch's summed token loss (fp32 scalar, part of the autograd graph)."""


class ChunkedLMHeadCE(torch.autograd.Function):
    """Σ_t CE(h_t · Wᵀ, y_t) over the positions with y_t ≠ -100, a chunk of them at a time.

    Per chunk: logits in the weight's dtype upcast to fp32 (as the full-logits loss computes them), their
    log-sum-exp and loss, all in one chunk-sized buffer; when gradients are needed, it turns into softmax −
    one-hot in place and gives
    dh = dlogits · W and dW += dlogitsᵀ · h (accumulated in fp32). Backward multiplies both by the incoming
    gradient, in place.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        h = hidden.reshape(-1, hidden.shape[-1])
        y = targets.reshape(-1)
        # A custom Function's forward runs with grad disabled: what to compute comes from needs_input_grad.
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        dh = torch.zeros_like(h) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        trained = torch.nonzero(y != IGNORE).squeeze(1)  # chunks of trained positions: padding costs nothing
        for start in range(0, trained.numel(), chunk):
            rows = trained[start:start + chunk]
            hc, yc = h.index_select(0, rows), y.index_select(0, rows)
            logits = (hc @ weight.t()).float()
            target = logits.gather(1, yc[:, None]).squeeze(1)
            # log-sum-exp in place (torch.logsumexp would allocate two more chunk-sized temporaries)
            peak = logits.amax(dim=-1)
            sums = logits.sub_(peak[:, None]).exp_().sum(dim=-1)
            total += (peak + sums.log() - target).sum()
            if need_dh or need_dw:
                logits.div_(sums[:, None])  # softmax
                logits[torch.arange(rows.numel(), device=rows.device), yc] -= 1.0
                grad = logits.to(weight.dtype)
                if dh is not None:
                    dh.index_copy_(0, rows, grad @ weight)
                if dw is not None:
                    if grad.dtype == torch.float32:
                        dw.addmm_(grad.t(), hc)
                    else:
                        dw.add_(grad.t() @ hc)
            del logits
        # Kept as attributes, not saved tensors: backward scales them in place and hands them over.
        ctx.dh = dh.view(hidden.shape) if dh is not None else None
        ctx.dw = dw
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        dh, dw = ctx.dh, ctx.dw
        ctx.dh = ctx.dw = None
        if dh is not None:
            dh = dh.mul_(grad_out.to(dh.dtype))
        if dw is not None:
            dw = dw.mul_(grad_out.float()).to(ctx.weight_dtype)
        return dh, dw, None, None


@torch.compiler.disable
def chunked_token_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           chunk_tokens: int) -> torch.Tensor:
    """Σ of fp32 token cross-entropies of `hidden · weightᵀ` against `targets` (already shifted), chunk by chunk.

    Never traced by torch.compile: which positions are trained is data (chat rows train a different number
    each batch), so dynamo broke the graph at the `nonzero` and compiled the rest of the loop once per count
    until its recompile limit (8 per rank). The loop is a few matmuls per chunk with nothing to fuse; the
    decoder before it stays compiled.
    """
    return ChunkedLMHeadCE.apply(hidden, weight, targets, chunk_tokens)


def head_problem(model) -> Optional[str]:
    """Why this model's loss cannot be chunked from its structure (None: a decoder and a plain linear head)."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        biased = " with a bias" if getattr(head, "bias", None) is not None else ""
        return f"its output head is {type(head).__name__}{biased}, not a bias-free linear layer"
    try:
        model.get_decoder()
    except (AttributeError, NotImplementedError):
        return f"{type(model).__name__} has no decoder to take the hidden states from"
    return None


def install_chunked_loss(model, chunk_tokens: int) -> None:
    """Make `model(input_ids, position_ids, attention_mask, targets=...)` return the chunked loss sum.

    Only the two instance `forward`s change: the model's (decoder, then the head with the targets) and the
    head's (the chunk loop when given targets, a plain linear layer otherwise). Without targets the model
    runs its own class forward and returns logits as before.
    """
    head, decoder, full_forward = model.get_output_embeddings(), model.get_decoder(), model.forward

    def head_forward(hidden: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        if targets is None:
            return F.linear(hidden, head.weight)
        return chunked_token_loss_sum(hidden, head.weight, targets, chunk_tokens)

    def forward(input_ids=None, position_ids=None, attention_mask=None, targets=None, **kwargs):
        if targets is None:
            return full_forward(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                **kwargs)
        hidden = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                         **{**kwargs, "use_cache": False}).last_hidden_state
        return head(hidden, targets=targets)  # through Module.__call__, so ZeRO-3's hooks gather the weight

    head.forward = head_forward
    model.forward = forward


def full_logits_loss(engine, batch: Batch) -> torch.Tensor:
    """The model's own forward to logits, then the fp32 cross-entropy over them."""
    return token_loss_sum(engine(**batch.model_inputs()).logits, batch.targets)


def chunked_loss(engine, batch: Batch) -> torch.Tensor:
    """The model (with install_chunked_loss) returns the loss sum itself."""
    return engine(**batch.model_inputs(), targets=batch.targets)


def prepare_loss(model, setting, message: Callable[[str], None]) -> LossFn:
    """Decide train.chunked_loss on the loaded model, install it when on, and return the loss the loop calls.

    `auto` is on when the model's config and structure allow an exact chunked loss; `true` insists (and fails,
    naming the field, where it cannot be exact); `false` keeps the full logits.
    """
    if setting is False:
        return full_logits_loss
    structural = head_problem(model)
    blocker = structural or chunked_loss_blocker(model.config.to_dict())
    if setting is True and structural:
        raise UserError(f"train.chunked_loss: true is not possible for this model: {structural}; set it to false "
                        "(or auto)")
    if setting == "auto" and blocker:
        message(f"train.chunked_loss=auto -> false: {blocker}")
        return full_logits_loss
    install_chunked_loss(model, loss_chunk_tokens(model.config.get_text_config().vocab_size))
    return chunked_loss
