"""Whether the loss runs chunked (never holding tokens × vocab logits), and how many tokens a chunk holds.

The chunked loss computes the LM head and cross-entropy over a chunk of positions at a time, so the
logits buffer is one chunk's instead of the whole micro-batch's: at 16k tokens and a 128k vocabulary
that is 0.25 GB instead of 29 GB. It is exact only when the logits are the plain linear head of the
final hidden states; models that transform them (soft-capping, scaling) must keep the full-logits loss.
`auto` is on for the families we mirror exactly (the dense families of launcher.planning.model_size and
the mixture-of-experts families of launcher.planning.moe_size) unless their config transforms the logits;
`true` asks for it on any model whose head is a plain bias-free linear (the trainer checks the module).
An MoE model's router aux loss does not stand in the way: the trainer records it from the routers
(trainer/moe.py) with transformers' own aux loss switched off, so it is the same whichever way the LM loss is
taken (tests/test_moe_train.py checks every MoE family against its full-logits forward).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Union

PLAIN_HEAD_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text", "phi3",
                       "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v2", "deepseek_v3")
# config.json keys that make the logits something other than lm_head(hidden) when they are set.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
CHUNK_LOGITS_BYTES = 64 * 2 ** 20
"""Budget for one chunk's fp32 logits: big enough for efficient matmuls (128 positions × 128k vocabulary is
still 67 GFLOP per matmul at hidden 4096), small next to a long sequence's activations."""


def chunked_loss_blocker(model_config: dict[str, Any]) -> Optional[str]:
    """Why `auto` keeps the full-logits loss for this model (None: the chunked loss is exact for it)."""
    model_type = str(model_config.get("model_type", ""))
    transforms = [key for key in LOGIT_TRANSFORMS if model_config.get(key) not in (None, 0, 1, 1.0)]
    if transforms:
        return f"its config transforms the logits ({', '.join(f'{k}={model_config[k]}' for k in transforms)})"
    if model_type not in PLAIN_HEAD_FAMILIES:
        return (f"model_type {model_type!r} is not one whose head is known to be plain "
                f"({', '.join(PLAIN_HEAD_FAMILIES)}); set train.chunked_loss: true to use it anyway")
    return None


def resolve_chunked_loss(setting: Union[bool, str], model_config: Optional[dict[str, Any]]) -> tuple[Union[bool, str],
                                                                                                     Optional[str]]:
    """The value `train.chunked_loss` resolves to, and a note when `auto` chose the full-logits loss.

    Without the model's config.json (a hub model `plan` could not fetch) `auto` stays `auto`: the trainer decides
    from the loaded model.
    """
    if setting != "auto" or model_config is None:
        return setting, None
    blocker = chunked_loss_blocker(model_config)
    if blocker is None:
        return True, None
    return False, f"train.chunked_loss=auto -> false: {blocker}"


def loss_chunk_tokens(vocab_size: int) -> int:
    """Positions per chunk: the largest power of two whose fp32 logits fit CHUNK_LOGITS_BYTES (128..8192)."""
    fit = max(1, CHUNK_LOGITS_BYTES // (4 * vocab_size))
    return max(128, min(8192, 2 ** int(math.log2(fit))))
