"""Nothing executed, nothing lost, nobody collides: with real torchrun processes on CPU.

A crafted checkpoint with a valid manifest, bytes changed between verification and load, every checkpoint
damaged, a second launch into a live run, a frozen rank, a job that gives up, credentials in the config, and
bf16 (the GPU default) through save, resume and a skipped step.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launcher.backends import monitor, postmortem
from launcher.contract.run_dir import MANIFEST, RunDir
from trainer.checkpoint import verify
from trainer.checkpoint_io import Manifests, VerificationError

from conftest import REPO, losses, shardtune, tiny_config

SHARDTUNE = Path(sys.executable).parent / "shardtune"
STEPS = 8
TRAIN = {"max_steps": STEPS, "save_every": 4, "keep_last": 3, "grad_accum_steps": None, "global_batch_size": 8}


def config(tmp_path, model, procs=2, **sections):
    train = {**TRAIN, **sections.pop("train", {})}
    return tiny_config(tmp_path, model, train=train, launch={"procs_per_node": procs, **sections.pop("launch", {})},
                       **sections)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("reference")
    shardtune("launch", str(config(tmp, tiny_model)))
    return tmp / "run"


class _Evil:
    """A pickle that runs a shell command when loaded: what a crafted checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(ckpt, rel, marker) -> None:
    """Replace one file with a code-running pickle and make the manifest agree: integrity holds, origin does not."""
    path = ckpt / rel
    torch.save({"optimizer_state_dict": _Evil(marker)}, path)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    data = path.read_bytes()
    manifest["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))


def test_a_crafted_checkpoint_runs_no_code_on_resume_export_or_conversion(tmp_path, tiny_model, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    marker = tmp_path / "PWNED"
    rel = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    for step in (4, 8):
        _plant(RunDir(run).checkpoint(step), rel, marker)
    cfg = config(tmp_path, tiny_model)
    proc = shardtune("launch", str(cfg), check=False)
    assert proc.returncode != 0 and f"{rel}: refused to load: it needs posix.system" in proc.stderr
    proc = shardtune("export", str(run), str(tmp_path / "out"), check=False)
    assert proc.returncode != 0 and "refused to load: it needs posix.system" in proc.stderr
    proc = shardtune("launch", str(config(tmp_path, tiny_model, procs=1)), check=False)  # universal conversion
    assert proc.returncode != 0 and "posix.system" in proc.stderr
    assert not marker.exists()


def test_bytes_changed_between_verification_and_load_are_caught(tmp_path, tiny_model, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    proc = shardtune("launch", str(config(tmp_path, tiny_model)), env={"SHARDTUNE_FAULTS": "flip_after_verify@0:1"},
                     check=False)
    assert proc.returncode != 0
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt: its bytes differ from the checkpoint's manifest" in proc.stderr


def test_a_file_changed_after_verification_is_hashed_again_even_with_its_times_put_back(tmp_path, reference):
    """A load skips the hash of a file this job verified only while the file is provably the one verified: its
    inode, size, modification and change times. Only the clock sets the change time, so a write that puts the
    modification time back (rsync -t, touch -d) is still caught."""
    ckpt = tmp_path / "step"
    shutil.copytree(RunDir(reference).checkpoint(8), ckpt)
    manifests = Manifests()
    assert verify(ckpt, None, into=manifests) == []
    shard = ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert "optimizer_state_dict" in manifests.load(shard)  # unchanged
    before = shard.stat()
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (shard.stat().st_size, shard.stat().st_mtime_ns, shard.stat().st_ino) == (before.st_size,
                                                                                   before.st_mtime_ns, before.st_ino)
    with pytest.raises(VerificationError, match=f"{shard.name}: its bytes differ from the checkpoint's manifest"):
        manifests.load(shard)


def test_the_universal_conversion_checks_the_bytes_of_every_file_it_loads(tmp_path, reference):
    """A file changed after the job verified the checkpoint and before the conversion read it: the conversion's own
    loads (trainer.safe_convert, in its worker processes too) check each file against the manifest and refuse it.
    They once ran unchecked, the guard collected and undone as soon as it was installed."""
    ckpt = tmp_path / "step"
    shutil.copytree(RunDir(reference).checkpoint(8), ckpt)
    shard = ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content: only the sha256 can tell
    shard.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "trainer.safe_convert", "--input_folder", str(ckpt),
                           "--output_folder", str(tmp_path / "universal"), "--inject_missing_state",
                           "--num_extract_workers", "2", "--num_merge_workers", "1"],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode != 0
    assert f"{shard.name}: its bytes differ from the checkpoint's manifest" in proc.stdout + proc.stderr


def test_a_read_error_while_verifying_is_checked_again_before_the_checkpoint_is_passed_over(tmp_path, tiny_model,
                                                                                             reference):
    """A shared filesystem can fail a read for a moment. Rank 1's first read failed with EIO: the rank crashed
    (the others waited in the collective) and, read as damage, the newest checkpoint would be passed over and
    later pruned as an abandoned timeline. It is reported like any other problem and verified once more."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    proc = shardtune("launch", str(config(tmp_path, tiny_model)), f"train.max_steps={STEPS + 2}",
                     env={"SHARDTUNE_FAULTS": "unreadable_once@0:1"})
    assert "Input/output error (injected)" in proc.stderr and "checking it again" in proc.stderr
    assert f"step_{STEPS:08d} at step {STEPS}" in proc.stderr and "falling back" not in proc.stderr
    assert RunDir(run).checkpoint(STEPS).is_dir() and RunDir(run).read_status()["step"] == STEPS + 2


def test_every_checkpoint_damaged_stops_the_run_and_keeps_its_history(tmp_path, tiny_model, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for ckpt in RunDir(run).complete_checkpoints():
        shard = ckpt / "mp_rank_00_model_states.pt"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    metrics = RunDir(run).metrics_file.read_bytes()
    proc = shardtune("launch", str(config(tmp_path, tiny_model, train={"max_steps": 12})), check=False)
    assert proc.returncode != 0 and "every checkpoint of this run is damaged" in proc.stderr
    assert "step_00000008" in proc.stderr and "step_00000004" in proc.stderr
    assert RunDir(run).metrics_file.read_bytes() == metrics


def test_a_fresh_start_refuses_to_overwrite_an_earlier_run_unless_told(tmp_path, tiny_model, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    proc = shardtune("plan", str(config(tmp_path, tiny_model)), "train.resume=never", check=False)
    assert proc.returncode == 0  # plan writes nothing
    proc = shardtune("launch", str(config(tmp_path, tiny_model)), "train.resume=never", check=False)
    assert proc.returncode == 2 and "train.resume: 'never', but output_dir" in proc.stderr
    shardtune("launch", str(config(tmp_path, tiny_model)), "train.resume=never", "train.overwrite=true")
    aside = list(run.glob("replaced-*"))
    assert len(aside) == 1 and (RunDir(aside[0]).checkpoint(8) / MANIFEST).exists()
    assert losses(run) == losses(reference)  # a fresh run from the pretrained weights, its own history


def test_a_second_launch_into_a_live_run_is_refused_and_a_relaunch_after_it_resumes(tmp_path, tiny_model):
    """The run directory is claimed by the job, not by a rank: one rank is enough to hold it."""
    long = {"max_steps": 400, "save_every": 2, "compile": False}  # compile: off, as a long run would compile
    cfg = config(tmp_path, tiny_model, procs=1, train=long)
    first = subprocess.Popen([str(SHARDTUNE), "launch", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=REPO)
    run = RunDir(tmp_path / "run")
    deadline = time.time() + 300
    while time.time() < deadline and not (run.read_owner() and run.complete_checkpoints()):
        time.sleep(0.5)
    assert run.read_owner() is not None, "the first job never claimed its run directory"
    proc = shardtune("launch", str(cfg), check=False)
    assert proc.returncode == 2 and f"is in use by pid {run.read_owner()['pid']}" in proc.stderr
    shardtune("stop", str(run.path))
    first.communicate(timeout=300)
    assert run.read_status()["state"] == "stopped" and run.read_owner() is None
    proc = shardtune("launch", str(cfg), "train.max_steps=" + str(run.read_status()["step"] + 2))
    assert "resumed from" in proc.stderr


def test_a_frozen_rank_is_killed_from_outside_and_the_job_completes(tmp_path, tiny_model):
    """The one rank SIGSTOPs itself at step 5, watchdog thread included: no peer's watchdog notices and torchrun
    waits for it forever, so only the node's monitor can end it."""
    cfg = config(tmp_path, tiny_model, procs=1, launch={"max_restarts": 1, "stall_timeout_s": 6})
    proc = shardtune("launch", str(cfg), env={"SHARDTUNE_FAULTS": "freeze@5:0"}, timeout=600)
    assert "rank 0" in proc.stderr and "is frozen" in proc.stderr and "killed by the node's monitor" in proc.stderr
    assert "resumed from" in proc.stderr and "step_00000004" in proc.stderr
    run = RunDir(tmp_path / "run")
    assert sorted(losses(run.path)) == list(range(1, STEPS + 1)) and run.read_status()["state"] == "completed"
    assert [e["rank"] for e in run.read_events() if e["event"] == "frozen"] == [0]


def test_a_rank_frozen_after_it_finished_is_killed_too(tmp_path):
    """A process hung in teardown (its heartbeat says finished, it never exits) keeps torchrun waiting forever."""
    run = RunDir(tmp_path / "run")
    run.heartbeat_file(1).parent.mkdir(parents=True)
    host = socket.gethostname()
    workers = [subprocess.Popen(["sleep", "600"]) for _ in range(2)]
    try:
        for rank, worker in enumerate(workers):
            os.kill(worker.pid, signal.SIGSTOP)
            beat = {"rank": rank, "host": host, "pid": worker.pid, "step": 8, "phase": "finished",
                    "state": "finished", "time": time.time(), "allowance_s": 6, "write_every_s": 1}
            run.heartbeat_file(rank).write_text(json.dumps(beat) + "\n")
        assert monitor.sweep(run, host, time.time() + 30) == []  # within its exit grace: left alone
        beat_0 = {**json.loads(run.heartbeat_file(0).read_text()), "state": "alive", "time": time.time() + 100}
        run.heartbeat_file(0).write_text(json.dumps(beat_0) + "\n")  # rank 0 keeps beating; rank 1 never exits
        assert [b["rank"] for b in monitor.sweep(run, host, time.time() + 100)] == [1]
        assert workers[1].wait(timeout=10) == -signal.SIGKILL and workers[0].poll() is None
        event = run.read_events()[-1]
        assert event["event"] == "frozen" and "when it finished, and the process never exited" in event["reason"]
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()


def test_when_restarts_are_spent_the_last_line_names_the_rank_and_the_cause(tmp_path, tiny_model):
    cfg = config(tmp_path, tiny_model)
    proc = shardtune("launch", str(cfg), env={"SHARDTUNE_FAULTS": "crash@6:1"}, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "rank 1 on" in last and "ended without a word" in last and "step_00000004" in last
    status = RunDir(tmp_path / "run").read_status()
    assert status["state"] == "failed" and "rank 1 on" in status["reason"]


def _ended(run: RunDir, rank: int, t: float, event: str | None = None, reason: str = "", phase: str = "save") -> None:
    """What a rank leaves behind: an event it recorded (its heartbeat says so too), or only a heartbeat that still
    says alive."""
    beat = {"rank": rank, "host": "n1", "pid": 100 + rank, "step": 10, "phase": phase,
            "state": "failed" if event else "alive", "time": t}
    run.heartbeat_file(rank).parent.mkdir(parents=True, exist_ok=True)
    run.heartbeat_file(rank).write_text(json.dumps(beat) + "\n")
    if event:
        run.record_event({"rank": rank, "host": "n1", "pid": 100 + rank, "event": event, "reason": reason})


def test_the_post_mortem_names_the_rank_that_failed_not_the_ones_torchrun_killed_after_it(tmp_path):
    """torchrun kills every other rank once one has failed. A rank that was waiting for the failed one (on the
    store, in a save or the export) dies without a word, its heartbeat still saying alive, often with a newer
    beat than the failure. The failure is the cause. Only ranks whose peers report a broken collective point at
    the silent one (a process the OOM killer took)."""
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    now = time.time()
    _ended(run, 0, now + 3)  # killed while it waited, beating until then
    _ended(run, 1, now, "failed", "OSError: [Errno 28] No space left on device")
    assert postmortem.cause(run, now - 60) == "rank 1 on n1 (pid 101): OSError: [Errno 28] No space left on device"
    oom = RunDir(tmp_path / "oom")
    oom.path.mkdir()
    _ended(oom, 0, now, phase="backward")  # the OOM killer's
    _ended(oom, 1, now + 1, "failed", "RuntimeError: Connection closed by peer [127.0.0.1]:29500 (gloo)")
    assert postmortem.cause(oom, now - 60).startswith("rank 0 on n1 (pid 100): the process ended without a word "
                                                      "in 'backward' at step 10")


def test_the_post_mortem_of_a_failed_relaunch_is_not_silenced_by_the_last_runs_status(tmp_path, capsys):
    """A relaunch of a completed run (more steps, another resume) keeps the old status.json until rank 0 says
    "running" after its resume; when another rank fails first and torchrun kills rank 0, that stale "completed"
    must not pass for how this attempt ended."""
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    start = time.time() - 60
    run.status_file.write_text(json.dumps({"state": "completed", "step": 8, "time": start - 3600}))  # last run's
    _ended(run, 1, start + 1, "failed", "VerificationError: a shard's bytes differ from the manifest")
    assert postmortem.main([str(run.path), "1", str(start)]) == 0
    assert "rank 1 on n1 (pid 101): VerificationError" in capsys.readouterr().err
    assert run.read_status()["state"] == "failed"
    run.write_status("completed", 10)  # this attempt's own: the end it reports stands
    assert postmortem.main([str(run.path), "1", str(start)]) == 0 and capsys.readouterr().err == ""


def test_a_relaunch_failing_within_a_second_of_the_last_runs_end_still_names_its_cause(tmp_path, tiny_model,
                                                                                      reference):
    """The launch scripts stamp when an attempt began, and the post-mortem ignores a "completed" status written
    before that. Stamped in whole seconds, a status from earlier in the same second passed for this attempt's own
    end, and the failure went unreported ("logs above")."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    time.sleep(1.02 - time.time() % 1)  # just past a whole second: the relaunch begins within it
    RunDir(run).write_status("completed", STEPS)
    proc = shardtune("launch", str(config(tmp_path, tiny_model)), env={"SHARDTUNE_FAULTS": "flip_after_verify@0:1"},
                     check=False)
    assert proc.returncode != 0
    assert "its bytes differ from the checkpoint's manifest" in proc.stderr.splitlines()[-1]


def test_credentials_are_refused_whatever_the_variable_is_called(tmp_path, tiny_model):
    key = "3b8d2f71c9e04a6b5d1f8e2c7a94b06d3e5f1c28"  # 40 random hex characters: a wandb API key's form
    proc = shardtune("plan", str(config(tmp_path, tiny_model)), f"launch.env.MY_SETTING={key}", check=False)
    assert proc.returncode == 2 and "launch.env.MY_SETTING: the value looks like a credential" in proc.stderr
    assert key not in proc.stderr + proc.stdout
    proc = shardtune("plan", str(config(tmp_path, tiny_model)),
                     "slurm.setup=['export HF_TOKEN_FILE=/x', 'echo hf_" + "A1b2" * 6 + "']", check=False)
    assert proc.returncode == 2 and "slurm.setup[1]: the line looks like it holds a credential" in proc.stderr


def test_bf16_trains_resumes_exactly_and_skips_a_nan_step(tmp_path, tiny_model):
    """The GPU default precision end to end on CPU: a NaN on one rank skipped by every rank, and a run resumed
    from its step-4 checkpoint continuing bit for bit, the skip counted."""
    bf16, nan = {"precision": "bf16"}, {"SHARDTUNE_FAULTS": "nan_loss@3:1"}
    (tmp_path / "whole").mkdir()
    shardtune("launch", str(config(tmp_path / "whole", tiny_model, train=bf16)), env=nan)
    whole = losses(tmp_path / "whole" / "run")
    assert whole[3] is None and all(whole[step] is not None for step in whole if step != 3)
    proc = shardtune("launch", str(config(tmp_path, tiny_model, train=bf16)),
                     f"train.resume={RunDir(tmp_path / 'whole' / 'run').checkpoint(4)}")
    assert "step_00000004 at step 4" in proc.stderr
    run = RunDir(tmp_path / "run")
    assert run.read_config()["train"]["precision"] == "bf16"
    got = losses(run.path)
    assert sorted(got) == list(range(5, STEPS + 1)) and all(got[step] == whole[step] for step in got), (got, whole)
    rows = [r for r in run.read_metrics() if "skipped_steps" in r]
    assert rows[-1]["step"] == STEPS and rows[-1]["skipped_steps"] == 1
