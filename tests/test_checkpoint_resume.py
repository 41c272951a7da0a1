"""Checkpoints under failure, with real torchrun processes on CPU: stop/resume, killed ranks, kills
during a save, damaged shards, world-size changes, non-finite steps and export.

Every run uses the same data order and a global batch of 8, so any resumed run must reproduce the
per-step losses of one uninterrupted reference run.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launcher.contract.run_dir import HF, LATEST, MANIFEST, TRAINER_STATE, RunDir

from conftest import REPO, losses, read_metrics, shardtune, tiny_config

STEPS = 16
COMMON = {"max_steps": STEPS, "save_every": 5, "keep_last": 3, "grad_accum_steps": None, "global_batch_size": 8}


def config(tmp_path, model, procs=2, **train):
    return tiny_config(tmp_path, model, train={**COMMON, **train}, launch={"procs_per_node": procs})


def launch(cfg, *overrides, env=None, check=True):
    return shardtune("launch", str(cfg), *overrides, env=env, check=check)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    """One uninterrupted 16-step run on 2 ranks."""
    tmp = tmp_path_factory.mktemp("reference")
    launch(config(tmp, tiny_model))
    return tmp / "run"


def assert_same_losses(run_dir, reference_dir, rel=0.0):
    got, want = losses(run_dir), losses(reference_dir)
    assert sorted(got) == list(range(1, STEPS + 1)), sorted(got)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=rel, abs=0), (step, got[step], want[step])


def test_stop_and_relaunch_gives_identical_losses(tmp_path, tiny_model, reference):
    cfg = config(tmp_path, tiny_model)
    launch(cfg, "train.stop_at_step=10")
    status = RunDir(tmp_path / "run").read_status()
    assert status["state"] == "stopped" and status["step"] == 10 and not (RunDir(tmp_path / "run").final).exists()
    proc = launch(cfg)
    assert "resumed from" in proc.stderr and "step_00000010 at step 10" in proc.stderr
    assert "still maps" not in proc.stderr  # the loaded moments were copied out of the checkpoint's mapped files
    assert_same_losses(tmp_path / "run", reference)


def test_a_sigterm_lets_the_ranks_finish_a_save_longer_than_torchruns_30_s_and_resume(tmp_path, tiny_model, reference):
    """SIGTERM to `shardtune launch` (a scheduler's, or `kill`) reaches torchrun's agent and the ranks. The ranks
    save and stop; the agent used to SIGKILL them 30 s later (torch's default shutdown timeout), in the middle of a
    save that takes longer, and launch.sh ended at once while they still ran. Here the save takes 35 s."""
    cfg = config(tmp_path, tiny_model, save_every=1000)
    run = RunDir(tmp_path / "run")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "shardtune"), "launch", str(cfg)], cwd=REPO,
                            env={**os.environ, "SHARDTUNE_FAULTS": "stall_save@-1:0=35"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (run.metrics_file.exists() and max(losses(run.path), default=0) >= 3) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    status = run.read_status()
    assert status["state"] == "stopped" and status["stopped_by"] == "signal", status
    assert f"training stopped at step {status['step']} on a signal" in err
    assert (run.checkpoint(status["step"]) / MANIFEST).is_file()
    assert f"stopped on a signal at step {status['step']}" in shardtune("status", str(run.path)).stdout
    assert f"{run.checkpoint(status['step']).name} at step {status['step']}" in launch(cfg).stderr
    assert_same_losses(run.path, reference)


def test_killed_worker_is_restarted_and_resumes(tmp_path, tiny_model, reference):
    cfg = config(tmp_path, tiny_model)
    proc = launch(cfg, "launch.max_restarts=1", env={"SHARDTUNE_FAULTS": "crash@8:1"})
    assert "resumed from" in proc.stderr and "step_00000005 at step 5" in proc.stderr, proc.stderr[-3000:]
    assert_same_losses(tmp_path / "run", reference)


def test_kill_during_save_leaves_previous_checkpoint(tmp_path, tiny_model, reference):
    cfg = config(tmp_path, tiny_model)
    proc = launch(cfg, env={"SHARDTUNE_FAULTS": "kill_in_save@10:0"}, check=False)
    assert proc.returncode != 0
    # The post-mortem names where rank 0 died, not what its last periodic heartbeat (every 5 s, ~20 steps of
    # this run) had seen.
    assert re.search(r"rank 0 on \S+ \(pid \d+\): the process ended without a word in 'save' at step 10 ",
                     proc.stderr), proc.stderr[-3000:]
    # Rank 1, waiting for rank 0's shards, ends as soon as rank 0 is gone, not when torchrun's 30 s are out.
    assert "forcefully exiting via 9" not in proc.stderr, proc.stderr[-3000:]
    assert any("a peer training process on" in e["reason"] for e in RunDir(tmp_path / "run").read_events(0))
    ckpts = RunDir(tmp_path / "run").checkpoints
    assert (ckpts / LATEST).read_text().strip() == "step_00000005"
    assert not (ckpts / "step_00000010" / MANIFEST).exists()
    proc = launch(cfg)
    assert "ignoring incomplete checkpoint(s) step_00000010" in proc.stderr
    assert "step_00000005 at step 5" in proc.stderr
    assert_same_losses(tmp_path / "run", reference)


@pytest.mark.parametrize("background", [False, True], ids=["sync_save", "async_save"])
def test_a_write_that_fails_on_one_rank_fails_every_rank_and_the_previous_checkpoint_stays(
        tmp_path, tiny_model, reference, background):
    """A full filesystem (ENOSPC, injected in rank 1's writer at step 10's save) ends the run on every rank with
    the failing rank's error, not with rank 1 alone dying and the others waiting for its shards. The checkpoint in
    charge stays step 5's, and a relaunch resumes from it with the reference's losses."""
    cfg = config(tmp_path, tiny_model, async_save=background)
    proc = launch(cfg, env={"SHARDTUNE_FAULTS": "fail_write@10:1"}, check=False)
    assert proc.returncode != 0
    cause = "saving step_00000010 failed (rank 1: OSError: [Errno 28] No space left on device"
    assert cause in proc.stderr and "the previous checkpoint stays in charge" in proc.stderr, proc.stderr[-4000:]
    run = RunDir(tmp_path / "run")
    status = run.read_status()  # rank 0's: it learned rank 1's cause
    assert status["state"] == "failed" and cause in status["reason"], status
    assert (run.checkpoints / LATEST).read_text().strip() == "step_00000005"
    assert not (run.checkpoint(10) / MANIFEST).exists()
    proc = launch(cfg)
    assert "step_00000005 at step 5" in proc.stderr, proc.stderr[-3000:]
    assert_same_losses(run.path, reference)


def test_damaged_shard_is_detected_before_loading_and_previous_is_used(tmp_path, tiny_model, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    newest = RunDir(run).checkpoints / "step_00000016"
    shard = newest / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content: only the sha256 can tell
    shard.write_bytes(bytes(data))
    (newest / TRAINER_STATE).write_text("{}")  # would fail to parse if it were ever trusted
    proc = launch(config(tmp_path, tiny_model))
    assert "step_00000016 is damaged" in proc.stderr and "sha256 differs" in proc.stderr
    assert "step_00000015 at step 15" in proc.stderr
    assert_same_losses(run, reference)


def assert_continues(run_dir, reference_dir, after: int) -> None:
    """A run resumed from the reference's checkpoint of step `after` (on another world size: float tolerance)
    has the reference's losses at every later step, and no others."""
    got, want = losses(run_dir), losses(reference_dir)
    assert sorted(got) == list(range(after + 1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=0), (step, got[step], want[step])


def listing(directory: Path) -> dict[str, int]:
    """Every path under a directory with its modification time: what a job must leave alone."""
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in sorted(directory.rglob("*"))}


def test_another_runs_two_rank_checkpoint_resumes_on_one_rank_writing_only_into_its_own_directory(
        tmp_path, tiny_model, reference):
    """The reference's step-10 checkpoint continued on 1 rank by a run of its own (train.resume): the job converts
    it to DeepSpeed's universal format, in its own directory (the reference's may be read-only, or another job's),
    and follows the reference's losses."""
    before = listing(reference)
    proc = launch(config(tmp_path, tiny_model, procs=1), f"train.resume={RunDir(reference).checkpoint(10)}")
    assert "written by 2 ranks, resuming on 1" in proc.stderr and "still maps" not in proc.stderr
    assert "converted step_00000010 to DeepSpeed's universal format" in proc.stderr
    assert listing(reference) == before, "the job wrote into the other run's directory"
    assert_continues(tmp_path / "run", reference, after=10)


def test_a_copy_converted_ahead_beside_another_runs_checkpoint_is_used_where_it_is(tmp_path, tiny_model, reference):
    """`shardtune convert` run on another run's checkpoint (here a copy of the reference's step 10, as a user's
    shared directory): a job resuming from it on 1 rank uses that universal copy in place, converts nothing, and
    neither writes into nor prunes the other run's directory, through its own saves and pruning to the end."""
    other = tmp_path / "other"
    shutil.copytree(RunDir(reference).checkpoint(10), RunDir(other).checkpoint(10))
    out = shardtune("convert", str(RunDir(other).checkpoint(10)), "--workers=1").stdout
    assert f"{RunDir(other).checkpoints}/step_00000010.universal-" in out
    before = listing(other)
    run = tmp_path / "run"
    proc = launch(config(tmp_path, tiny_model, procs=1), f"train.resume={RunDir(other).checkpoint(10)}")
    assert "written by 2 ranks, resuming on 1" in proc.stderr and "converted step_00000010" not in proc.stderr
    assert listing(other) == before, "the job wrote into the other run's directory"
    assert not list(RunDir(run).checkpoints.glob("*.universal-*")), "the job converted again in its own directory"
    assert_continues(run, reference, after=10)


def test_a_one_rank_run_converted_ahead_resumes_on_two_ranks(tmp_path, tiny_model, reference):
    """`shardtune convert` makes the universal copy before the job, which then reuses it."""
    launch(config(tmp_path, tiny_model, procs=1), "train.stop_at_step=10")
    out = shardtune("convert", str(tmp_path / "run"), "--workers=2").stdout
    assert "step_00000010 ->" in out and ".universal-" in out
    proc = launch(config(tmp_path, tiny_model, procs=2))
    assert "written by 1 ranks, resuming on 2" in proc.stderr
    assert "converted step_00000010 to DeepSpeed's universal format" not in proc.stderr
    assert_same_losses(tmp_path / "run", reference, rel=1e-6)


def test_the_universal_conversion_beats_while_it_copies_and_hashes(tmp_path, reference, monkeypatch):
    """After DeepSpeed's converter exits, the copy of the model states and the hash of every converted file (12
    bytes per parameter and more) ran without a heartbeat: at 70B past the watchdog's start-up allowance, which
    kills the rank and starts the conversion over. Every file of the copy beats at least once now.

    While the converter runs, its progress is its processes' I/O: the output tree (millions of fragment files
    for a large MoE model on many ranks) was listed every second on the shared filesystem; now once, to sync it."""
    from trainer.checkpoint import universal_copy

    ckpt = RunDir(tmp_path).checkpoint(16)
    shutil.copytree(RunDir(reference).checkpoint(16), ckpt)
    walked, real_walk = [], os.walk
    monkeypatch.setattr(os, "walk", lambda top, *a, **k: walked.append(str(top)) or real_walk(top, *a, **k))
    beats = []
    out = universal_copy(ckpt, lambda m: None, beats.append, workers=1)
    files = json.loads((out / MANIFEST).read_text())["files"]
    assert len(files) > 10 and set(beats) == {"convert"} and len(beats) >= len(files)
    assert len([w for w in walked if ".tmp-" in w]) <= 1, walked


def test_pruning_reports_every_file_it_deletes(tmp_path, reference):
    """Deleting old checkpoints (a terabyte each at 70B) reported progress once per checkpoint: on a filesystem
    where unlinking takes minutes, the rank looked stuck to its watchdog and to the ranks waiting on it."""
    from trainer.checkpoint import prune

    root = RunDir(tmp_path).checkpoints
    shutil.copytree(RunDir(reference).checkpoints, root)
    kept = RunDir(tmp_path).checkpoint(16)
    doomed = [c for c in root.iterdir() if c.is_dir() and c != kept and (c / MANIFEST).is_file()]
    files = sum(1 for c in doomed for p in c.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert len(doomed) >= 2 and files > 2 * len(doomed)
    reports = []
    prune(root, 1, kept, progress=reports.append)
    assert not any(c.exists() for c in doomed) and kept.is_dir()
    assert len(reports) >= files


def test_missing_resume_path_is_a_clear_error(tmp_path, tiny_model):
    proc = launch(config(tmp_path, tiny_model), f"train.resume={tmp_path}/nope/step_00000005", check=False)
    assert proc.returncode != 0
    assert "train.resume:" in proc.stderr and "does not exist" in proc.stderr
    assert not RunDir(tmp_path / "run").metrics_file.exists()


def test_incomplete_resume_path_is_refused_by_the_trainer(tmp_path, tiny_model, reference):
    partial = tmp_path / "partial" / "step_00000005"
    shutil.copytree(RunDir(reference).checkpoints / "step_00000015", partial)
    (partial / MANIFEST).unlink()
    proc = launch(config(tmp_path, tiny_model), f"train.resume={partial}", check=False)
    assert proc.returncode != 0 and "is not a complete shardtune checkpoint" in proc.stderr


def _optimizer_tensors(ckpt) -> list[torch.Tensor]:
    tensors = []
    for shard in sorted(ckpt.glob("*optim_states.pt")):
        state = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for group in state["base_optimizer_state"]["state"].values():
            tensors += [v for v in group.values() if torch.is_tensor(v)]
    return tensors


def test_nan_on_one_rank_skips_the_step_on_all_ranks(tmp_path, tiny_model):
    from trainer.export import fp32_state_dict

    cfg = config(tmp_path, tiny_model, max_steps=8, save_every=1, keep_last=10)
    launch(cfg, env={"SHARDTUNE_FAULTS": "nan_loss@6:1"})
    rows = {r["step"]: r for r in read_metrics(tmp_path / "run")}
    assert rows[6]["skipped_steps"] == 1 and rows[6]["loss"] is None
    assert rows[5]["skipped_steps"] == 0 and rows[8]["skipped_steps"] == 1
    assert rows[7]["lr"] == rows[6]["lr"], "the LR schedule advanced on a skipped step"
    ckpts = RunDir(tmp_path / "run").checkpoints
    before, after = fp32_state_dict(ckpts / "step_00000005"), fp32_state_dict(ckpts / "step_00000006")
    assert all(torch.equal(before[k], after[k]) for k in before), "weights changed on a skipped step"
    opt_before, opt_after = _optimizer_tensors(ckpts / "step_00000005"), _optimizer_tensors(ckpts / "step_00000006")
    assert opt_before and all(torch.equal(a, b) for a, b in zip(opt_before, opt_after))
    changed = fp32_state_dict(ckpts / "step_00000007")
    assert any(not torch.equal(after[k], changed[k]) for k in after), "training did not continue after the skip"


def test_too_many_bad_steps_stop_the_run_naming_step_and_checkpoint(tmp_path, tiny_model):
    cfg = config(tmp_path, tiny_model, max_steps=10, save_every=2, max_bad_steps=2)
    proc = launch(cfg, env={"SHARDTUNE_FAULTS": "inf_loss@5:0,inf_loss@6:1"}, check=False)
    assert proc.returncode != 0
    assert "step 6: 2 consecutive steps with a non-finite loss" in proc.stderr
    assert "the last good checkpoint is" in proc.stderr and "step_00000004" in proc.stderr
    status = RunDir(tmp_path / "run").read_status()
    assert status["state"] == "failed" and status["checkpoint"].endswith("step_00000004")


def test_export_of_last_checkpoint_equals_final(tmp_path, reference):
    out = tmp_path / "exported"
    shardtune("export", str(reference), str(out))
    exported, final = load_file(out / "model.safetensors"), load_file(RunDir(reference).final / "model.safetensors")
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k], final[k]) for k in final)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_export_keeps_tied_weights_tied_at_zero3(tmp_path):
    from transformers import AutoModelForCausalLM

    from examples.tiny_model import make_tiny_llama

    model_dir = make_tiny_llama(tmp_path / "tied", tie_embeddings=True)
    cfg = tiny_config(tmp_path, model_dir, train={"max_steps": 4}, zero={"stage": 3})
    launch(cfg)
    final = RunDir(tmp_path / "run").final
    weights = load_file(final / "model.safetensors")
    assert "lm_head.weight" not in weights and "model.embed_tokens.weight" in weights
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    initial = load_file(model_dir / "model.safetensors")["model.embed_tokens.weight"]
    assert not torch.equal(weights["model.embed_tokens.weight"], initial)


