"""Attention with sinks (gpt-oss) on sdpa: exact, with no score matrix and no mask over the sequence.

transformers runs gpt-oss's attention only eagerly, because sdpa has no argument for a sink: a learned logit per
head that joins every query's softmax and carries no value. Eager attention keeps the softmax of the scores and
its copy for every head, (4 + e)·b·a·s² bytes per layer (launcher/planning/memory.py): 6 GiB at 4,096 tokens in
bf16 with gpt-oss-20b's 64 heads, and 16 times that at 16k. That, not the weights, bounds the sequence a gpt-oss
fine-tune can train on.

A sink is a key that every query sees, with a value of zero and a score equal to the head's sink whatever the
query. sdpa can compute that exactly if the query carries the score: every query gets one more dimension holding
sink / scale, every real key a 0 there, and the sink key a 1 there and 0 elsewhere. The dot products with the
real keys are unchanged, the sink key's is sink / scale, and sdpa's scale makes it the sink. The only rounding
added is sink / scale's in the compute dtype (none when the scale is a power of two: head_dim 64 gives 1/8).

The sink key goes first, and each sample's queries get one leading row that sees only the sink and is dropped,
so sdpa's own causal rule (query i sees keys 0..i) gives every real query the sink and its own past: no mask.
Packed samples run one call each, found in the position ids as in packed_causal_attention. A sliding-window layer
over a sample longer than its window runs its queries in blocks of SINK_WINDOW_BLOCKS windows, each against the keys
from one window before the block, with a block × keys mask: O(s · window) instead of s². The head dimension is
padded to a multiple of 8 (GPU kernels' alignment; the padding is zeros and changes no dot product).

Kept for backward, per layer: the padded q, k, v and output of every call, and on sliding layers the block masks
and k and v repeated to every query head (launcher/planning/memory.py, `sink_attention_bytes`). Verified against
transformers' eager attention for gpt-oss (tests/test_sink_attention.py): logits and every gradient, the sinks'
included, packed or not; and under sequence parallelism, where DeepSpeed's Ulysses wrapper hands each rank the
whole rows for its slice of the heads and no mask, so the kernel takes those heads' sinks and applies the windows
itself (SP=2 trains as 2 data-parallel ranks do).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from launcher.planning.memory import SINK_WINDOW_BLOCKS, sink_head_width
from trainer.separation import SINK_ATTENTION, sample_spans


def register_sink_attention() -> None:
    """Make SINK_ATTENTION a name transformers can load a model with, with no masks built for it (once per
    process; again is harmless)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SINK_ATTENTION, sink_attention)
    AttentionMaskInterface.register(SINK_ATTENTION, _no_mask)


def _no_mask(*args, **kwargs) -> None:
    """sink_attention reads the samples from the position ids: transformers' s × s masks would only cost memory."""
    return None


@torch.compiler.disable
def sink_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                   position_ids: Optional[torch.Tensor] = None, s_aux: Optional[torch.Tensor] = None,
                   sliding_window: Optional[int] = None, **kwargs) -> tuple[torch.Tensor, None]:
    """gpt-oss's attention (softmax over the scores and the head's sink, the sink dropped), as a transformers
    attention function: q is (batch, heads, length, head_dim), k and v (batch, kv heads, length, head_dim); the
    output is (batch, length, heads, head_dim). Causal inside each sample the position ids mark, and within
    `sliding_window` tokens where the layer has one. Not compiled, as packed_causal_attention."""
    if position_ids is None:
        raise ValueError(f"{SINK_ATTENTION} needs position_ids: they mark where the packed samples begin")
    if s_aux is None:
        raise ValueError(f"{SINK_ATTENTION} is attention with sinks, and this layer passed none")
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"{SINK_ATTENTION} trains on whole sequences; it cannot attend to a cache")
    b, heads, _, d = query.shape
    if position_ids.shape[0] != b:  # transformers' default ids, one row for the whole batch
        position_ids = position_ids.expand(b, -1)
    scaling = d ** -0.5 if scaling is None else scaling
    sink_score = (_own_heads(s_aux, heads).float() / scaling).to(query.dtype).view(1, heads, 1, 1)
    width = sink_head_width(d)
    dropout = dropout if module.training else 0.0
    gqa = heads != key.shape[1]
    out = query.new_empty(b, heads, query.shape[2], d)
    for row, spans in enumerate(sample_spans(position_ids)):
        for start, end in spans:
            q, k, v = (t[row:row + 1, :, start:end] for t in (query, key, value))
            q = torch.cat([q, sink_score.expand(1, heads, end - start, 1)], -1)
            if sliding_window and end - start > sliding_window:
                out[row:row + 1, :, start:end] = _windowed(q, k, v, width, sliding_window, dropout, scaling)
                continue
            # One leading query that sees only the sink (dropped), then sdpa's causal rule needs no mask.
            att = F.scaled_dot_product_attention(F.pad(q, (0, width - d - 1, 1, 0)), _with_sink(k, width),
                                                 F.pad(v, (0, width - d, 1, 0)), dropout_p=dropout, is_causal=True,
                                                 scale=scaling, enable_gqa=gqa)
            out[row:row + 1, :, start:end] = att[..., 1:, :d]
    return out.transpose(1, 2).contiguous(), None


def _own_heads(sinks: torch.Tensor, heads: int) -> torch.Tensor:
    """The sinks of the heads this call attends with: all of them, or under sequence parallelism this rank's
    slice, which DeepSpeed's Ulysses all-to-all deals out in rank order (heads/N consecutive heads each)."""
    if sinks.numel() == heads:
        return sinks
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    if sinks.numel() != heads * parallel_state_sp.get_sequence_parallel_world_size():
        raise ValueError(f"{SINK_ATTENTION} got {sinks.numel()} sinks for {heads} heads")
    first = parallel_state_sp.get_sequence_parallel_rank() * heads
    return sinks[first:first + heads]


def _with_sink(k: torch.Tensor, width: int) -> torch.Tensor:
    """The keys padded to `width`, after the sink key: 1 in the dimension where the queries hold their sink score."""
    d = k.shape[-1]
    padded = F.pad(k, (0, width - d, 1, 0))
    padded[..., 0, d] = 1
    return padded


def _windowed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, width: int, window: int, dropout: float,
              scaling: float) -> torch.Tensor:
    """One sample's sliding-window attention with sinks (q already carries its sink scores): query i sees the
    sink and keys j with i - window < j <= i (transformers' sliding_window_overlay), in blocks of queries.

    k and v are repeated to every query head first: the GPU kernels that take a mask (memory-efficient attention)
    do not take grouped heads, and sdpa would otherwise fall back to its math kernel, which keeps every block's
    scores for every head."""
    n, d = q.shape[2], v.shape[-1]
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    block = SINK_WINDOW_BLOCKS * window
    out = []
    for first in range(0, n, block):
        last = min(n, first + block)
        keys_from = max(0, first - window + 1)
        i = torch.arange(first, last, device=q.device)[:, None]
        j = torch.arange(keys_from, last, device=q.device)[None, :]
        keep = F.pad((j <= i) & (j > i - window), (1, 0), value=True)  # the sink column: always seen
        out.append(F.scaled_dot_product_attention(
            F.pad(q[:, :, first:last], (0, width - d - 1)), _with_sink(k[:, :, keys_from:last], width),
            F.pad(v[:, :, keys_from:last], (0, width - d, 1, 0)), attn_mask=keep[None, None], dropout_p=dropout,
            scale=scaling)[..., :d])
    return torch.cat(out, 2)
