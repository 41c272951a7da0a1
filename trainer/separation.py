"""How the samples packed into one row are kept apart, in the form the model's attention reads.

collate restarts the position ids at every sample. What turns that into attention that stays inside each
sample depends on the kernel (collate's `separation`):

- "varlen" (flash-attention): the variable-length arguments, built by collate.
- "none" with `packed_causal_attention` (sdpa on rows of PER_SAMPLE_FROM tokens or more of a model whose every
  layer is causal over the whole row, and sequence parallelism): one causal sdpa call per sample, found in the
  position ids. Exact, its work is the samples' and not the row's, and no mask exists. A row × row mask grows
  with the square of the row: sdpa turns a bool mask into one of the compute dtype and keeps it for backward in
  every layer (measured on CPU), 2 GiB per layer for one 32k-token bf16 row.
- "positions" (sdpa or eager otherwise, on the models transformers implements: shorter rows, sliding windows,
  eager-only attention such as gpt-oss's sinks and Gemma 2's soft-capping): nothing but the position ids.
  transformers' own mask builders find the samples in them and build each layer's mask by that layer's rule
  (causal, or causal within a sliding window) and in the form its kernel reads (bool for sdpa, an additive
  float mask for eager). A 4D mask handed in from outside is used as it is, and a block-diagonal bool one is
  wrong twice over: it ignores sliding windows, and eager attention adds it to the scores (True is +1), so
  nothing is masked at all, not even the future.
  Some models (gpt-oss in transformers 5.23) do not pass the position ids to their builders. For every
  model whose config lists `layer_types`, `install_mask_builder` therefore builds the per-layer-type masks
  itself, with the same builders, and hands them in as the mapping those models accept.
- "mask" (remote code): its mask handling is unknown; it gets the block-diagonal bool mask sdpa reads, as
  before.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from launcher.planning.model_size import attention_window, outgrown_window
from trainer.data.collate import Separation

PACKED_ATTENTION = "shardtune_packed_sdpa"
"""The attn_implementation name of packed_causal_attention (DeepSpeed's SP wraps it; plain sdpa stays untouched)."""
PER_SAMPLE_FROM = 1024
"""data.seq_len from which packed rows on sdpa run one call per sample. bench.packed_attention (one 8-sample row,
forward and backward, CPU) measured the batched masked call 10% faster at 256 tokens, the two level at 512, and
one call per sample 11% faster at 1,024, 3.0 x at 8,192 and 5.1 x at 16,384, with half the peak RSS there."""
BUILDERS = {"full_attention": "create_causal_mask", "sliding_attention": "create_sliding_window_causal_mask"}
"""Layer types whose masks install_mask_builder builds, and transformers' builder for each (masking_utils)."""


def attention_kernel(attention: str, model_config: dict, seq_len: int, packing: bool, native: bool) -> str:
    """The attn_implementation a run whose rows hold several samples (`packing`) loads with: packed_causal_attention
    instead of sdpa for rows of PER_SAMPLE_FROM tokens or more, when every layer attends causally to its whole sample
    (no window a sample could outgrow); else `attention` unchanged. Rows of one sample each keep sdpa's single
    batched call, and so do shorter rows, where transformers' mask is small and one call is as fast."""
    types = set(model_config.get("layer_types") or ["full_attention"])
    causal = types <= set(BUILDERS) and outgrown_window(attention_window(model_config), seq_len) is None
    per_sample = attention == "sdpa" and packing and native and causal and seq_len >= PER_SAMPLE_FROM
    return PACKED_ATTENTION if per_sample else attention


def separation_for(attention: str, sequence_parallel: int, native: bool) -> Separation:
    """The separation a run's batches carry, from the attention kernel the model runs (see the module docstring)."""
    if sequence_parallel > 1 or attention == PACKED_ATTENTION:
        return "none"
    if attention == "flash_attention_2":
        return "varlen"
    return "positions" if native else "mask"


def describe(attention: str, separation: Separation) -> str:
    """One line for the run log: the attention kernel, and how packed samples stay apart on it."""
    per_sample = "flash-attention, from the position ids" if attention.startswith("flash") else (
        "one causal sdpa call per packed sample")
    how = {"none": per_sample, "varlen": "flash-attention's variable-length arguments",
           "positions": "transformers' masks, built from the position ids",
           "mask": "a block-diagonal mask (remote code: its own mask handling is unknown)"}[separation]
    return f"attention: {attention}; packed samples are kept apart by {how}"


def register_packed_attention() -> None:
    """Make PACKED_ATTENTION a name transformers can load a model with (once per process; again is harmless)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_causal_attention)


_spans_cache: dict[str, Any] = {"positions": None, "version": None, "copy": None, "spans": None}


def sample_spans(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """(start, end) of every sample in every row: a sample starts wherever the position does not go up by one.

    Every layer sees the same positions, so the spans of the last call are reused: without a host sync when it
    is the very tensor of the last call (the cache holds it, so its id cannot be reused) and unchanged since,
    else when its content equals a copy of the last (sequence parallelism gathers a new tensor in every layer):
    one sync per layer there.
    """
    version = None if position_ids.is_inference() else position_ids._version  # inference tensors have none
    if _spans_cache["positions"] is position_ids and version is not None and _spans_cache["version"] == version:
        return _spans_cache["spans"]
    copy = _spans_cache["copy"]
    if copy is not None and copy.shape == position_ids.shape and torch.equal(copy, position_ids):
        _spans_cache.update(positions=position_ids, version=version)
        return _spans_cache["spans"]
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    width = position_ids.shape[1]
    spans = []
    for row in starts.cpu().tolist():
        bounds = [i for i, new in enumerate(row) if new] + [width]
        spans.append(list(zip(bounds[:-1], bounds[1:])))
    _spans_cache.update(positions=position_ids, version=version, copy=position_ids.clone(), spans=spans)
    return spans


@torch.compiler.disable
def packed_causal_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                            scaling: Optional[float] = None, position_ids: Optional[torch.Tensor] = None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention inside each packed sample, one sdpa call per sample (a transformers attention function).

    q, k, v are (batch, heads, length, head_dim); the output is (batch, length, heads, v_head_dim) like
    transformers' sdpa. Exact: each call is the attention of that sample alone. Not compiled: the samples
    differ from batch to batch, and a compiled loop over them would recompile for every batch.
    """
    if position_ids is None:
        raise ValueError(f"{PACKED_ATTENTION} needs position_ids: they mark where the packed samples begin")
    spans = sample_spans(position_ids)
    window = kwargs.get("sliding_window")
    if window and max(end - start for row in spans for start, end in row) > window:
        raise ValueError(f"{PACKED_ATTENTION} attends to whole samples, but this layer's window is {window} tokens")
    gqa = query.shape[1] != key.shape[1]
    dropout = dropout if module.training else 0.0
    out = query.new_empty(*query.shape[:-1], value.shape[-1])
    for row, row_spans in enumerate(spans):
        for start, end in row_spans:
            out[row:row + 1, :, start:end] = F.scaled_dot_product_attention(
                query[row:row + 1, :, start:end], key[row:row + 1, :, start:end], value[row:row + 1, :, start:end],
                dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def _layer_types(config) -> Optional[set[str]]:
    types = getattr(config, "layer_types", None)
    return set(types) if types and set(types) <= set(BUILDERS) else None


def install_mask_builder(model) -> bool:
    """Build the masks of a `layer_types` model from the position ids before its decoder runs (see the module
    docstring); True when installed. Other models build them from the position ids themselves."""
    from transformers import masking_utils

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    types = _layer_types(getattr(decoder, "config", None))
    if decoder is None or types is None:
        return False
    builders = {kind: getattr(masking_utils, BUILDERS[kind]) for kind in types}

    def build_masks(module, args, kwargs):
        positions = kwargs.get("position_ids")
        if args or kwargs.get("attention_mask") is not None or positions is None:
            return None
        dtype = (kwargs["inputs_embeds"].dtype if kwargs.get("inputs_embeds") is not None
                 else module.get_input_embeddings().weight.dtype)
        shape = positions.shape  # the builders read only the embeddings' batch, length, dtype and device
        probe = torch.empty(*shape, 0, dtype=dtype, device=positions.device)
        # config, embeddings, 2D mask, cache: positional, as the cache argument's name differs between versions
        kwargs["attention_mask"] = {kind: build(module.config, probe, None, None, position_ids=positions)
                                    for kind, build in builders.items()}
        return args, kwargs

    decoder.register_forward_pre_hook(build_masks, with_kwargs=True)
    return True
