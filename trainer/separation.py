"""How the samples packed into one row are kept apart, in the form the model's attention reads.

collate restarts the position ids at every sample. What turns that into attention that stays inside each
sample depends on the kernel (collate's `separation`):

- "varlen" (flash-attention): the variable-length arguments, built by collate.
- "none" with `packed_causal_attention` (sdpa on rows of PER_SAMPLE_FROM tokens or more of a model whose every
  layer is causal over the whole row, and sequence parallelism): one causal sdpa call per sample, found in the
  position ids. Exact, its work is the samples' and not the row's, and no mask exists. A row × row mask grows
  with the square of the row: sdpa turns a bool mask into one of the compute dtype and keeps it for backward in
  every layer (measured on CPU), 2 GiB per layer for one 32k-token bf16 row.
- "none" with `sink_attention` (gpt-oss, trainer/sink_attention.py): one sdpa call per sample as well, its
  sinks carried as a key, at any row length and window.
- "positions" (sdpa or eager otherwise, on the models transformers implements: shorter rows, sliding windows,
  eager-only attention such as Gemma 2's soft-capping, or gpt-oss's sinks when eager is asked for): nothing but
  the position ids.
  transformers' own mask builders find the samples in them and build each layer's mask by that layer's rule
  (causal, or causal within a sliding window) and in the form its kernel reads (bool for sdpa, an additive
  float mask for eager). A 4D mask handed in from outside is used as it is, and a block-diagonal bool one is
  wrong twice over: it ignores sliding windows, and eager attention adds it to the scores (True is +1), so
  nothing is masked at all, not even the future.
  Some models (gpt-oss in transformers 5.23) do not pass the position ids to their builders. For every
  model whose config lists `layer_types`, `install_mask_builder` therefore builds the per-layer-type masks
  itself, with the same builders, and hands them in as the mapping those models accept.
- remote code: its mask handling is unknown, so the form is measured (below). The first of FORMS that passes
  is kept: the position ids alone (code built on transformers' mask builders), the block-diagonal bool mask
  ("mask": code that reads it as keep / drop, as sdpa and transformers 4's converters do), or the same mask
  as 0 / the dtype's minimum (`install_additive_mask`: code that adds a mask to its scores). No one form fits
  all: the bool mask masks nothing for transformers-5-style code on eager attention, and the position ids alone
  separate nothing for code that builds its masks from the attention mask.

Every packed run measures its separation before the first step (`verify_form`): a row of two packed samples
must give each sample the logits it gets alone. A model transformers implements must pass in the form above;
some do not whatever the mask, because layers that are not attention carry their state along the row (in
transformers 5.25: Qwen3-Next's linear attention, LFM2's convolutions, the Mamba layers of Falcon-H1, Jamba,
Bamba and Granite 4 hybrids). When no form passes, the run stops before training, naming data.packing.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from launcher.planning.model_size import attention_window, outgrown_window
from trainer.data.collate import Separation, collate
from trainer.data.packing import build_packed

PACKED_ATTENTION = "shardtune_packed_sdpa"
"""The attn_implementation name of packed_causal_attention (DeepSpeed's SP wraps it; plain sdpa stays untouched)."""
SINK_ATTENTION = "shardtune_sink_attention"
"""The attn_implementation name of trainer/sink_attention.py (attention sinks on sdpa, one call per sample). Not
"..._sdpa": transformers checks a name holding "sdpa" against the class's own sdpa support, which gpt-oss lacks."""
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
    if sequence_parallel > 1 or attention in (PACKED_ATTENTION, SINK_ATTENTION):
        return "none"
    if attention == "flash_attention_2":
        return "varlen"
    return "positions" if native else "mask"


def describe(attention: str, separation: Separation, form: Optional[str] = None, remote: bool = False) -> str:
    """One line for the run log: the attention kernel, how packed samples stay apart on it, and whether that was
    measured (`form`: what verify_form found, or confirmed)."""
    per_sample = "flash-attention, from the position ids" if attention.startswith("flash") else (
        "one sdpa call per packed sample, the sinks as a key" if attention == SINK_ATTENTION
        else "one causal sdpa call per packed sample")
    how = {"none": per_sample, "varlen": "flash-attention's variable-length arguments",
           "positions": "transformers' masks, built from the position ids",
           "mask": "a block-diagonal mask"}[separation]
    if remote and form is not None:
        how = {"positions": "its own masks, built from the position ids", "mask": "a block-diagonal bool mask",
               "additive": "a block-diagonal additive mask", "varlen": how}[form]
    if form is not None:
        how += f" ({'remote code: ' if remote else ''}checked against each sample alone)"
    return f"attention: {attention}; packed samples are kept apart by {how}"


FORMS = ("positions", "mask", "additive")
"""The forms verify_form tries for remote code, cheapest first: no mask at all, then one byte per element, then
one of the compute dtype."""
FORM_NAMES = {"positions": "position ids", "mask": "bool mask", "additive": "additive mask",
              "varlen": "varlen arguments", "none": "per-sample attention"}
"""How an error names each form."""
PROBE_TOKENS = 8
"""Tokens in each of the two probe samples: a few forwards of 16 tokens, seconds even at 70B under ZeRO-3."""


def agreement(dtype: torch.dtype) -> float:
    """How far a form's packed logits may stray from each sample alone, as a fraction of how far they stray with no
    separation at all (the second sample attending to the first): a thousand roundings of the compute dtype, at
    most 0.1 (1.2e-4 in fp32, 0.1 in bf16 and fp16).

    A form that fails outright strays on the order of the whole (0.9 for eager adding a bool mask). Layers that
    carry state along the row stray less with random weights: a tiny LFM2 (convolutions) 6.7e-4, Falcon-H1
    (Mamba) 8e-3, while fp32 rounding in every passing form measured here is below 1e-5. In bf16 a leak must
    be larger than bf16's rounding to be seen, which a trained model's is.
    """
    return min(0.1, 1000 * torch.finfo(dtype).eps)


def remote_forms(separation: Separation, model_config: dict, seq_len: int) -> tuple[str, ...]:
    """The forms verify_form may pick for a remote model: the varlen arguments under flash-attention
    (the only form that kernel reads); the position ids alone where a sample can outgrow a sliding window (a mask
    handed in is used as it is, window or not, and an 8-token probe cannot tell); else all FORMS."""
    if separation == "varlen":
        return ("varlen",)
    return ("positions",) if outgrown_window(attention_window(model_config), seq_len) is not None else FORMS


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A keep / drop bool mask as scores to add: 0 where a token attends, the dtype's minimum where it does not
    (finite, so a row that drops everything but itself still has a softmax)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def install_additive_mask(model, dtype: torch.dtype) -> Any:
    """Hand the model every bool attention mask collate builds as additive_mask(mask, dtype); returns the hook."""
    def to_additive(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            return None
        return args, {**kwargs, "attention_mask": additive_mask(mask, dtype)}

    return model.register_forward_pre_hook(to_additive, with_kwargs=True)


def verify_form(model, logits_of: Callable[[dict], torch.Tensor], device: torch.device, dtype: torch.dtype,
                forms: tuple[str, ...] = FORMS) -> tuple[Optional[str], dict[str, float]]:
    """The first of `forms` in which a row packing two samples gives each the logits it gets alone (None when none
    does; `agreement(dtype)` decides), and every tried form's distance from them as a fraction of the leak's.
    Leaves the model as it was.

    `logits_of(inputs)` runs the model's forward (through the engine: at ZeRO-3 every rank must call it with the
    same inputs, and every rank does, with the same samples). The reference is the two samples as two rows with
    no mask and no position ids, the plainest input a causal LM has; the leak is the two as one row the same way,
    where the second sample attends to the first. The packed rows come from collate, as training's do.
    """
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, vocab, (PROBE_TOKENS,), generator=generator) for _ in range(2)]
    packed = build_packed([s.numpy() for s in samples], [s.numpy() for s in samples], [[0, 1]])
    n = PROBE_TOKENS
    alone = logits_of({"input_ids": torch.stack(samples).to(device), "use_cache": False}).float()
    leak = logits_of({"input_ids": torch.cat(samples)[None].to(device), "use_cache": False}).float()
    scale = (leak[0, n:] - alone[1]).abs().max().item()
    distances = {}
    for form in forms:
        batch = collate(packed, np.array([0]), pad_id=0, separation="mask" if form == "additive" else form,
                        multiple_of=1).to(device)
        hook = install_additive_mask(model, dtype) if form == "additive" else None
        try:
            got = logits_of(batch.model_inputs()).float()
        finally:
            if hook is not None:
                hook.remove()
        off = max((got[0, :n] - alone[0]).abs().max().item(), (got[0, n:] - alone[1]).abs().max().item())
        distances[form] = off / scale if scale > 0 else (0.0 if off == 0 else float("inf"))
        if distances[form] <= agreement(dtype):
            return form, distances
    return None, distances


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
    if position_ids.shape[0] != query.shape[0]:  # transformers' default ids, one row for the whole batch
        position_ids = position_ids.expand(query.shape[0], -1)
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
