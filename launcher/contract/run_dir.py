"""The run directory: every file in it is named here, and read and written only through here.

The launcher writes the plan, the trainer on every rank writes progress, and `shardtune status`, the
sbatch script, tests and benchmarks read them back, often on different machines. One module that names
each file and owns its format keeps them agreeing. Torch-free, so a login node can inspect a run.

    resolved_config.yaml, ds_config.json, launch.sh | launch.sbatch    the run as planned
    metrics.jsonl, status.json, STOP, wandb_run_id, preflight.json       progress and control
    heartbeats/rank_R.json, stacks/rank_R.txt, nccl_traces/             liveness and post-mortems
    checkpoints/step_XXXXXXXX/ (+ LATEST, latest), final/, slurm-JOB.out, slurm_jobs.json, requeues.json
"""
from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

# The run as planned.
CONFIG = "resolved_config.yaml"
DS_CONFIG = "ds_config.json"
SCRIPTS = {"torchrun": "launch.sh", "slurm": "launch.sbatch"}
# Progress and control.
METRICS = "metrics.jsonl"
STATUS = "status.json"
STOP = "STOP"
WANDB_ID = "wandb_run_id"
PREFLIGHT = "preflight.json"
PREFLIGHT_PROBES = ".preflight"
SLURM_JOBS = "slurm_jobs.json"
REQUEUES = "requeues.json"
SLURM_LOG = "slurm-{job}.out"
# Liveness and post-mortems.
HEARTBEATS = "heartbeats"
STACKS = "stacks"
NCCL_TRACES = "nccl_traces"
# Checkpoints and the result.
CHECKPOINTS = "checkpoints"
FINAL = "final"
LATEST = "LATEST"
DS_LATEST = "latest"  # DeepSpeed's own pointer, for zero_to_fp32.py and load_checkpoint(tag=None)
TAG_PREFIX = "step_"
UNIVERSAL_SUFFIX = ".universal"
# Inside a checkpoint.
MANIFEST = "COMPLETE.json"
TRAINER_STATE = "trainer_state.json"
RNG = "rng"
HF = "hf"
OWNER = "owner.json"
EVENTS = "events.jsonl"
# An earlier run's results, moved aside by train.overwrite.
REPLACED = "replaced-{time}"


def atomic_write(path: Path, text: str) -> None:
    """Write, fsync, rename, fsync the directory: readers see the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename into it) durable. Filesystems that cannot fsync a directory say so
    with EINVAL: there is nothing more to do on them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def sync_tree(root: Path) -> None:
    """fsync every file and directory under root, deepest first. A directory built under a temporary name and
    then renamed into place must be durable before the rename: after a crash the name would otherwise point
    at files the filesystem never wrote (empty or truncated), which look like a finished result. Files
    already synced cost almost nothing."""
    for top, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(top, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(top))


def read_json(path: Path) -> Optional[Any]:
    """A JSON file's content, or None when it is missing or half-written."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ---- checkpoints: names of step directories and of the files inside one


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def is_step_dir(path: Path) -> bool:
    return path.is_dir() and path.name.startswith(TAG_PREFIX) and path.name[len(TAG_PREFIX):].isdigit()


def step_of(path: Path) -> int:
    return int(path.name[len(TAG_PREFIX):])


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoints with a manifest, newest first (their files are not verified here)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if is_step_dir(p) and (p / MANIFEST).is_file()), key=step_of, reverse=True)


