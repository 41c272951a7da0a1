"""Whether a SLURM job's attempt starts, and whether one that ended unfinished is requeued.

`slurm.max_requeues` guards against a job that can never get anywhere (a crash at the same step every time,
a preemption signal that always comes before the first save), not against a long run. So it counts the
attempts in a row that ended without a newer complete checkpoint than the one before them, and an attempt
that saved progress resets the count: a week-long fine-tune on a partition with a 4-hour limit requeues as
often as it needs. SLURM's own restart count (`SLURM_RESTART_COUNT`) counts every requeue, time limits
included, so it cannot tell the two apart.

The count lives in the run directory (RunDir.requeue_file), keyed by job: a job submitted again by hand
starts a new count. An attempt SLURM ended before its batch script could account for it (preempted past
its grace time, a failed node) is accounted for when the next attempt starts.

    python -m launcher.backends.requeue RUN_DIR JOB_ID ATTEMPT MAX_REQUEUES start
    python -m launcher.backends.requeue RUN_DIR JOB_ID ATTEMPT MAX_REQUEUES end RUN_STATE

Exit 0: train (start) or requeue (end); exit 1: do not. The reason is printed for the job's log.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from typing import Optional

from launcher.contract.run_dir import RunDir, atomic_write, read_json, step_of


@dataclass(frozen=True)
class Attempts:
    """The job's last accounted attempt and the streak it ends."""

    job: str
    attempt: int
    checkpoint: Optional[int]
    """Step of the newest complete checkpoint when that attempt ended (None: there was none)."""
    fruitless: int
    """Attempts in a row, up to that one, that ended without a newer checkpoint than the one before them."""


def after(previous: Optional[Attempts], job: str, attempt: int, newest: Optional[int]) -> Attempts:
    """The record once `attempt` has ended with `newest` the newest complete checkpoint."""
    before = previous.checkpoint if previous is not None else None
    progressed = newest is not None and (before is None or newest > before)
    streak = previous.fruitless if previous is not None and previous.job == job else 0
    return Attempts(job, attempt, newest, 0 if progressed else streak + 1)


def newest_step(run_dir: RunDir) -> Optional[int]:
    complete = run_dir.complete_checkpoints()
    return step_of(complete[0]) if complete else None


def read(run_dir: RunDir) -> Optional[Attempts]:
    data = read_json(run_dir.requeue_file)
    try:
        return Attempts(**data) if data else None
    except TypeError:  # a record of another shape (an older shardtune): start a new count
        return None


def write(run_dir: RunDir, record: Attempts) -> None:
    atomic_write(run_dir.requeue_file, json.dumps(asdict(record), indent=1) + "\n")


def start(run_dir: RunDir, job: str, attempt: int, max_requeues: int) -> tuple[bool, str]:
    """Whether this attempt trains. A job's first attempt (or a job submitted again) sets the baseline: the
    newest checkpoint now. An attempt before this one that nobody accounted for is accounted for now."""
    previous, newest = read(run_dir), newest_step(run_dir)
    if previous is None or previous.job != job:
        write(run_dir, Attempts(job, attempt - 1, newest, 0))
        return True, ""
    if previous.attempt >= attempt - 1:
        return True, ""
    record = after(previous, job, attempt - 1, newest)
    write(run_dir, record)
    if record.fruitless > max_requeues:
        return False, (f"not starting: attempt {attempt - 1} ended without a word (SLURM stopped it) and "
                       f"{_streak(record)}, more than slurm.max_requeues={max_requeues}")
    return True, ""


def end(run_dir: RunDir, job: str, attempt: int, max_requeues: int, state: str) -> tuple[bool, str]:
    """Whether an attempt that ended unfinished (`state` from status.json) is requeued."""
    record = after(read(run_dir), job, attempt, newest_step(run_dir))
    write(run_dir, record)
    kept = (f"the newest complete checkpoint (step {record.checkpoint}) is kept in {run_dir.checkpoints}"
            if record.checkpoint is not None else "there is no complete checkpoint")
    if record.fruitless > max_requeues:
        return False, (f"giving up: attempt {attempt} ended '{state}' and {_streak(record)}, more than "
                       f"slurm.max_requeues={max_requeues}; {kept}")
    progress = ("it saved progress" if record.fruitless == 0 else
                f"{_streak(record)} of the {max_requeues} slurm.max_requeues allows")
    return True, (f"requeueing job {job} after attempt {attempt} ended '{state}' ({progress}); the next attempt "
                  f"resumes from the newest complete checkpoint")


def _streak(record: Attempts) -> str:
    n = record.fruitless
    return f"{n} attempt{'s' if n != 1 else ''} in a row ended without a newer checkpoint"


def main(argv: list[str]) -> int:
    run_dir, job, attempt, max_requeues, phase = RunDir(argv[0]), argv[1], int(argv[2]), int(argv[3]), argv[4]
    go, message = (start(run_dir, job, attempt, max_requeues) if phase == "start"
                   else end(run_dir, job, attempt, max_requeues, argv[5]))
    if message:
        print(f"== shardtune: {message}", flush=True)
    return 0 if go else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
