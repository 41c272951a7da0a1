"""Stop requests from outside a running job.

A stop request is a SIGUSR1 or SIGTERM to any training process, or the run directory's STOP file (a
SLURM batch script on one node can reach every node through the shared filesystem; `shardtune stop
RUN_DIR` writes it too). Ranks agree on it once per step with one tiny collective, save a complete
checkpoint together, and exit 0 with the status saying "stopped", so torchrun does not restart them and
the launch script can requeue.
"""
from __future__ import annotations

import signal
from typing import Optional

from launcher.contract.run_dir import RunDir
from trainer.distributed import Dist, all_reduce_max


class StopRequest:
    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir
        self.signalled: Optional[str] = None

    def listen(self) -> None:
        """From now on SIGUSR1 and SIGTERM ask for a stop instead of ending the process (once training runs)."""
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        self.signalled = signal.Signals(signum).name

    def agreed(self, dist: Dist) -> Optional[str]:
        """Why every rank stops now, the same on all ranks: "signal" when any rank was signalled, "request" when
        rank 0 sees the STOP file; None to go on.

        The launch script requeues a stop by signal: SLURM's own preemption with a grace time signals the
        training processes, not the batch shell, and a job that ended as if a user had asked would be over.
        """
        signalled = 1.0 if self.signalled is not None else 0.0
        requested = 1.0 if dist.is_main and self.run_dir.stop_requested() else 0.0
        by_signal, by_request = all_reduce_max([signalled, requested], dist.device)
        return "signal" if by_signal > 0 else "request" if by_request > 0 else None

    def clear(self, dist: Dist) -> None:
        if dist.is_main:
            self.run_dir.clear_stop()
