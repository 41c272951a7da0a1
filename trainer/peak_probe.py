"""The peak of a device without a data-sheet figure (a CPU, an unlisted GPU), measured so MFU exists everywhere.

MFU divides the model's FLOPs per second by what the device can do. GPUs have vendors' numbers
(trainer/flops.py). A CPU's depends on its cores, vector units, clock, and on how many ranks share it, so
there every rank measures it at start-up, in preflight, all ranks at once as they will train (ranks that
share a CPU share its cores, caches, memory bandwidth and turbo budget). The probe multiplies two square
matrices of the training dtype over and over for PROBE_SECONDS and keeps the fastest repetition: a dense
matmul is the most FLOP-dense work the device does (the model's matmuls are no faster), and the fastest
of several repetitions is the one least disturbed by other work on the machine. The run uses the median
over ranks.

It is an achievable peak, not a data-sheet one: a CPU core reaches ~80-90 % of its theoretical FMA rate in
a large matmul. So a CPU's MFU reads "share of what this machine's matmul kernel can do", which is the
question a CPU run can answer.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from trainer.distributed import Dist, all_gather_floats
from trainer.flops import device_name, peak_tflops

PROBE_SECONDS = 0.3
# Big enough to run at full speed on the device (a CPU core saturates at ~1k; a GPU needs ~8k to fill its SMs).
PROBE_SIZE = {"cpu": 1024}
PROBE_SIZE_ACCELERATOR = 8192
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Peak:
    """The dense peak of one device used for MFU, and where it came from."""

    tflops: Optional[float]
    source: str
    """'config' (launch.peak_tflops), 'table' (vendor data sheet for this exact device name) or 'probe'."""
    per_rank: tuple[float, ...] = ()
    """The probe's result on every rank (empty unless probed)."""

    def to_json(self) -> dict:
        return asdict(self)


def probe_tflops(device: torch.device, precision: str, seconds: float = PROBE_SECONDS) -> float:
    """Dense matmul TFLOPs this process reaches on `device` in the training precision (best repetition)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    n = PROBE_SIZE.get(device.type, PROBE_SIZE_ACCELERATOR)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=DTYPES[precision])
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=DTYPES[precision])
    out = torch.mm(a, b)  # the first call picks a kernel and allocates: not timed
    acc.synchronize()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        acc.synchronize()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() >= deadline:
            break
    return 2 * n ** 3 / best / 1e12


def device_peak(d: Dist, precision: str, configured: Optional[float]) -> Peak:
    """The configured peak, else the data sheet's for this device, else the probe's (a collective: every rank
    probes at the same time, then all agree on the median)."""
    if configured:
        return Peak(configured, "config")
    table = peak_tflops(device_name(d.device), precision, None)
    if table:
        return Peak(table, "table")
    mine = probe_tflops(d.device, precision)
    ranks = [r[0] for r in all_gather_floats([mine], d.device)]
    return Peak(statistics.median(ranks), "probe", tuple(ranks))
