"""Pinned host memory on GPUs: large buffers at their own size, and the blocks DeepSpeed freed at start-up released.

torch rounds every pinned allocation up to a power of two (launcher.planning.pinned_memory, which plans with it).
From torch 2.13 its allocator config stops that above `pinned_max_cached_size_mb`; each rank sets it here, before
DeepSpeed pins anything, unless the job's own PYTORCH_ALLOC_CONF sets a pinned-memory limit. The setting is applied
at run time with the job's other allocator settings repeated, because a parse resets some options it does not
name.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from launcher.planning.pinned_memory import LIMIT_FROM_TORCH, ROUNDS_EVERYTHING, installed_rounding, limit_mb

SETTING = "pinned_max_cached_size_mb"
USER_KEYS = ("pinned_max_cached_size_mb", "pinned_max_round_threshold_mb")
ENV_NAMES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def limit_pinned_rounding(device: torch.device, recurring_bytes: int = 0) -> Optional[str]:
    """Make this process's pinned allocations above limit_mb(recurring_bytes) MiB exact (1 GiB, or just above the
    run's offloaded layer input); a line for the run's log saying what holds (None on CPU, where nothing is pinned)."""
    if device.type == "cpu":
        return None
    limit = limit_mb(recurring_bytes)
    for name in ENV_NAMES:
        if any(key in os.environ.get(name, "") for key in USER_KEYS):
            return (f"pinned host memory: {name} sets its own pinned-memory limit ({os.environ[name]}); the plan "
                    f"assumed {SETTING}:{limit}")
    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    set_ = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if get is None or set_ is None or installed_rounding() == ROUNDS_EVERYTHING:  # as the plan assumed
        return (f"pinned host memory: torch {torch.__version__} rounds every pinned allocation up to a power of two "
                f"(the plan counts it; from torch {'.'.join(map(str, LIMIT_FROM_TORCH))} large ones are exact)")
    current = get()
    try:
        set_(f"{current},{SETTING}:{limit}" if current else f"{SETTING}:{limit}")
    except (ValueError, RuntimeError) as exc:  # an allocator that refuses the key, or a setting of the job's
        return (f"pinned host memory: could not set {SETTING}:{limit} ({exc}); pinned allocations above {limit} MiB "
                f"round up to a power of two, which the plan did not count")
    return (f"pinned host memory: allocations above {limit} MiB take their own size, not the next power of two "
            f"({SETTING}:{limit})")


def release_freed_pinned(device: torch.device) -> None:
    """Give back the pinned blocks freed during deepspeed.initialize (zero.Init's per-parameter partitions, once
    copied into the flat offload buffer): torch's cache would keep them page-locked for the whole run."""
    empty = getattr(torch._C, "_host_emptyCache", None)  # CUDA's pinned cache (torch.cuda.graphs calls it too)
    if device.type == "cuda" and empty is not None:
        empty()
