"""How big one checkpoint is, and whether it can be written before SLURM kills a preempted job.

On SLURM a job gets `slurm.signal_lead_s` seconds between the warning and the kill. A checkpoint that takes
longer to write than that is lost on every preemption, with all the work since the last periodic save; the
plan says so before the job is queued. Bytes per parameter, as DeepSpeed 0.19 writes them (measured on disk
for stages 0-3 in fp32 and bf16, with and without optimizer offload; bench/io.py checks a 200M model):

    stage 0    module weights (p) + Adam moments (8), + an fp32 master (4) when training in bf16/fp16
    stage 1-2  module weights (p) + fp32 master (4) + Adam moments (8): the module file is written once
    stage 3    fp32 master (4) + Adam moments (8): the module files hold placeholders only

with p = 4 for fp32 and 2 for bf16/fp16. Offloading changes where the state lives, not its size.
"""
from __future__ import annotations

from dataclasses import dataclass

from launcher.planning.memory import PARAM_BYTES

FIXED_BYTES = 5_000_000  # tokenizer, config, RNG states and pickled bookkeeping: small next to any real model
SAFETY = 1.5  # a save must fit the preemption window this many times over: storage is shared and uneven


def checkpoint_bytes(params: int, stage: int, dtype: str) -> int:
    """Bytes one checkpoint of `params` parameters takes on disk, all ranks together."""
    p = PARAM_BYTES[dtype]
    if stage == 3:
        per_param = 12
    elif stage == 0:
        per_param = p + 8 + (4 if p < 4 else 0)
    else:
        per_param = p + 12
    return per_param * params + FIXED_BYTES


@dataclass(frozen=True)
class CheckpointPlan:
    gb: float
    """Size of one checkpoint, GB (1e9 bytes)."""
    write_seconds: float
    """At launch.storage_gbps."""
    warning: str = ""

    def to_json(self) -> dict:
        return {"checkpoint_gb": round(self.gb, 3), "checkpoint_write_s": round(self.write_seconds, 1)}


def plan_checkpoint(params: int, stage: int, dtype: str, storage_gbps: float,
                    signal_lead_s: int | None = None) -> CheckpointPlan:
    """Size and write time of one checkpoint; on SLURM (signal_lead_s given) a warning when it may not fit."""
    gb = checkpoint_bytes(params, stage, dtype) / 1e9
    seconds = gb / storage_gbps
    warning = ""
    if signal_lead_s is not None and seconds * SAFETY > signal_lead_s:
        warning = (f"one checkpoint is {gb:,.1f} GB and takes about {seconds:,.0f} s to write at "
                   f"launch.storage_gbps {storage_gbps:g} GB/s, but slurm.signal_lead_s gives it {signal_lead_s} s "
                   f"between SLURM's warning and the kill (with {SAFETY:g}x margin it needs {seconds * SAFETY:,.0f} s):"
                   f" a preempted job would lose its work since the last periodic save. Raise slurm.signal_lead_s to "
                   f"at least {int(seconds * SAFETY) + 1}, set launch.storage_gbps to your storage's measured "
                   f"bandwidth (each save logs save_gbps), or save more often (train.save_every)")
    return CheckpointPlan(gb, seconds, warning)
