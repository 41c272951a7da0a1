"""The chunked LM-head loss and the tiled MLP in one process, against torch's own full computations.

The multi-rank runs (ZeRO-2/3, sequence parallelism) are in tests/test_sequence_parallel.py; these check the
autograd pieces directly, with a loss scale applied after the loss as the trainer does.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.loss import chunked_token_loss_sum, prepare_loss
from trainer.model import token_loss_sum


def problem(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 300, 64, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(1000, 64, generator=g) * 0.1).to(dtype).requires_grad_()
    targets = torch.randint(0, 1000, (2, 300), generator=g)
    targets[torch.rand(2, 300, generator=g) < 0.15] = -100  # prompt tokens
    targets[1, 250:] = -100  # a padded tail
    return hidden, weight, targets


def reference(hidden, weight, targets, scale):
    """The full-logits loss the trainer used before: logits in the weight's dtype, cross-entropy in fp32."""
    loss = F.cross_entropy((hidden @ weight.t()).float().reshape(-1, weight.shape[0]), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    dh, dw = torch.autograd.grad(loss * scale, (hidden, weight))
    return loss.detach(), dh, dw


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("chunk", [1, 64, 4096])
def test_chunked_loss_and_gradients_equal_the_full_logits(chunk):
    hidden, weight, targets = problem()
    scale = 2.0 / 517  # the trainer's replicas / global targets, applied after the loss
    want_loss, want_dh, want_dw = reference(hidden, weight, targets, scale)
    loss = chunked_token_loss_sum(hidden, weight, targets, chunk)
    dh, dw = torch.autograd.grad(loss * scale, (hidden, weight))
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    assert rel(dh, want_dh) < 1e-6 and rel(dw, want_dw) < 1e-6
    assert dh[1, 250:].abs().max() == 0, "positions without a target get no gradient"


def test_chunked_loss_in_bf16_matches_the_full_logits_to_bf16_precision():
    hidden, weight, targets = problem(torch.bfloat16)
    want_loss, want_dh, want_dw = reference(hidden, weight, targets, 0.01)
    loss = chunked_token_loss_sum(hidden, weight, targets, 128)
    dh, dw = torch.autograd.grad(loss * 0.01, (hidden, weight))
    assert loss.dtype == torch.float32 and dh.dtype == dw.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
    assert rel(dh, want_dh) < 1e-2 and rel(dw, want_dw) < 1e-2


def test_a_micro_batch_without_trained_tokens_still_backpropagates_zeros():
    """Under sequence parallelism a rank's slice may hold only prompt tokens: every parameter still gets a
    (zero) gradient, so every rank runs the same reductions."""
    hidden, weight, targets = problem()
    loss = chunked_token_loss_sum(hidden, weight, torch.full_like(targets, -100), 64)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    assert loss.item() == 0 and dh.abs().max() == 0 and dw.abs().max() == 0


def next_token_batch(vocab: int, length: int, prompt: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two random rows, their position ids and next-token targets; the first row's first `prompt` carry no loss."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (2, length), generator=g)
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = -100
    targets[0, :prompt] = -100
    return ids, torch.arange(length).repeat(2, 1), targets


def test_installed_on_a_model_it_gives_the_model_forward_loss_and_gradients(tiny_model):
    from transformers import AutoModelForCausalLM

    def load():
        return AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.float32)

    plain, chunked = load(), load()
    messages = []
    loss_fn = prepare_loss(chunked, "auto", messages.append)
    assert loss_fn.__name__ == "chunked_loss" and not messages
    ids, positions, targets = next_token_batch(vocab=500, length=40, prompt=10)
    want = token_loss_sum(plain(input_ids=ids, position_ids=positions, use_cache=False).logits, targets)
    got = chunked(input_ids=ids, position_ids=positions, targets=targets)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    want.backward()
    got.backward()
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters()):
        assert rel(q.grad, p.grad) < 1e-5, name
    # Without targets the model is the model: logits, for generation or anything else.
    with torch.no_grad():
        assert torch.equal(chunked(input_ids=ids, use_cache=False).logits, plain(input_ids=ids, use_cache=False).logits)


def test_models_whose_logits_are_not_a_plain_head_keep_the_full_loss(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.config.final_logit_softcapping = 30.0
    messages = []
    assert prepare_loss(model, "auto", messages.append).__name__ == "full_logits_loss"
    assert "final_logit_softcapping=30.0" in messages[0]
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
    from launcher.contract.errors import UserError

    with pytest.raises(UserError, match="train.chunked_loss: true is not possible for this model: .* with a bias"):
        prepare_loss(model, True, messages.append)


def test_tiled_mlp_equals_the_whole_mlp(tiny_model):
    """DeepSpeed's TiledMLP as installed: same output and gradients, also when the length is not a multiple of
    the tile count (the input is padded), and every tile of the input recomputed in backward."""
    from transformers import AutoModelForCausalLM

    from trainer.activation_memory import tile_mlps

    def load():
        return AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.float32)

    whole, tiled = load(), load()
    assert tile_mlps(tiled, 3) == tiled.config.num_hidden_layers
    calls = []
    down = tiled.model.layers[0].mlp.down_proj
    down.register_forward_hook(lambda m, i, o: calls.append(i[0].numel() // i[0].shape[-1]))
    ids = torch.randint(0, 500, (2, 37), generator=torch.Generator().manual_seed(5))
    a = whole(input_ids=ids, use_cache=False).logits
    b = tiled(input_ids=ids, use_cache=False).logits
    assert (a - b).abs().max() < 1e-5
    a.float().pow(2).mean().backward()
    b.float().pow(2).mean().backward()
    for (name, p), q in zip(whole.named_parameters(), tiled.parameters()):
        assert rel(q.grad, p.grad) < 1e-5, name
    # 2 rows of 37 positions padded to 39: three tiles of 2 × 13 positions in forward, recomputed in backward.
    assert calls == [26] * 6, calls


def test_a_compiled_model_does_not_recompile_when_the_number_of_trained_positions_changes(tiny_model):
    """Chat rows train a different number of positions every batch while the batch shape stays one (a compiled
    model's micro-batches are padded to data.seq_len). Tracing the chunk loop recompiled it once per count until
    dynamo's recompile limit; nothing may be recompiled after the first batch. Dynamo's own recompile guard is the
    judge, with its eager backend (what recompiles is decided by dynamo, not by the code generator)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.float32)
    prepare_loss(model, "auto", lambda message: None)
    model.compile(backend="eager")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (2, 64), generator=g)
    positions = torch.arange(64).repeat(2, 1)

    def loss_with_prompt(prompt: int) -> torch.Tensor:
        targets = torch.roll(ids, -1, dims=1)
        targets[:, -1] = -100
        targets[:, :prompt] = -100
        return model(input_ids=ids, position_ids=positions, targets=targets)

    torch._dynamo.reset()
    loss_with_prompt(10).backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for prompt in (3, 20, 41):
            loss_with_prompt(prompt).backward()
