"""How much host memory a pinned (page-locked) buffer really takes on a GPU node.

On GPUs, DeepSpeed pins its offload buffers (`offload_optimizer.pin_memory` / `offload_param.pin_memory`, which the
launcher renders on), and the trainer pins the background-save copies of device tensors, all through
`Tensor.pin_memory()`. torch's caching host allocator (ATen/core/CachingHostAllocator.h) rounds every such
allocation up to the next power of two to reuse blocks, so a 17.5 GB gradient partition takes 34.4 GB of RAM that
the kernel can neither swap nor reclaim: on one node of 8 ranks the plan of a 70B run with the optimizer offloaded
was short by ~300 GB at ZeRO-3 and ~670 GB at ZeRO-2. torch 2.13 added the allocator setting
`pinned_max_cached_size_mb`: above it an allocation is exact (and freed rather than cached when released). The
trainer sets it to PINNED_EXACT_ABOVE_MB on GPUs (trainer.host_memory.limit_pinned_rounding) where the user has not
set it, and the planner counts the rounding below it, or everywhere on an older torch. 1 GiB keeps torch's rounding,
and its cache, for what a step allocates and frees, and makes the persistent buffers of large runs exact. A block
above the limit is not cached: freed, it goes back to the driver, and the next one of its size is page-locked anew
(slow, and freeing synchronizes the device). So a run whose offloaded layer inputs (train.activation_checkpointing:
offload, pinned again every micro-batch past DeepSpeed's pool of 64) are larger gets a limit just above them
(limit_mb).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

PINNED_EXACT_ABOVE_MB = 1024
"""pinned_max_cached_size_mb the trainer sets: pinned allocations above this many MiB are exact."""
LIMIT_FROM_TORCH = (2, 13)
"""The first torch whose allocator config knows pinned_max_cached_size_mb (older ones reject the key)."""
ROUNDS_EVERYTHING = 2 ** 62
"""rounds_up_to of a torch without the setting: every pinned allocation rounds to a power of two."""


def limit_mb(recurring_bytes: int = 0) -> int:
    """pinned_max_cached_size_mb for a run whose largest pinned allocation made again every step takes
    `recurring_bytes`: PINNED_EXACT_ABOVE_MB, or just enough that torch keeps caching that allocation."""
    return max(PINNED_EXACT_ABOVE_MB, -(-recurring_bytes // 2 ** 20))


def rounds_up_to(torch_version: tuple[int, ...]) -> int:
    """The largest pinned allocation (bytes) torch rounds up to a power of two, for a GPU run on this torch (before
    a run's own limit_mb)."""
    return PINNED_EXACT_ABOVE_MB * 2 ** 20 if torch_version >= LIMIT_FROM_TORCH else ROUNDS_EVERYTHING


def run_rounding(rounding: Optional[int], recurring_bytes: int) -> Optional[int]:
    """rounding (rounds_up_to, or None on CPU) for a run whose recurring pinned allocation is `recurring_bytes`."""
    if rounding is None or rounding == ROUNDS_EVERYTHING:
        return rounding
    return max(rounding, limit_mb(recurring_bytes) * 2 ** 20)


@lru_cache(maxsize=1)
def installed_rounding() -> int:
    """rounds_up_to for the torch installed here (read from its metadata, torch is not imported): the nodes run
    the environment the launcher runs in."""
    from launcher.backends.torchrun import installed_version

    return rounds_up_to(installed_version("torch"))


def pinned_bytes(nbytes: int, rounding: Optional[int]) -> int:
    """Host bytes one pinned allocation of `nbytes` takes; rounding None: nothing is pinned (a CPU run)."""
    if rounding is None or nbytes <= 0 or nbytes > rounding:
        return max(nbytes, 0)
    return 1 << (nbytes - 1).bit_length()