def test_a_tokenizer_with_named_chat_templates_is_checkpointed_and_exported(tmp_path):
    """transformers 5 saves named chat templates into additional_chat_templates/: every save used to fail reading
    that directory as a file. The checkpoint holds (and verifies) it, and final/ and an export keep it."""
    from transformers import AutoTokenizer

    from examples.tiny_model import make_tiny_llama

    model_dir = make_tiny_llama(tmp_path / "named")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tool_use = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|>tool-use ")
    tokenizer.chat_template = {"default": tokenizer.chat_template, "tool_use": tool_use}
    tokenizer.save_pretrained(model_dir)
    assert (model_dir / "additional_chat_templates" / "tool_use.jinja").is_file()
    launch(tiny_config(tmp_path, model_dir, train={"max_steps": 4, "save_every": 2}, launch={"procs_per_node": 1}))
    run = RunDir(tmp_path / "run")
    ckpt = run.checkpoint(4)
    assert f"{HF}/additional_chat_templates/tool_use.jinja" in json.loads((ckpt / MANIFEST).read_text())["files"]
    out = tmp_path / "exported"
    shardtune("export", str(ckpt), str(out))
    for directory in (run.final, out):
        assert AutoTokenizer.from_pretrained(directory).chat_template == tokenizer.chat_template, directory
