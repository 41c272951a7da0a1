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

import torch

from launcher.planning.meta_size import expert_blocks

# Dense (no sparsity) peak TFLOPs per device from the vendors' data sheets, by the exact names
# torch.cuda.get_device_name reports. Exact names, because a substring match sends "NVIDIA L40" to the L4's
# entry and "NVIDIA H100 NVL" to the SXM part's. Data sheets quote bf16/fp16 with sparsity; dense is half.
_H100_SXM = {"bf16": 989.5, "fp16": 989.5, "fp32": 67.0}
_H100_PCIE = {"bf16": 756.5, "fp16": 756.5, "fp32": 51.0}
_H100_NVL = {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0}
_A100 = {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    **dict.fromkeys(("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 80GB", "NVIDIA H100 SXM5 64GB", "NVIDIA H100",
                     "NVIDIA H800", "NVIDIA H800 80GB HBM3"), _H100_SXM),
    **dict.fromkeys(("NVIDIA H100 PCIe", "NVIDIA H800 PCIe"), _H100_PCIE),
    "NVIDIA H100 NVL": _H100_NVL,
    **dict.fromkeys(("NVIDIA H200", "NVIDIA H200 141GB HBM3e"), _H100_SXM),
    "NVIDIA H20": {"bf16": 148.0, "fp16": 148.0, "fp32": 44.0},
    "NVIDIA H200 NVL": _H100_NVL,
    **dict.fromkeys(("NVIDIA GH200 480GB", "NVIDIA GH200 144G HBM3e", "NVIDIA GH200 120GB"), _H100_SXM),
    **dict.fromkeys(("NVIDIA B200", "NVIDIA B200 180GB HBM3e"), {"bf16": 2250.0, "fp16": 2250.0, "fp32": 75.0}),
    "NVIDIA GB200": {"bf16": 2500.0, "fp16": 2500.0, "fp32": 80.0},
    **dict.fromkeys(("NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-40GB", "NVIDIA A100 80GB PCIe", "NVIDIA A100-PCIE-40GB",
                     "NVIDIA A100-PCIE-80GB", "NVIDIA A800-SXM4-80GB", "NVIDIA A800 80GB PCIe"), _A100),
    "NVIDIA L40S": {"bf16": 362.05, "fp16": 362.05, "fp32": 91.6},
    "NVIDIA L40": {"bf16": 181.05, "fp16": 181.05, "fp32": 90.5},
    "NVIDIA L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
    "NVIDIA A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
    "NVIDIA A40": {"bf16": 149.7, "fp16": 149.7, "fp32": 37.4},
    "NVIDIA RTX 6000 Ada Generation": {"bf16": 364.2, "fp16": 364.2, "fp32": 91.1},
    **dict.fromkeys(("Tesla V100-SXM2-16GB", "Tesla V100-SXM2-32GB"), {"fp16": 125.0, "fp32": 15.7}),
    **dict.fromkeys(("Tesla V100-PCIE-16GB", "Tesla V100-PCIE-32GB"), {"fp16": 112.0, "fp32": 14.0}),
    "AMD Instinct MI300X": {"bf16": 1307.4, "fp16": 1307.4, "fp32": 163.4},
    "AMD Instinct MI325X": {"bf16": 1307.4, "fp16": 1307.4, "fp32": 163.4},
    "AMD Instinct MI250X": {"bf16": 383.0, "fp16": 383.0, "fp32": 47.9},
}


def device_name(device: torch.device) -> str:
    """The accelerator's marketing name (for the peak-FLOPs table), e.g. 'NVIDIA H100 80GB HBM3'."""
    backend = getattr(torch, device.type, None)
    try:
        return backend.get_device_name(device) if hasattr(backend, "get_device_name") else device.type
    except Exception:  # noqa: BLE001 - only used to look up a peak; unknown means the peak is probed
        return device.type


def peak_tflops(device_name: str, precision: str, configured: Optional[float]) -> Optional[float]:
    """The configured peak, else the table's for this exact device name and dtype; None when unknown (then
    trainer/peak_probe.py measures it)."""
    if configured:
        return configured
    return PEAK_TFLOPS.get(device_name.strip(), {}).get(precision)


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
    """From the live model (exact for any architecture; ZeRO-3 shards report their full size).

    Mixture of experts: a token multiplies only its top-k experts, so the (E − k)/E of every expert
    block it skips is not counted; counting all of them would overstate MFU by total/active (3.6× for
    Mixtral-8x7B, 18× for DeepSeek-V3).
    """
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += getattr(p, "ds_numel", p.numel())
    embed = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    embed_n = getattr(embed, "ds_numel", embed.numel())
    tied = out is not None and out.weight is embed
    matmul = total - embed_n + (embed_n if tied else 0) - sum(b.inactive_params for b in expert_blocks(model, config))
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if getattr(config, "qk_nope_head_dim", None) and getattr(config, "v_head_dim", None):
        # DeepSeek's latent attention: QK^T is nope + rope wide, AV v_head_dim (config.head_dim is the rope part)
        head_dim = (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim) / 2
    return ModelFlops(matmul, config.num_hidden_layers, int(heads * head_dim))
