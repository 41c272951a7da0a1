"""Fault injection for tests: make a rank fail in a chosen way at a chosen step.

Real failures (a NaN on one rank, a kill in the middle of a save, a rank stuck in its data loader)
cannot be timed from outside a process, so tests set SHARDTUNE_FAULTS, e.g.

    SHARDTUNE_FAULTS="nan_loss@5:1,kill_in_save@6:0,fake_version@0:1=transformers/0.0.1"

meaning: at optimizer step 5 rank 1's loss becomes NaN; while saving step 6, rank 0 SIGKILLs
itself after the shards are written and before the checkpoint is committed; rank 1's preflight
reports transformers 0.0.1 (step 0: at start-up). Step -1 means any step (for a save whose step a test
cannot know, such as the one a preemption asks for). A fault fires only in
the first attempt of a run (torchrun's restart count 0), so a restarted job can show recovery.
Without the variable every hook is a no-op.
"""
from __future__ import annotations

import atexit
import errno
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int
    arg: str = ""


def _parse(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        item, _, arg = item.partition("=")
        kind, _, where = item.partition("@")
        step, _, rank = where.partition(":")
        faults.append(Fault(kind, int(step), int(rank or 0), arg))
    return faults


ACTIVE = (_parse(os.environ.get("SHARDTUNE_FAULTS", ""))
          if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" else [])


def _armed(kind: str, step: int, rank: int) -> list[Fault]:
    return [f for f in ACTIVE if f.kind == kind and f.step in (step, -1) and f.rank == rank]


def fires(kind: str, step: int, rank: int) -> bool:
    return bool(_armed(kind, step, rank))


_READ_FAILED: set[int] = set()


def unreadable_once(rank: int, path: Path) -> None:
    """unreadable_once@0:RANK: this rank's first read while verifying a checkpoint fails with EIO, as a shared
    filesystem whose server is briefly gone makes it; the next read works."""
    if fires("unreadable_once", 0, rank) and rank not in _READ_FAILED:
        _READ_FAILED.add(rank)
        raise OSError(errno.EIO, "Input/output error (injected)", str(path))


def corrupt_loss(loss, step: int, rank: int):
    """nan_loss / inf_loss: this rank's loss for this step becomes non-finite."""
    if fires("nan_loss", step, rank):
        return loss * float("nan")
    if fires("inf_loss", step, rank):
        return loss * float("inf")
    return loss


def maybe_kill(kind: str, step: int, rank: int) -> None:
    """kill_in_save / crash: die at once, as a node failure or the OOM killer would."""
    if fires(kind, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_freeze(kind: str, step: int, rank: int) -> None:
    """freeze / freeze_at_exit: SIGSTOP this whole process, watchdog thread included, as a wedged driver call or
    an uninterruptible read would freeze it; only something outside the process can end it."""
    if fires(kind, step, rank):
        os.kill(os.getpid(), signal.SIGSTOP)


def maybe_hang(kind: str, step: int, rank: int) -> None:
    """hang_in_data: sleep forever, as a rank stuck on a dead filesystem would."""
    if fires(kind, step, rank):
        while True:
            time.sleep(3600)


def fake_versions(rank: int) -> dict[str, str]:
    """fake_version@0:RANK=package/version: that rank's preflight reports another library version."""
    return dict(f.arg.split("/", 1) for f in ACTIVE if f.kind == "fake_version" and f.rank == rank)


def unwritable_dir(rank: int) -> Path | None:
    """unwritable_output@0:RANK: that rank's write check targets a directory the OS refuses to create."""
    unwritable = any(f.kind == "unwritable_output" and f.rank == rank for f in ACTIVE)
    return Path("/proc/shardtune-unwritable") if unwritable else None


def unbuildable_ops(rank: int) -> list[str]:
    """unbuildable_op@0:RANK=fused_adam: that rank's preflight reports the op cannot be built (no GPU here)."""
    return [f"{f.arg}: simulated by SHARDTUNE_FAULTS" for f in ACTIVE if f.kind == "unbuildable_op" and f.rank == rank]


def slow_down(kind: str, step: int, rank: int) -> None:
    """slow_export@0:RANK=SECONDS (and the like): that rank sleeps this long at that point, working slowly."""
    for f in ACTIVE:
        if f.kind == kind and f.step == step and f.rank == rank:
            time.sleep(float(f.arg or 60))


class FaultHooks:
    """The training loop's fault-injection points for one rank: each does nothing unless a fault is armed.

    Made once per rank, it says so on that rank's stderr when SHARDTUNE_FAULTS arms something for it, so a
    run with injected faults can never pass for a normal one.
    """

    def __init__(self, rank: int = 0):
        self.rank = rank
        self._slowed, self._stalled = 0.0, False
        self._failed_once: set[str] = set()
        armed = [f for f in ACTIVE if f.rank == rank]
        if armed:
            listed = ", ".join(f"{f.kind}@{f.step}" + (f"={f.arg}" if f.arg else "") for f in armed)
            print(f"shardtune: fault injection armed on rank {rank}: {listed} (SHARDTUNE_FAULTS)", file=sys.stderr,
                  flush=True)

    def _arg(self, kind: str, step: int) -> float:
        return float(_armed(kind, step, self.rank)[0].arg or 60)

    def step_started(self, step: int) -> None:
        maybe_kill("crash", step, self.rank)
        maybe_freeze("freeze", step, self.rank)

    def exiting(self) -> None:
        maybe_freeze("freeze_at_exit", 0, self.rank)
        if fires("abort_in_teardown", 0, self.rank):
            # abort_in_teardown@0:RANK: this rank's interpreter teardown aborts, as a gloo worker thread that touched
            # Python while the interpreter was being finalized once made a rank of a completed run abort.
            atexit.register(os.abort)

    def loading_batch(self, step: int) -> None:
        maybe_hang("hang_in_data", step, self.rank)

    def loss(self, loss, step: int):
        return corrupt_loss(loss, step, self.rank)

    def saving(self, step: int) -> None:
        maybe_kill("kill_in_save", step, self.rank)

    def writing(self, step: int, nbytes: int) -> None:
        """Called as checkpoint bytes are written (also from the background writer).

        kill_in_write: die in the middle of writing the checkpoint; fail_write: the write fails as a full
        filesystem fails it (ENOSPC), once, and the rank lives on; slow_save=S: write slowly, sleeping 1 s at a
        time until S seconds have passed (progress continues); stall_save=S: stop for S seconds without progress.
        """
        maybe_kill("kill_in_write", step, self.rank)
        self._fail_once("fail_write", step)
        if fires("slow_save", step, self.rank) and self._slowed < self._arg("slow_save", step):
            time.sleep(1.0)
            self._slowed += 1.0
        if fires("stall_save", step, self.rank) and not self._stalled:
            self._stalled = True
            time.sleep(self._arg("stall_save", step))

    def verified(self, ckpt: Path, rank: int) -> None:
        """flip_after_verify@0:RANK: after the checkpoint was verified and before it is loaded, one byte of this
        rank's optimizer shard changes (a disk fault or someone else's write in the gap between the two)."""
        if fires("flip_after_verify", 0, rank):
            shard = sorted(ckpt.glob(f"*rank_{rank}_*optim_states.pt")) or sorted(ckpt.glob("*model_states.pt"))
            data = bytearray(shard[0].read_bytes())
            data[len(data) // 2] ^= 0xFF
            shard[0].write_bytes(bytes(data))

    def exporting(self) -> None:
        slow_down("slow_export", 0, self.rank)

    def export_written(self, nbytes: int) -> None:
        """fail_export_write@0:RANK: that rank's first write into the export fails as a full filesystem fails it."""
        if nbytes:
            self._fail_once("fail_export_write", 0)

    def _fail_once(self, kind: str, step: int) -> None:
        """The first time `kind` fires here, raise what a full filesystem raises (ENOSPC); the rank lives on."""
        if fires(kind, step, self.rank) and kind not in self._failed_once:
            self._failed_once.add(kind)
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected: {kind}@{step}:{self.rank})")

    def sampling(self) -> None:
        """fail_sample@0:0: the end-of-run sample reply raises (it loads and runs the whole model on one CPU)."""
        if fires("fail_sample", 0, self.rank):
            raise RuntimeError("injected fault: the sample reply failed")
