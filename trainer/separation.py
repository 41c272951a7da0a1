"""How the samples packed into one row are kept apart, in the form the model's attention reads.

collate restarts the position ids at every sample. What turns that into attention that stays inside each
sample depends on the kernel (collate's `separation`):

- "varlen" (flash-attention): the variable-length arguments, built by collate.
- "positions" (sdpa or eager, on a model class transformers implements): nothing but the position ids.
  transformers' own mask builders find the samples in them and build each layer's mask by that layer's
  rule (causal, or causal within a sliding window) and in the form its kernel reads (bool for sdpa, an
  additive float mask for eager). A 4D mask handed in from outside is used as it is, and a block-diagonal
  bool one is wrong twice over: it ignores sliding windows (Mistral, Gemma 2/3, gpt-oss layers attend past
  their window), and eager attention adds it to the scores (True is +1), so nothing is masked at all, not
  even the future.
  Some models (gpt-oss in transformers 5.23) do not pass the position ids to their builders. For every
  model whose config lists `layer_types`, `install` therefore builds the per-layer-type masks itself, with
  the same builders, and hands them in as the mapping those models accept.
- "mask" (remote code): its mask handling is unknown; it gets the block-diagonal bool mask sdpa reads, as
  before.
- "none" (sequence parallelism): packed_causal_attention finds the samples in the position ids itself.
"""
from __future__ import annotations

from typing import Optional

import torch

from trainer.data.collate import Separation

BUILDERS = {"full_attention": "create_causal_mask", "sliding_attention": "create_sliding_window_causal_mask"}
"""Layer types whose masks `install` builds, and transformers' builder for each (masking_utils)."""


def separation_for(attention: str, sequence_parallel: int, native: bool) -> Separation:
    """The separation a run's batches carry, from the attention kernel the model runs."""
    if sequence_parallel > 1:
        return "none"
    if attention == "flash_attention_2":
        return "varlen"
    return "positions" if native else "mask"


def _layer_types(config) -> Optional[set[str]]:
    types = getattr(config, "layer_types", None)
    return set(types) if types and set(types) <= set(BUILDERS) else None


def install(model) -> bool:
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
