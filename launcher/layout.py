"""Names inside a run directory, shared by the launcher (which reads them) and the trainer (which writes them).

Torch-free, so `shardtune status` and the sbatch script can inspect a run from a login node.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

CHECKPOINTS = "checkpoints"
MANIFEST = "COMPLETE.json"
LATEST = "LATEST"
TAG_PREFIX = "step_"
STATUS_FILE = "status.json"
STOP_FILE = "STOP"
METRICS = "metrics.jsonl"
SLURM_JOBS = "slurm_jobs.json"
HEARTBEATS = "heartbeats"
STACKS = "stacks"


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


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def last_metrics(run_dir: Path) -> Optional[dict]:
    """The newest metrics row that has a training loss (eval rows are skipped)."""
    path = run_dir / METRICS
    if not path.exists():
        return None
    for line in reversed(path.read_text().splitlines()):
        if line.strip():
            row = json.loads(line)
            if "tokens_per_sec" in row:
                return row
    return None
