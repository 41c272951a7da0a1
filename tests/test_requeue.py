"""slurm.max_requeues counts attempts in a row without progress, not requeues (launcher/backends/requeue.py).

Each scenario is a job's life told attempt by attempt on a real run directory: which complete checkpoints
exist when an attempt ends, and whether the batch script requeues it. The real batch script on the local
SLURM cluster is in tests/test_slurm.py (a preemption with max_requeues 0, a deterministic crash)."""
from __future__ import annotations

import subprocess
import sys

from launcher.backends import requeue
from launcher.contract.run_dir import MANIFEST, RunDir


def saved(run: RunDir, step: int) -> None:
    ckpt = run.checkpoint(step)
    ckpt.mkdir(parents=True)
    (ckpt / MANIFEST).write_text("{}")


def test_a_run_that_saves_every_attempt_requeues_through_more_time_limits_than_max_requeues(tmp_path):
    run = RunDir(tmp_path)
    assert requeue.start(run, "7", 0, 0) == (True, "")
    for attempt in range(10):
        saved(run, 100 * (attempt + 1))
        go, message = requeue.end(run, "7", attempt, 0, "stopped")
        assert go and "it saved progress" in message
        assert requeue.start(run, "7", attempt + 1, 0)[0]


def test_attempts_without_a_newer_checkpoint_give_up_after_max_requeues_of_them_in_a_row(tmp_path):
    run = RunDir(tmp_path)
    saved(run, 50)  # from before this job: not progress of this job's attempts
    requeue.start(run, "7", 0, 2)
    assert requeue.end(run, "7", 0, 2, "failed")[0]
    assert requeue.end(run, "7", 1, 2, "failed")[0]
    go, message = requeue.end(run, "7", 2, 2, "failed")
    assert not go
    assert "giving up: attempt 2 ended 'failed'" in message and "3 attempts in a row" in message
    assert "slurm.max_requeues=2" in message and "(step 50)" in message


def test_progress_resets_the_count(tmp_path):
    run = RunDir(tmp_path)
    requeue.start(run, "7", 0, 1)
    assert requeue.end(run, "7", 0, 1, "failed")[0]  # crashed before any save: 1 in a row
    saved(run, 10)
    assert requeue.end(run, "7", 1, 1, "failed")[1].endswith("(it saved progress); the next attempt resumes from "
                                                             "the newest complete checkpoint")
    assert requeue.end(run, "7", 2, 1, "failed")[0]  # 1 in a row again, not 2
    assert not requeue.end(run, "7", 3, 1, "failed")[0]


def test_a_stop_before_the_first_new_save_is_not_progress(tmp_path):
    """A time-limit signal that always comes before the first step (loading outlasts the limit minus
    slurm.signal_lead_s) saves the step it resumed from again: requeueing it forever would never train."""
    run = RunDir(tmp_path)
    saved(run, 40)
    requeue.start(run, "7", 0, 1)
    assert requeue.end(run, "7", 0, 1, "stopped")[0]
    assert not requeue.end(run, "7", 1, 1, "stopped")[0]


def test_a_job_submitted_again_starts_a_new_count(tmp_path):
    run = RunDir(tmp_path)
    requeue.start(run, "7", 0, 0)
    assert not requeue.end(run, "7", 0, 0, "failed")[0]
    assert requeue.start(run, "8", 0, 0) == (True, "")
    assert requeue.read(run) == requeue.Attempts("8", -1, None, 0)
    assert not requeue.end(run, "8", 0, 0, "failed")[0]  # its own first attempt without progress


def test_an_attempt_slurm_ended_unseen_is_counted_when_the_next_one_starts(tmp_path):
    """Preempted past its grace time or on a failed node, the batch script never reached its end: the next
    attempt accounts for it before it trains."""
    run = RunDir(tmp_path)
    requeue.start(run, "7", 0, 1)
    saved(run, 5)
    assert requeue.start(run, "7", 1, 1) == (True, "")  # attempt 0 ended unseen after saving step 5
    assert requeue.read(run) == requeue.Attempts("7", 0, 5, 0)
    assert requeue.start(run, "7", 2, 1)[0]  # attempt 1 unseen, no newer save: 1 in a row
    go, message = requeue.start(run, "7", 3, 1)
    assert not go and "not starting: attempt 2 ended without a word" in message and "2 attempts in a row" in message


def test_the_batch_script_entry_point_prints_the_reason_and_exits_1_to_give_up(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "launcher.backends.requeue", str(tmp_path), "7", *args],
                              capture_output=True, text=True)

    assert run("0", "0", "start").returncode == 0
    proc = run("0", "0", "end", "failed")
    assert proc.returncode == 1 and proc.stdout.startswith("== shardtune: giving up: attempt 0 ended 'failed'")
    assert "there is no complete checkpoint" in proc.stdout
