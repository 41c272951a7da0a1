"""Whether a model published with quantized weights can be fine-tuned in full, and how it is loaded for that.

Several of the largest open models are published quantized: DeepSeek-V3 and the Qwen3 "-FP8" releases in
fine-grained fp8 (`quant_method: fp8`, an fp8 weight and a scale per 128 × 128 block), gpt-oss in mxfp4.
Full-parameter training updates every weight in the compute dtype, so those weights must be turned back
into it on load, which transformers does when asked (`dequantize=True` in the checkpoint's own quantization
config). Unasked, it dequantizes only where it has no kernel for the format: on CPU, fp8 on GPUs below compute
capability 8.9, mxfp4 without triton. On an H100 it keeps fp8 weights in FP8Linear modules (measured with
transformers 5.25 and CUDA mocked), and transformers' own message for mxfp4 says it "doesn't support training".
So the trainer always asks, and the export is a plain model in the training precision, without the
quantization config (transformers drops it from a dequantized model's config).

Other methods (GPTQ, AWQ, bitsandbytes, ...) have no path back in transformers' loader: `plan` refuses them.
"""
from __future__ import annotations

from typing import Any, Optional

DEQUANTIZED_ON_LOAD = ("fp8", "mxfp4")
"""quant_method values whose transformers quantizer loads the weights dequantized when told `dequantize=True`."""


def quant_method(model_config: Optional[dict[str, Any]]) -> Optional[str]:
    """The checkpoint's quantization method from its config.json (None for plain weights)."""
    quantization = (model_config or {}).get("quantization_config")
    if not isinstance(quantization, dict):
        return None
    return str(quantization.get("quant_method", "unknown"))


def quantized_weights_problem(model_config: Optional[dict[str, Any]], model: str) -> Optional[str]:
    """Why full-parameter training cannot start from this checkpoint's weights (None when it can)."""
    method = quant_method(model_config)
    if method is None or method in DEQUANTIZED_ON_LOAD:
        return None
    return (f"model.name_or_path: {model} holds weights quantized with {method!r} (its config.json's "
            f"quantization_config); full-parameter training updates every weight in the training precision, and "
            f"transformers loads only {' and '.join(DEQUANTIZED_ON_LOAD)} checkpoints back into it. Start from the "
            f"model's unquantized release")


def quantized_weights_note(model_config: Optional[dict[str, Any]], precision: str) -> Optional[str]:
    """The plan's line for a checkpoint that is dequantized on load (None for plain weights)."""
    method = quant_method(model_config)
    if method not in DEQUANTIZED_ON_LOAD:
        return None
    return (f"the model's weights are published in {method}: they are dequantized to {precision} as they load, "
            f"trained in {precision}, and exported as a plain {precision} model")
