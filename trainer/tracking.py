"""What a run tells the world, from global rank 0 only: metrics (the run directory's metrics file and Weights &
Biases), the progress bar, messages, the run's status and its preflight result.

Other ranks get a NullTracker that does nothing, so neither the loop nor the session asks which rank it is.
A wandb failure never stops training: the run falls back to offline, then to disabled, saying so once.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from launcher.contract.config import RunConfig
from launcher.contract.run_dir import RunDir, atomic_write


class NullTracker:
    """What every rank but global rank 0 gets."""

    run_id: Optional[str] = None

    def start(self, cfg: RunConfig, resume_step: int, run_id: Optional[str]) -> None:
        pass

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def log_with_next(self, metrics: dict[str, Any]) -> None:
        """Values to add to the next logged row (e.g. data statistics, known once per launch)."""

    def flush(self, step: int) -> None:
        """Log what waits for a next row that will not come (e.g. the measurements of the last save)."""

    def progress(self, step: int, postfix: Optional[dict[str, Any]] = None) -> None:
        pass

    def end_progress(self) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def finish(self, summary: Optional[dict[str, Any]] = None) -> None:
        pass

    def status(self, state: str, step: Optional[int], checkpoint: Optional[Path] = None, reason: str = "",
               **extra: Any) -> None:
        """The run's state for launch scripts and `shardtune status`: running, stopped, completed or failed."""

    def preflight_result(self, result: dict) -> None:
        """What the job's preflight found, for `shardtune preflight` to report."""


def wandb_mode(configured: str) -> str:
    """`auto` is online only when an API key is in the environment; otherwise offline."""
    if configured != "auto":
        return configured
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class Tracker(NullTracker):
    def __init__(self, run_dir: RunDir, max_steps: int):
        self.run_dir = run_dir
        self.max_steps = max_steps
        self.wandb = None
        self.bar = None
        self.pending: dict[str, Any] = {}

    def start(self, cfg: RunConfig, resume_step: int, run_id: Optional[str]) -> None:
        # Rows after the step we resume from belong to a rolled-back attempt; keep the file one timeline.
        self.run_dir.trim_metrics(resume_step)
        self._start_wandb(cfg, resume_step, run_id)
        from tqdm import tqdm

        # In a batch log (not a terminal) every redraw is a line: redraw rarely there.
        self.bar = tqdm(total=self.max_steps, initial=resume_step, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stderr, mininterval=1.0 if sys.stderr.isatty() else 30.0)

    def _start_wandb(self, cfg: RunConfig, resume_step: int, run_id: Optional[str]) -> None:
        mode = wandb_mode(cfg.wandb.mode)
        if mode == "disabled":
            return
        os.environ.setdefault("WANDB_DIR", str(self.run_dir.path))
        os.environ.setdefault("WANDB_SILENT", "true")
        # wandb-core flushes its offline log every 15 s by default; a killed job would lose up to that much.
        os.environ.setdefault("WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL", "1")
        try:
            import wandb

            self.wandb = self._init_wandb(wandb, cfg, mode, run_id)
        except Exception as exc:  # network, bad key, disk: never a reason to stop training
            if mode == "online":
                self.message(f"wandb: online init failed ({exc}); logging offline instead, "
                             f"sync later with `wandb sync`")
                try:
                    import wandb

                    self.wandb = self._init_wandb(wandb, cfg, "offline", run_id)
                    return
                except Exception as exc2:
                    exc = exc2
            self.message(f"wandb: disabled for this run ({exc}); metrics are still in {self.run_dir.metrics_file}")
            self.wandb = None

    def _init_wandb(self, wandb, cfg: RunConfig, mode: str, run_id: Optional[str]):
        # One run per job: the id outlives crashes that happen before the first checkpoint too.
        run_id = run_id or self.run_dir.read_wandb_id()
        run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity,
                         name=cfg.wandb.name or Path(cfg.output_dir).name, group=cfg.wandb.group,
                         tags=cfg.wandb.tags or None, config=cfg.model_dump(mode="json"), mode=mode,
                         id=run_id, resume="allow" if run_id else None, dir=str(self.run_dir.path))
        self.run_id = run.id
        self.run_dir.write_wandb_id(run.id)
        return run

    def log_with_next(self, metrics: dict[str, Any]) -> None:
        self.pending.update(metrics)

    def flush(self, step: int) -> None:
        if self.pending:
            self.log(step, {})

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        metrics, self.pending = {**metrics, **self.pending}, {}
        self.run_dir.append_metrics({"step": step, **metrics, "time": round(time.time(), 3)})
        if self.wandb is not None:
            try:
                self.wandb.log(metrics, step=step)
            except Exception as exc:
                self.message(f"wandb: log failed ({exc}); disabling wandb, "
                             f"metrics continue in {self.run_dir.metrics_file}")
                self.wandb = None

    def progress(self, step: int, postfix: Optional[dict[str, Any]] = None) -> None:
        """Move the bar; the postfix (loss, tok/s) changes only on log steps and stays put between them."""
        if self.bar is not None:
            if postfix is None and self.bar.n == step:
                return  # this step's log already drew it
            self.bar.n = step
            if postfix is not None:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.refresh()

    def end_progress(self) -> None:
        """Training is over: later messages (export, summary, sample) print plainly, without the bar redrawn."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def finish(self, summary: Optional[dict[str, Any]] = None) -> None:
        self.end_progress()
        if self.wandb is not None:
            try:
                if summary:
                    self.wandb.summary.update(summary)
                self.wandb.finish()
                import wandb

                wandb.teardown()  # its service; ranks end without atexit hooks (exit_without_teardown)
            except Exception as exc:
                self.message(f"wandb: finish failed ({exc})")
            self.wandb = None


    def status(self, state: str, step: Optional[int], checkpoint: Optional[Path] = None, reason: str = "",
               **extra: Any) -> None:
        self.run_dir.write_status(state, step, checkpoint, reason, **extra)

    def preflight_result(self, result: dict) -> None:
        atomic_write(self.run_dir.preflight_file, json.dumps(result, indent=1) + "\n")


def make_tracker(is_main: bool, run_dir: RunDir, max_steps: int) -> NullTracker:
    return Tracker(run_dir, max_steps) if is_main else NullTracker()
