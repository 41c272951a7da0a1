"""What the loop measures between two log steps, turned into one metrics row.

Sums stay on the device or in host integers during the window; only a log step pays for one
all-gather of every rank's numbers (loss, data wait, timing, memory peaks) and the one device sync
that makes the per-rank timing honest on asynchronous devices. Steps that do not log add no collective
and no sync.
"""
from __future__ import annotations

import resource
import statistics
import time
from typing import Optional

import numpy as np
import psutil
import torch

from trainer.data.packing import PackedSet
from trainer.distributed import Dist, all_gather_floats
from trainer.flops import ModelFlops

MEMORY_NAMES = ("mem_device_allocated_peak_gb", "mem_device_reserved_peak_gb", "mem_host_rss_gb",
                "mem_host_peak_rss_gb")


def local_memory() -> list[float]:
    """This rank's device peaks, host RSS and the kernel's RSS high-water mark in bytes, MEMORY_NAMES order."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return [acc.max_memory_allocated(), acc.max_memory_reserved(), psutil.Process().memory_info().rss,
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]


class Window:
    def __init__(self, dist: Dist, flops: Optional[ModelFlops], peak_tflops: Optional[float], recompute: bool):
        self.dist, self.flops, self.peak, self.recompute = dist, flops, peak_tflops, recompute
        self.loss = torch.zeros((), dtype=torch.float64, device=dist.device)
        self.reset()

    def reset(self) -> None:
        self.loss.zero_()
        self.targets = self.real_tokens = self.samples = self.steps = self.skipped = 0
        self.model_flops = self.hardware_flops = 0.0
        self.step_times: list[float] = []
        self.data_wait = 0.0
        self.local_work: Optional[float] = None

    def start_step(self) -> None:
        self.step_start = time.perf_counter()

    def timed_batch(self, make):
        """Time spent preparing a batch (collate, copy to device): the step waiting on data."""
        t0 = time.perf_counter()
        batch = make()
        self.data_wait += time.perf_counter() - t0
        return batch

    def local_work_done(self, sync: bool) -> None:
        """Before the last backward (where gradients are reduced), a rank's time is its own work alone."""
        if sync:
            from deepspeed.accelerator import get_accelerator

            get_accelerator().synchronize()
            self.local_work = time.perf_counter() - self.step_start

    def end_step(self, loss_sum: torch.Tensor, data: PackedSet, indices: np.ndarray, skipped: bool) -> None:
        """Count one optimizer step over the global batch `indices` of `data` (a skipped step adds only time)."""
        lengths = data.sample_lengths(indices).astype(np.int64)
        self.steps += 1
        self.step_times.append(time.perf_counter() - self.step_start)
        self.samples += len(lengths)
        if skipped:
            self.skipped += 1
            return
        self.loss += loss_sum
        self.targets += int(data.n_targets[indices].sum())
        real_tokens = int(lengths.sum())
        self.real_tokens += real_tokens
        if self.flops is not None:
            # Attention costs grow with each sample's own length squared: packing keeps samples apart.
            model, hardware = self.flops.step(real_tokens, int((lengths ** 2).sum()), self.recompute)
            self.model_flops += model
            self.hardware_flops += hardware

    def metrics(self) -> dict:
        """Rates are over the time spent in steps: a checkpoint save or an eval between steps is not training."""
        dist = self.dist
        elapsed = sum(self.step_times) or 1e-9
        local_work = self.local_work if self.local_work is not None else 0.0
        ranks = all_gather_floats([self.loss.item(), self.data_wait / max(self.steps, 1), local_work,
                                   *local_memory()], dist.device)
        loss, data_wait = sum(r[0] for r in ranks), max(r[1] for r in ranks)
        world = dist.world
        row = {"loss": loss / self.targets if self.targets else None,
               "tokens_per_sec": self.targets / elapsed,
               "tokens_per_sec_per_device": self.targets / elapsed / world,
               "total_tokens_per_sec": self.real_tokens / elapsed,
               "samples_per_sec": self.samples / elapsed,
               "step_time": statistics.median(self.step_times) if self.step_times else None,
               "data_wait": data_wait}
        if self.flops is not None:
            tflops = self.model_flops / elapsed / world / 1e12
            row["tflops_per_device"] = tflops
            if self.peak:
                row["mfu"] = tflops / self.peak
                row["hfu"] = self.hardware_flops / elapsed / world / 1e12 / self.peak
        if self.local_work is not None:
            times = [r[2] for r in ranks]
            row.update({"rank_time_min": min(times), "rank_time_max": max(times),
                        "slowest_rank": max(range(world), key=times.__getitem__)})
        # Peaks over all ranks: the rank closest to running out is the one that matters (GB = 1e9 bytes).
        memory = {name: round(max(r[3 + i] for r in ranks) / 1e9, 4) for i, name in enumerate(MEMORY_NAMES)}
        return {**row, **memory}
