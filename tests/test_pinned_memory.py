"""Pinned host memory on GPUs: torch's power-of-two rounding in the plan, and the setting each rank applies.

The rule is torch's own (ATen/core/CachingHostAllocator.h, torch 2.13: an allocation no larger than
pinned_max_cached_size_mb is rounded up by c10::llvm::PowerOf2Ceil; a larger one is exact). Which host buffers
DeepSpeed pins, and their sizes, is checked on two real ranks in tests/test_memory.py
(test_the_plans_pinned_host_buffers_are_the_ones_deepspeed_pins). No GPU here: the setting is checked as torch's
allocator config stores it, the older torch that rejects it is monkeypatched, and the tests say so.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from launcher.planning.memory import Margins, Setup, ZeroSettings, estimate_memory, offload_buffers
from launcher.planning.model_size import counts_from_path
from launcher.planning.pinned_memory import (
    ROUNDS_EVERYTHING,
    installed_rounding,
    limit_mb,
    pinned_bytes,
    rounds_up_to,
    run_rounding,
)

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "data" / "model_configs"
GIB = 2 ** 30
OLD_TORCH, NEW_TORCH = Margins(pinned_rounding=rounds_up_to((2, 12))), Margins(pinned_rounding=rounds_up_to((2, 13)))
AS_ASKED = Margins(pinned_rounding=None)


def power_of_two_ceil(nbytes: int) -> int:
    """A second implementation of the rounding, by logarithm."""
    return 2 ** math.ceil(math.log2(nbytes))


def test_pinned_sizes_follow_torchs_rounding_rule():
    assert pinned_bytes(17_500_000_000, ROUNDS_EVERYTHING) == 2 ** 35 == 34_359_738_368  # a 70B gradient partition
    assert pinned_bytes(3 * 2 ** 20, ROUNDS_EVERYTHING) == 4 * 2 ** 20
    assert pinned_bytes(2 ** 20, ROUNDS_EVERYTHING) == 2 ** 20  # a power of two is its own size
    assert pinned_bytes(GIB, GIB) == GIB and pinned_bytes(GIB - 1, GIB) == GIB
    assert pinned_bytes(GIB + 1, GIB) == GIB + 1  # above torch 2.13's limit: exact
    assert pinned_bytes(3 * 2 ** 20, None) == 3 * 2 ** 20 and pinned_bytes(0, ROUNDS_EVERYTHING) == 0  # CPU; empty
    for nbytes in (5, 1000, 12_345_678, 1_050_000_000, 4_000_000_000):
        assert pinned_bytes(nbytes, ROUNDS_EVERYTHING) == power_of_two_ceil(nbytes)


def test_the_limit_comes_with_torch_2_13():
    """torch 2.13 is the first whose allocator config has pinned_max_cached_size_mb (its libc10.so carries the key;
    2.12.1's does not, and rejects it as an unrecognized key on CUDA); this machine has 2.13."""
    assert rounds_up_to((2, 12)) == ROUNDS_EVERYTHING and rounds_up_to((2, 6)) == ROUNDS_EVERYTHING
    assert rounds_up_to((2, 13)) == rounds_up_to((3, 0)) == GIB
    assert installed_rounding() == GIB


def by_hand(buffers, limit: int) -> int:
    return sum((power_of_two_ceil(b.nbytes) if b.nbytes <= limit else b.nbytes) if b.pinned else b.nbytes
               for b in buffers if not b.freed_into_cache)


def test_a_70b_offload_plan_counts_what_torch_pins_on_the_node():
    """Llama-3-70B at ZeRO-3 with the optimizer offloaded, 8 GPUs on one node, bf16 summing in fp32: each rank pins a
    35.3 GB fp32 gradient partition and nine fp32 sub-group gradients. An older torch takes 68.7 GB for the first
    and 4.29 GB for each 4 GB sub-group: 300 GB more on the node than the bytes DeepSpeed asks for, which the plan
    did not count; with torch 2.13 and the trainer's setting, all are above 1 GiB and exact."""
    counts = counts_from_path(CONFIGS / "llama3_70b.json")
    setup = Setup(stage=3, world_size=8, gpus_per_node=8, dtype="bf16", offload_optimizer=True,
                  fp32_accumulation=True)
    zero = ZeroSettings()
    buffers = offload_buffers(counts, setup, zero)
    share = -(-counts.total // 8)
    pinned = sorted(b.nbytes for b in buffers if b.pinned)
    whole, rest = divmod(share, zero.sub_group_size)
    assert pinned == sorted([4 * share] + [4 * zero.sub_group_size] * whole + [4 * rest])  # sums, sub-groups
    host = {name: estimate_memory(counts, setup, zero, margins).host["offloaded_optimizer"]
            for name, margins in (("old", OLD_TORCH), ("new", NEW_TORCH), ("asked", AS_ASKED))}
    assert host["old"] == 8 * by_hand(buffers, ROUNDS_EVERYTHING)
    assert host["new"] == 8 * by_hand(buffers, GIB) == host["asked"]
    assert host["old"] - host["asked"] > 290e9


def test_torch_2_13_still_rounds_buffers_up_to_1_gib():
    """Llama-3-8B at ZeRO-2, optimizer offloaded, 8 GPUs: the pinned staging buffer holds the 525 M-element head in
    bf16, 1.05 GB, which even torch 2.13 pins as 1 GiB; the partition buffers (4.0, 4.0 and 2.0 GB) are above the
    limit and exact there, while an older torch pins 4.29, 4.29 and 2.15 GB for them."""
    counts = counts_from_path(CONFIGS / "llama3_8b.json")
    setup = Setup(stage=2, world_size=8, gpus_per_node=8, dtype="bf16", offload_optimizer=True)
    staging, share = 2 * counts.largest_tensor, -(-counts.total // 8)
    assert staging < GIB < 2 * share
    extra = {name: estimate_memory(counts, setup, margins=m).host["offloaded_optimizer"]
             - estimate_memory(counts, setup, margins=AS_ASKED).host["offloaded_optimizer"]
             for name, m in (("old", OLD_TORCH), ("new", NEW_TORCH))}
    assert extra["new"] == 8 * (GIB - staging)
    assert extra["old"] == 8 * sum(power_of_two_ceil(b) - b for b in (4 * share, 4 * share, 2 * share, staging))


def test_offloaded_parameters_count_zero_inits_freed_copies_only_where_pinned():
    """At ZeRO-3 with parameters offloaded, zero.Init's pinned per-parameter partitions stay in torch's pinned cache
    until the trainer releases it after deepspeed.initialize, when the optimizer's buffers are already allocated."""
    counts = counts_from_path(CONFIGS / "llama3_8b.json")
    setup = Setup(stage=3, world_size=8, gpus_per_node=8, dtype="bf16", offload_optimizer=True, offload_params=True)
    share = -(-counts.total // 8)
    assert estimate_memory(counts, setup, margins=AS_ASKED).host["offloaded_params"] == 8 * 2 * share
    assert estimate_memory(counts, setup, margins=NEW_TORCH).host["offloaded_params"] == 8 * (2 * share + 2 * share)


def test_background_save_copies_of_device_states_are_pinned():
    """A background save copies the optimizer's states from the device into pinned buffers, one per flat tensor
    (fp32 master and two moments); offloaded states are host tensors already and are copied unpinned."""
    counts = counts_from_path(CONFIGS / "llama3_8b.json")
    setup = Setup(stage=2, world_size=8, gpus_per_node=8, dtype="bf16", async_save=True)
    share = -(-counts.total // 8)
    snapshot = {name: estimate_memory(counts, setup, margins=m).host["async_save_snapshots"]
                for name, m in (("old", OLD_TORCH), ("asked", AS_ASKED))}
    assert snapshot["old"] - snapshot["asked"] == 8 * (3 * power_of_two_ceil(4 * share) - -(-12 * counts.total // 8))
    offloaded = replace(setup, offload_optimizer=True)
    assert (estimate_memory(counts, offloaded, margins=OLD_TORCH).host["async_save_snapshots"]
            == estimate_memory(counts, offloaded, margins=AS_ASKED).host["async_save_snapshots"])


KNOB = """
import json, os, sys
import torch
from trainer import host_memory
if sys.argv[2] == "old-torch":  # monkeypatched: no older torch is installed here
    from launcher.planning.pinned_memory import ROUNDS_EVERYTHING
    host_memory.installed_rounding = lambda: ROUNDS_EVERYTHING
if sys.argv[2] == "refused":
    def refuse(settings):
        raise ValueError("Unrecognized key 'pinned_max_cached_size_mb' in Accelerator allocator config.")
    torch._C._accelerator_setAllocatorSettings = refuse  # monkeypatched: as an older torch's CUDA allocator answers
line = host_memory.limit_pinned_rounding(torch.device(sys.argv[1]), int(sys.argv[3]))
print(json.dumps({"line": line, "settings": torch._C._accelerator_getAllocatorSettings()}))
"""


def knob(device: str, env: dict[str, str], case: str = "", recurring: int = 0) -> dict:
    """limit_pinned_rounding in a fresh process (the allocator config is process-wide), on this CPU build of torch,
    which stores the setting as a CUDA build would parse it but has no pinned allocator to apply it to."""
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    out = subprocess.run([sys.executable, "-c", KNOB, device, case, str(recurring)], env={**clean, **env}, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_each_gpu_rank_sets_the_limit_keeping_the_jobs_allocator_settings():
    seen = knob("cuda", {"PYTORCH_ALLOC_CONF": "garbage_collection_threshold:0.6"})
    assert seen["settings"] == "garbage_collection_threshold:0.6,pinned_max_cached_size_mb:1024"
    assert "above 1024 MiB take their own size" in seen["line"]
    assert knob("cuda", {})["settings"] == "pinned_max_cached_size_mb:1024"
    # a run whose offloaded layer inputs are 3 GB: the limit stays above them, so torch keeps caching them
    assert knob("cuda", {}, recurring=3_000_000_000)["settings"] == "pinned_max_cached_size_mb:2862"


def test_a_cpu_rank_or_the_jobs_own_limit_is_left_alone():
    assert knob("cpu", {}) == {"line": None, "settings": ""}
    own = knob("cuda", {"PYTORCH_ALLOC_CONF": "pinned_max_round_threshold_mb:64"})
    assert own["settings"] == "pinned_max_round_threshold_mb:64"
    assert "PYTORCH_ALLOC_CONF sets its own pinned-memory limit" in own["line"]


@pytest.mark.parametrize("case", ["old-torch", "refused"])
def test_an_older_torch_keeps_rounding_and_says_so_mocked_old_torch(case):
    seen = knob("cuda", {}, case)
    assert seen["settings"] == ""
    assert ("rounds every pinned allocation up to a power of two" in seen["line"] if case == "old-torch"
            else "could not set pinned_max_cached_size_mb:1024 (Unrecognized key" in seen["line"])


def test_offloaded_layer_inputs_are_pinned_one_buffer_each():
    """train.activation_checkpointing: offload keeps each checkpointed layer's input in its own pinned buffer
    (DeepSpeed's CheckpointHiddenStatesOffload): Llama-3-8B at 12,000 tokens, 98.3 MB each, takes 134.2 MB."""
    counts = counts_from_path(CONFIGS / "llama3_8b.json")
    setup = Setup(stage=3, world_size=8, gpus_per_node=8, dtype="bf16", seq_len=12_000,
                  activation_checkpointing=True, offload_checkpoints=True)
    one = 2 * 12_000 * counts.hidden_size
    assert one == 98_304_000
    held = {name: estimate_memory(counts, setup, margins=m).host["offloaded_checkpoints"]
            for name, m in (("new", NEW_TORCH), ("asked", AS_ASKED))}
    assert held["asked"] == 8 * (counts.num_layers - 3) * one
    assert held["new"] == 8 * (counts.num_layers - 3) * power_of_two_ceil(one) == 8 * 29 * 134_217_728


def test_a_cpu_run_is_planned_unpinned_and_a_gpu_run_with_this_torchs_limit(tmp_path):
    """The plan of a run follows its device: on CPU nothing is pinned; on GPUs torch 2.13's 1 GiB limit applies."""
    from launcher.contract.config import apply_overrides, validate_config
    from launcher.planning.memory_plan import margins_for

    raw = {"model": {"name_or_path": "org/model"}, "data": {"path": "d.jsonl", "format": "text", "seq_len": 16},
           "train": {"max_steps": 1, "micro_batch_size": 1, "grad_accum_steps": 1, "lr": 1e-3, "seed": 0},
           "launch": {"nodes": 1, "procs_per_node": 2, "device": "cpu"}, "output_dir": str(tmp_path / "run")}
    assert margins_for(validate_config(raw)).pinned_rounding is None
    gpu = validate_config(apply_overrides(raw, ["launch.device=cuda"]))
    assert margins_for(gpu).pinned_rounding == GIB


def test_the_plan_says_how_much_of_the_host_line_is_rounding():
    """Llama-3-70B at ZeRO-2 with the optimizer offloaded on one 8-GPU node: an older torch pins 68.7 GB for each of
    the 35.3 GB fp32 master and gradient and 34.4 GB for the 17.6 GB buffer of updated weights, 669 GB more on the
    node; the plan's note says so, and what removes it. With torch 2.13 there is nothing to say."""
    counts = counts_from_path(CONFIGS / "llama3_70b.json")
    setup = Setup(stage=2, world_size=8, gpus_per_node=8, dtype="bf16", offload_optimizer=True)
    share = -(-counts.total // 8)
    extra = 8 * sum(power_of_two_ceil(b) - b for b in (4 * share, 4 * share, 2 * share, 2 * counts.largest_tensor))
    note = f"{extra / 1e9:.1f} GB of host RAM per node is torch rounding pinned buffers up to a power of two"
    assert note.startswith("669.")
    assert f"{note}; torch >= 2.13 pins those above 1 GiB exactly" in estimate_memory(counts, setup,
                                                                                     margins=OLD_TORCH).notes
    assert not [n for n in estimate_memory(counts, setup, margins=NEW_TORCH).notes if "pinned" in n]


def test_a_run_pinning_large_layer_inputs_every_step_keeps_them_cached():
    """torch frees a pinned block above the limit instead of caching it, and page-locks the next one anew: slow, and
    freeing synchronizes the device. Offloaded layer inputs are pinned again every micro-batch past DeepSpeed's
    pool of 64, so a run whose inputs exceed 1 GiB (Llama-3-70B, 131,072 tokens on one rank: 2 GiB each) gets a
    limit just above them, and the plan rounds what that limit leaves below it."""
    assert limit_mb(0) == limit_mb(GIB) == 1024 and limit_mb(GIB + 1) == 1025 and limit_mb(3_000_000_000) == 2862
    assert run_rounding(GIB, 0) == GIB and run_rounding(GIB, 3_000_000_000) == 2862 * 2 ** 20
    assert run_rounding(None, 3_000_000_000) is None and run_rounding(ROUNDS_EVERYTHING, 1) == ROUNDS_EVERYTHING

    counts = counts_from_path(CONFIGS / "llama3_70b.json")
    setup = Setup(stage=3, world_size=64, gpus_per_node=8, dtype="bf16", seq_len=131_072, offload_optimizer=True,
                  activation_checkpointing=True, offload_checkpoints=True, fp32_accumulation=True)
    one = 2 * 131_072 * counts.hidden_size
    assert one == 2 * GIB
    held = estimate_memory(counts, setup, margins=NEW_TORCH).host
    assert held["offloaded_checkpoints"] == 8 * (counts.num_layers - 3) * one  # a power of two: its own size
    # the pieces between 1 GiB and 2 GiB now round: the 4.4 GB gradient partition does not, the sub-groups' 4 GB do not
    buffers = offload_buffers(counts, setup)
    assert held["offloaded_optimizer"] == 8 * by_hand(buffers, 2 * GIB)


def test_the_trainer_and_the_plan_agree_on_the_recurring_allocation(tmp_path):
    """recurring_pinned_bytes gives the trainer the resolved run's offloaded layer input, the size the plan used."""
    from launcher.contract.config import apply_overrides, validate_config
    from launcher.planning.memory_plan import recurring_pinned_bytes
    from launcher.planning.plan import resolve

    raw = {"model": {"name_or_path": "org/model"}, "data": {"path": "d.jsonl", "format": "text", "seq_len": 65_536},
           "train": {"max_steps": 1, "micro_batch_size": 1, "grad_accum_steps": 1, "lr": 1e-3, "seed": 0,
                     "activation_checkpointing": "offload"},
           "launch": {"nodes": 1, "procs_per_node": 8, "device": "cuda"}, "output_dir": str(tmp_path / "run")}
    model_config = json.loads((CONFIGS / "llama3_8b.json").read_text())
    cfg, _ = resolve(validate_config(raw))
    ds_config = {"zero_optimization": {"stage": 3}, "data_types": {"grad_accum_dtype": "fp32"}}
    assert recurring_pinned_bytes(cfg, model_config, ds_config) == 2 * 65_536 * 4096
    plain = validate_config(apply_overrides(raw, ["train.activation_checkpointing=true"]))
    assert recurring_pinned_bytes(resolve(plain)[0], model_config, ds_config) == 0
    assert recurring_pinned_bytes(cfg, None, ds_config) == 0
