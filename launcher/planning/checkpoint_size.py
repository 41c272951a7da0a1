"""How big one checkpoint is, and whether it can be written before SLURM kills a preempted job.

On SLURM a job gets `slurm.signal_lead_s` seconds between the time limit's warning and the kill, and its
partition's GraceTime when SLURM preempts it. A checkpoint that takes longer to write than that is lost on
every preemption, with all the work since the last periodic save; the plan says so before the job is queued.
Bytes per parameter, as DeepSpeed 0.19 writes them (measured on disk for stages 0-3 in fp32 and bf16, with
and without optimizer offload; bench/io.py checks a 200M model):

    stage 0    module weights (p) + Adam moments (8), + an fp32 master (4) when training in bf16/fp16
    stage 1-2  module weights (p) + fp32 master (4) + Adam moments (8): the module file is written once
    stage 3    fp32 master (4) + Adam moments (8): the module files hold placeholders only

with p = 4 for fp32 and 2 for bf16/fp16. Offloading changes where the state lives, not its size. Who writes
what: the module file comes from data-parallel rank 0 alone (at stage 0 with the optimizer state in it), the
optimizer partitions of stages 1-3 from every rank, 12·Ψ/N bytes each. A background save
(`train.async_save`) first copies each rank's share into host memory and keeps those buffers for the next
save, so the node with rank 0 holds the largest share for the rest of the run.

A run's checkpoints and export share one filesystem, usually a shared one with other users on it. Its peak
footprint is `train.keep_last` + 1 checkpoints (the newest is written before the oldest is pruned), or
keep_last of them and the export (written after the last save's pruning), whichever is larger.
`plan` compares that with the free space it sees; every rank's preflight does again at job start, and fails
the job when the next save cannot fit at all, before the model loads and hours are trained that could never
be saved. Free space does not show a quota (on Lustre, GPFS or NFS home and project directories the usual limit),
so rank 0's preflight then reserves one checkpoint's bytes for a moment (reserve_problem).
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from launcher.backends.slurm import Preemption
from launcher.contract.config import RunConfig
from launcher.contract.run_dir import MANIFEST, RunDir
from launcher.planning.memory import PARAM_BYTES

FIXED_BYTES = 5_000_000  # tokenizer, config, RNG states and pickled bookkeeping: small next to any real model
SAFETY = 1.5  # a save must fit the preemption window this many times over: storage is shared and uneven


def rank_zero_bytes(params: int, stage: int, dtype: str) -> int:
    """Bytes of the module file, which data-parallel rank 0 alone writes (stage 3: placeholders only)."""
    p = PARAM_BYTES[dtype]
    if stage == 0:
        return (p + 8 + (4 if p < 4 else 0)) * params
    return 0 if stage == 3 else p * params


def partition_bytes(params: int, stage: int, world_size: int) -> int:
    """Bytes of one rank's optimizer partition (fp32 master + Adam moments); stage 0 does not partition."""
    return 0 if stage == 0 else -(-12 * params // world_size)


def checkpoint_bytes(params: int, stage: int, dtype: str) -> int:
    """Bytes one checkpoint of `params` parameters takes on disk, all ranks together."""
    return rank_zero_bytes(params, stage, dtype) + (12 * params if stage else 0) + FIXED_BYTES


def snapshot_bytes_per_node(params: int, stage: int, dtype: str, world_size: int, ranks_per_node: int) -> int:
    """Host memory a background save's copies hold on the node of rank 0 (the largest share), all run long."""
    ranks = min(ranks_per_node, world_size)
    return rank_zero_bytes(params, stage, dtype) + ranks * partition_bytes(params, stage, world_size)


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


def grace_warning(ckpt: CheckpointPlan, preemption: Optional[Preemption], storage_gbps: float) -> str:
    """SLURM's own preemption gives a job its partition's GraceTime to save, not `slurm.signal_lead_s`: a warning
    when one checkpoint does not fit in it (empty when it does, or the partition gives no grace time)."""
    need = ckpt.write_seconds * SAFETY
    if preemption is None or need <= preemption.grace_s:
        return ""
    return (f"partition {preemption.partition} preempts jobs (PreemptMode={preemption.mode}) with "
            f"GraceTime={preemption.grace_s} s, but one checkpoint is {ckpt.gb:,.1f} GB and takes about "
            f"{ckpt.write_seconds:,.0f} s to write at launch.storage_gbps {storage_gbps:g} GB/s (with {SAFETY:g}x "
            f"margin {need:,.0f} s): a preempted job would lose its work since the last periodic save. Save more "
            f"often (train.save_every), use a partition that is not preempted, or set launch.storage_gbps to your "
            f"storage's measured bandwidth (each save logs save_gbps)")


EXPORT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
"""Bytes per parameter of the export, by the model config's dtype (the export's `auto`); anything else is fp32."""


def saves_planned(max_steps: int, save_every: int) -> int:
    """Checkpoints a run writes: every save_every steps before the end, and one at the end."""
    return (max_steps - 1) // save_every + 1 if save_every else 1


@dataclass(frozen=True)
class DiskNeed:
    """What the run directory's filesystem must hold for the run's checkpoints and its export."""

    checkpoint: int
    """Bytes of one checkpoint."""
    at_once: int
    """Checkpoints on disk together while the newest is written: keep_last + 1 (fewer if fewer saves)."""
    kept: int
    """Checkpoints beside the export, which is written after the last save's pruning: keep_last (or fewer)."""
    export: int
    """Bytes of the exported model."""
    present: int = 0
    """Complete checkpoints the run directory already holds (a resumed run): their bytes are already used."""
    universal: int = 0
    """Bytes of the universal copy a resume on another world size converts its checkpoint to (kept beside it)."""

    @property
    def peak(self) -> int:
        return max(self.at_once * self.checkpoint, self.kept * self.checkpoint + self.export) + self.universal

    @property
    def more(self) -> int:
        """Bytes still to be written at the peak: never less than the next checkpoint."""
        return max(self.checkpoint, self.peak - min(self.present, self.at_once) * self.checkpoint)

    def describe(self) -> str:
        """The larger of the two moments, in words, and what it adds to what the run directory holds."""
        def checkpoints(n: int) -> str:
            return f"{n} checkpoint{'s' if n > 1 else ''} of {self.checkpoint / 1e9:,.1f} GB"

        if self.at_once * self.checkpoint >= self.kept * self.checkpoint + self.export:
            peak = f"{checkpoints(self.at_once)} at once (the newest is written before the oldest is removed)"
        else:
            peak = f"{checkpoints(self.kept)} and the export of {self.export / 1e9:,.1f} GB beside them"
        if self.universal:
            peak += f", and the universal copy of {self.universal / 1e9:,.1f} GB a resume on another world size makes"
        held = f", of which the run directory holds {self.present} checkpoint(s) already" if self.present else ""
        return f"{peak}{held}: {self.more / 1e9:,.1f} GB more at the peak"


def disk_need(cfg: RunConfig, params: int, model_cfg: Optional[dict[str, Any]], run_dir: RunDir) -> DiskNeed:
    """The footprint of a resolved run's checkpoints and export, from its parameter count, its save settings and
    what `run_dir` already holds.

    `resume: never` moves earlier results aside rather than deleting them, so they count for nothing. A resume
    from a checkpoint another world size wrote (stages 1-3) converts it to DeepSpeed's universal format first, a
    copy of about the checkpoint's size (12 bytes per parameter and the module file)."""
    t = cfg.train
    export_dtype = str((model_cfg or {}).get("dtype") or (model_cfg or {}).get("torch_dtype") or "float32")
    saves = saves_planned(t.max_steps, t.save_every)
    size = checkpoint_bytes(params, int(cfg.zero.stage), t.precision)
    held = [] if t.resume == "never" else run_dir.complete_checkpoints()
    source = Path(t.resume) if t.resume not in ("auto", "never") else (held[0] if held else None)
    converts = source is not None and int(cfg.zero.stage) > 0 and written_by(source) not in (None,
                                                                                           cfg.launch.world_size)
    return DiskNeed(size, min(t.keep_last + 1, saves), min(t.keep_last, saves),
                    EXPORT_BYTES.get(export_dtype, 4) * params, len(held), size if converts else 0)


def written_by(ckpt: Path) -> Optional[int]:
    """The world size that wrote a complete checkpoint, from its manifest (None when it cannot be read)."""
    try:
        return int(json.loads((Path(ckpt) / MANIFEST).read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def free_space(path: Path) -> Optional[tuple[str, int]]:
    """(the nearest existing directory at or above `path`, bytes an unprivileged user may still write there);
    None where the filesystem does not say (a FUSE mount reporting no blocks) or cannot be asked."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    if st.f_blocks == 0:
        return None
    return str(path), st.f_bavail * st.f_frsize


def size_text(n: int) -> str:
    """Bytes as a person reads them: GB from 1 GB, else MB."""
    return f"{n / 1e9:,.2f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


OUT_OF_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""What a write past a full filesystem, a quota or a file-size limit (RLIMIT_FSIZE) fails with."""
RESERVE_FILE_BYTES = 64 << 30
"""The most reserve_problem reserves in one file: below any filesystem's largest file (ext4's is 16 TiB)."""


def reserve_problem(path: Path, nbytes: int, what: str) -> Optional[str]:
    """Why `nbytes` cannot be written at `path` (its nearest existing directory) although the free space says they
    fit; None when they can be, or when the filesystem cannot be asked. A quota is not in the free space a
    filesystem reports, so a run under one saw room for its checkpoints and failed its first save hours in.

    The bytes are reserved with fallocate in unnamed files (O_TMPFILE), which no crash can leave behind, then
    released; nothing is written. RESERVE_FILE_BYTES at most per file: a checkpoint is many files, and one file
    of a run's terabytes could pass a filesystem's largest file size. Filesystems without fallocate or O_TMPFILE
    (NFS before 4.2, some FUSE mounts) cannot say, and are not refused: glibc's posix_fallocate would emulate
    fallocate by writing every byte, so it is not used."""
    found = free_space(path)
    if found is None or nbytes <= 0:
        return None
    where, free = found
    try:
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    except AttributeError:  # a C library without fallocate
        return None
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    held: list[int] = []
    code = 0
    try:
        for start in range(0, nbytes, RESERVE_FILE_BYTES):
            held.append(os.open(where, os.O_TMPFILE | os.O_WRONLY, 0o600))
            if fallocate(held[-1], 0, 0, min(RESERVE_FILE_BYTES, nbytes - start)) != 0:
                code = ctypes.get_errno()
                break
    except (OSError, AttributeError):  # no O_TMPFILE here (not Linux, or the filesystem lacks it)
        return None
    finally:
        for fd in held:
            os.close(fd)
    if code not in OUT_OF_ROOM:
        return None
    return (f"{where}: {what} ({size_text(nbytes)}) cannot be written there ({os.strerror(code)}), though its "
            f"filesystem reports {size_text(free)} free: a quota (or a file-size limit) that the free space does "
            f"not show")


def disk_verdict(need: DiskNeed, free: Optional[tuple[str, int]]) -> tuple[str, str]:
    """(a problem: the next save cannot fit at all, a warning: a later save or the export may not); "" for none.

    Free space on a shared filesystem changes while a job runs, and per-user quotas are not visible here, so
    only the certain failure is a problem."""
    if free is None:
        return "", ""
    where, nbytes = free
    have = f"{where} has {nbytes / 1e9:,.1f} GB free"
    if nbytes < need.checkpoint:
        return (f"{have}, less than one checkpoint ({need.checkpoint / 1e9:,.1f} GB): the first save would fail. "
                f"Free space there, or set output_dir on a filesystem with room for {need.describe()}"), ""
    if nbytes < need.more:
        return "", (f"{have}, but the run needs {need.describe()}: a later save or the export may fail with the "
                    f"filesystem full (the previous checkpoint stays in charge). Free space there, lower "
                    f"train.keep_last, or use another output_dir")
    return "", ""


def reserve_verdict(need: DiskNeed, free: Optional[tuple[str, int]], path: Path) -> tuple[str, str]:
    """disk_verdict's two findings again where the free space shows room but a quota may leave none: reserving one
    checkpoint (a problem when refused) and, where the free space shows room for it, all the run still writes (a
    warning). Asked once per run, by rank 0: ranks reserving at once on one shared filesystem would refuse each
    other."""
    first, later = disk_verdict(need, free)
    if first:
        return "", ""
    problem = reserve_problem(path, need.checkpoint, "one checkpoint")
    if problem:
        return (f"{problem}. The first save would fail: free space under the quota (`lfs quota -u $USER DIR`, "
                f"`quota` or your site's tool shows it), or set output_dir on a filesystem with room"), ""
    more = None if later or need.more <= need.checkpoint else reserve_problem(path, need.more, need.describe())
    return "", (f"{more}. A later save or the export may fail (the previous checkpoint stays in charge): free "
                f"space under the quota, lower train.keep_last, or use another output_dir" if more else "")
