"""Model FLOPs of a training step, and the peak a device can do, for TFLOPs, MFU and HFU.

Per token, training costs 6 FLOPs per weight that multiplies it (2 forward, 4 backward): every
parameter except the input embedding lookup, which is a gather; the LM head counts, tied or not.
Attention adds, per layer, QK^T and AV: a token at position i of its sample attends i+1 tokens,
so a causal sample of n tokens costs 6 · d_attn · n² per layer (fwd+bwd, causal half of 12·d·n²).
With packing a token only attends inside its own sample, so the attention term uses the real
sample lengths, not seq_len. Padding costs nothing here: it is not useful work.

MFU counts these model FLOPs; HFU adds what activation checkpointing recomputes (one more forward:
8 instead of 6 per weight and per attention unit). Peaks are dense (no sparsity) per dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Dense peak TFLOPs per device by dtype (vendor data sheets). Order matters: first substring match wins.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("GH200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("B200", {"bf16": 2250.0, "fp16": 2250.0, "fp32": 80.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("A800", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
    ("MI300X", {"bf16": 1307.0, "fp16": 1307.0, "fp32": 163.4}),
    ("MI250X", {"bf16": 383.0, "fp16": 383.0, "fp32": 47.9}),
]


def peak_tflops(device_name: str, precision: str, configured: Optional[float]) -> Optional[float]:
    """The configured peak, else the table's for this device and dtype; None when unknown (no MFU then)."""
    if configured:
        return configured
    for key, by_dtype in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return by_dtype.get(precision)
    return None


@dataclass(frozen=True)
class ModelFlops:
    matmul_params: int
    """Parameters that multiply every token: all but the input embedding (the LM head counts, tied or not)."""
    layers: int
    attention_width: int
    """heads × head_dim: the width of Q, K and V per layer."""

    def step(self, tokens: int, sum_sq_lengths: int, recompute: bool = False) -> tuple[float, float]:
        """(model FLOPs, hardware FLOPs) of training on `tokens` real tokens in samples with Σ n² = sum_sq_lengths."""
        dense = 6 * self.matmul_params * tokens
        attention = 6 * self.layers * self.attention_width * sum_sq_lengths
        model = float(dense + attention)
        return model, model * (8 / 6 if recompute else 1.0)


def model_flops_of(model, config) -> ModelFlops:
    """From the live model (exact for any architecture; ZeRO-3 shards report their full size)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += getattr(p, "ds_numel", p.numel())
    embed = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    embed_n = getattr(embed, "ds_numel", embed.numel())
    tied = out is not None and out.weight is embed
    matmul = total - embed_n + (embed_n if tied else 0)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelFlops(matmul, config.num_hidden_layers, heads * head_dim)