def partial_checkpoints(root: Path) -> list[Path]:
    """Step directories without a manifest: saves that did not finish."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if is_step_dir(p) and not (p / MANIFEST).exists()), key=step_of)


def rng_file(ckpt: Path, rank: int) -> Path:
    return ckpt / RNG / f"rank_{rank:05d}.pt"


class RunDir:
    """One run directory and the files in it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- the run as planned

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def ds_config_file(self) -> Path:
        return self.path / DS_CONFIG

    def script(self, backend: str) -> Path:
        """launch.sh (torchrun) or launch.sbatch (slurm)."""
        return self.path / SCRIPTS[backend]

    def write_plan(self, config_yaml: str, ds_config: dict, backend: str, script_text: str) -> Path:
        """The resolved config, the DeepSpeed config and the launch script; returns the script's path."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(config_yaml)
        self.ds_config_file.write_text(json.dumps(ds_config, indent=2) + "\n")
        script = self.script(backend)
        script.write_text(script_text)
        script.chmod(0o755)
        return script

    def read_config(self) -> dict:
        import yaml

        return yaml.safe_load(self.config_file.read_text()) or {}

    def read_ds_config(self) -> dict:
        return json.loads(self.ds_config_file.read_text())

    # -- metrics: one JSON object per logged step

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_file, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def _written_rows(self) -> list[dict]:
        """The metrics file's rows as written, one per line."""
        if not self.metrics_file.exists():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line.strip()]

    def read_metrics(self) -> list[dict]:
        """One row per logged step, as wandb's history shows it: rows logged one after another at the same step
        (the last save's measurements after the last training step, a final eval) are merged, later keys winning."""
        rows: list[dict] = []
        for row in self._written_rows():
            if rows and rows[-1].get("step") == row.get("step"):
                rows[-1].update(row)
            else:
                rows.append(row)
        return rows

    def train_metrics(self) -> list[dict]:
        """Rows of training steps (eval rows and the like have no throughput)."""
        return [row for row in self.read_metrics() if "tokens_per_sec" in row]

    def step_end_times(self) -> list[float]:
        """When each training step's row was logged, in step order: the wall time a step ended.

        Read from the rows as written, not merged: a row merged with the last save's measurements carries the time
        that save ended, and a benchmark timing steps from it counted the save as part of the last step.
        """
        ends = {row["step"]: row["time"] for row in self._written_rows() if "tokens_per_sec" in row}
        return [ends[step] for step in sorted(ends)]

    def losses(self) -> dict[int, float]:
        """step -> training loss (None for a skipped step)."""
        return {row["step"]: row["loss"] for row in self.read_metrics() if "loss" in row}

    def trim_metrics(self, last_step: int) -> None:
        """Drop rows after last_step: they belong to an attempt that was rolled back, not to this timeline."""
        if not self.metrics_file.exists():
            return
        rows = [line for line in self.metrics_file.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= last_step]
        tmp = self.metrics_file.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(r + "\n" for r in rows))
        os.replace(tmp, self.metrics_file)

    # -- status and stop requests

    @property
    def status_file(self) -> Path:
        return self.path / STATUS

    def write_status(self, state: str, step: Optional[int], checkpoint: Optional[Path] = None, reason: str = "",
                     **extra: Any) -> None:
        """status.json: running | stopped | completed | failed, read by launch scripts and `shardtune status`."""
        status = {"state": state, "step": step, "checkpoint": str(checkpoint) if checkpoint else None,
                  "reason": reason, "time": time.time(), **extra}
        atomic_write(self.status_file, json.dumps(status) + "\n")

    def read_status(self) -> Optional[dict]:
        return read_json(self.status_file)

    @property
    def stop_file(self) -> Path:
        return self.path / STOP

    def request_stop(self) -> None:
        self.stop_file.touch()

    def stop_requested(self) -> bool:
        return self.stop_file.exists()

    def clear_stop(self) -> None:
        self.stop_file.unlink(missing_ok=True)

    # -- wandb, preflight, SLURM jobs

    def read_wandb_id(self) -> Optional[str]:
        path = self.path / WANDB_ID
        return path.read_text().strip() or None if path.exists() else None

    def write_wandb_id(self, run_id: str) -> None:
        (self.path / WANDB_ID).write_text(run_id + "\n")

    @property
    def preflight_file(self) -> Path:
        return self.path / PREFLIGHT

    @property
    def preflight_probes(self) -> Path:
        """Where each rank proves it can write to the run directory."""
        return self.path / PREFLIGHT_PROBES

    def read_jobs(self) -> list[dict]:
        """Jobs submitted for a run, oldest first."""
        return read_json(self.path / SLURM_JOBS) or []

    def record_job(self, job_id: str) -> None:
        jobs = self.read_jobs() + [{"job_id": job_id, "submitted": time.time()}]
        (self.path / SLURM_JOBS).write_text(json.dumps(jobs, indent=1) + "\n")

    @property
    def requeue_file(self) -> Path:
        """A SLURM job's attempts without progress in a row (launcher/backends/requeue.py owns its format)."""
        return self.path / REQUEUES

    def slurm_log(self, job_id: str = "%j") -> Path:
        """The batch job's output file (`%j` in the #SBATCH line, the job id when reading it)."""
        return self.path / SLURM_LOG.format(job=job_id)

    # -- liveness

    def heartbeat_file(self, rank: int) -> Path:
        return self.path / HEARTBEATS / f"rank_{rank:05d}.json"

    def read_heartbeats(self) -> list[dict]:
        beats = [read_json(p) for p in sorted((self.path / HEARTBEATS).glob("rank_*.json"))]
        return [b for b in beats if b]

    def record_event(self, event: dict) -> None:
        """One line in the run's event log (a rank stuck or killed, a failure): what a post-mortem reads."""
        with open(self.path / EVENTS, "a") as fh:
            fh.write(json.dumps({"time": time.time(), **event}) + "\n")

    def read_events(self, since: float = 0.0) -> list[dict]:
        path = self.path / EVENTS
        if not path.exists():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in rows if r.get("time", 0) >= since]

    def stack_file(self, rank: int) -> Path:
        return self.path / STACKS / f"rank_{rank:05d}.txt"

    def stack_dumps(self) -> list[Path]:
        """Stack dumps of stuck ranks, newest first."""
        return sorted((self.path / STACKS).glob("rank_*.txt"), key=lambda p: p.stat().st_mtime, reverse=True)

    @property
    def nccl_traces(self) -> Path:
        return self.path / NCCL_TRACES

    # -- checkpoints and the result

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / tag_for(step)

    def complete_checkpoints(self) -> list[Path]:
        return complete_checkpoints(self.checkpoints)

    @property
    def final(self) -> Path:
        return self.path / FINAL

    # -- who owns the directory: one job at a time

    @property
    def owner_file(self) -> Path:
        return self.path / OWNER

    def read_owner(self) -> Optional[dict]:
        return read_json(self.owner_file)

    def claim_owner(self, record: dict) -> bool:
        """Record `record` as the owner if nobody is recorded (atomic create, safe on shared filesystems)."""
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{OWNER}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(record) + "\n")
        try:
            os.link(tmp, self.owner_file)  # fails if it exists: of two claimants exactly one wins
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def drop_owner(self, expected: dict) -> bool:
        """Remove the owner record if it still is `expected` (a stale owner being taken over, or our own at the end)."""
        if self.read_owner() != expected:
            return False
        grave = self.path / f".{OWNER}.gone-{os.getpid()}-{time.time_ns()}"
        try:
            os.replace(self.owner_file, grave)
        except FileNotFoundError:
            return False
        moved = read_json(grave)
        grave.unlink(missing_ok=True)
        if moved != expected:  # someone claimed it between our read and the rename: give it back
            if moved is not None:
                self.claim_owner(moved)
            return False
        return True

    def previous_results(self) -> list[Path]:
        """What an earlier run left that a fresh one (train.resume: never) would mix with or destroy."""
        found = [self.checkpoints] if self.complete_checkpoints() or partial_checkpoints(self.checkpoints) else []
        return found + [p for p in (self.metrics_file, self.final) if p.exists()]

    def set_aside(self) -> Path:
        """Move an earlier run's results (and its status, ids and liveness files) into replaced-TIME/."""
        target = self.path / REPLACED.format(time=time.strftime("%Y%m%d-%H%M%S"))
        target.mkdir(parents=True, exist_ok=False)
        for name in (CHECKPOINTS, METRICS, FINAL, STATUS, WANDB_ID, HEARTBEATS, STACKS, NCCL_TRACES, EVENTS):
            if (self.path / name).exists():
                os.replace(self.path / name, target / name)
        return target
