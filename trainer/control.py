"""Requests from outside a running job, and what the job tells the outside when it ends.

A stop request is a SIGUSR1 or SIGTERM to any training process, or a file named STOP in the run
directory (a SLURM batch script on one node can reach every node through the shared filesystem;
`shardtune stop RUN_DIR` writes it too). Ranks agree on it once per step with one tiny collective,
save a complete checkpoint together, and exit 0 with status.json saying "stopped", so torchrun does
not restart them and the launch script can requeue.
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Optional

from launcher.layout import STATUS_FILE, STOP_FILE
from trainer.checkpoint import atomic_write
from trainer.distributed import Dist, all_reduce_max


class StopRequest:
    def __init__(self, run_dir: Path):
        self.file = run_dir / STOP_FILE
        self.signalled: Optional[str] = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        self.signalled = signal.Signals(signum).name

    def agreed(self, dist: Dist) -> bool:
        """True on every rank when any rank was signalled or rank 0 sees the STOP file."""
        local = self.signalled is not None or (dist.is_main and self.file.exists())
        return all_reduce_max([1.0 if local else 0.0], dist.device)[0] > 0

    def clear(self, dist: Dist) -> None:
        if dist.is_main:
            self.file.unlink(missing_ok=True)


def write_status(run_dir: Path, dist: Dist, state: str, step: Optional[int], checkpoint: Optional[Path] = None,
                 reason: str = "") -> None:
    """status.json: running | stopped | completed | failed, read by launch.sh, sbatch scripts and `shardtune status`."""
    if not dist.is_main:
        return
    status = {"state": state, "step": step, "checkpoint": str(checkpoint) if checkpoint else None,
              "reason": reason, "time": time.time()}
    atomic_write(run_dir / STATUS_FILE, json.dumps(status) + "\n")
