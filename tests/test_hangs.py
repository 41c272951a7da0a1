"""Hangs never eat a reservation: preflight fails in seconds, a stuck rank is detected, dumped and restarted."""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.contract.run_dir import RunDir

from conftest import losses, shardtune, tiny_config


def test_preflight_passes_and_measures_bandwidth(tmp_path, tiny_model):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    started = time.time()
    out = shardtune("preflight", str(tiny_config(tmp_path, model, launch={"peak_tflops": None}))).stdout
    assert "preflight passed: 2 ranks" in out and "all-reduce bus bandwidth" in out
    result = json.loads(RunDir(tmp_path / "run" / "preflight").preflight_file.read_text())
    assert result["bandwidth"]["busbw_gbps"] > 0 and {r["rank"] for r in result["ranks"]} == {0, 1}
    # A CPU has no data-sheet peak: every rank measured one, and preflight says so.
    assert result["peak"]["source"] == "probe" and len(result["peak"]["per_rank"]) == 2
    assert f"peak {result['peak']['tflops'] * 1000:,.1f} GFLOP/s per device (probe)" in out
    assert not RunDir(tmp_path / "run").metrics_file.exists(), "preflight must not train"
    assert time.time() - started < 120

    # The same preflight job on a node that does not mount the model's directory fails, naming it and the host.
    shutil.move(model, tmp_path / "elsewhere")
    proc = subprocess.run(["bash", str(RunDir(tmp_path / "run" / "preflight").script("torchrun"))],
                          capture_output=True, text=True, timeout=300)
    said = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "preflight failed" in said, said[-3000:]
    assert f"model.name_or_path: {model}: no such directory on this host (seen on {os.uname().nodename})" in said


@pytest.mark.parametrize("fault,message", [
    ("fake_version@0:1=transformers/0.0.1", "rank 1 on {host} has transformers 0.0.1, rank 0 on {host} has"),
    ("unwritable_output@0:1", "rank 1 on {host} cannot write to the run directory"),
], ids=["injected_version_mismatch", "injected_unwritable_dir"])
def test_preflight_failure_names_rank_and_problem_before_training(tmp_path, tiny_model, fault, message):
    cfg = tiny_config(tmp_path, tiny_model)
    started = time.time()
    proc = shardtune("launch", str(cfg), env={"SHARDTUNE_FAULTS": fault}, check=False)
    assert proc.returncode != 0
    assert message.format(host=os.uname().nodename) in proc.stderr, proc.stderr[-3000:]
    assert not RunDir(tmp_path / "run").metrics_file.exists() and not (RunDir(tmp_path / "run").checkpoints).exists()
    assert time.time() - started < 120


def test_rank_stuck_in_data_loading_is_dumped_and_the_job_restarts(tmp_path, tiny_model):
    """Found, dumped, killed, restarted and completed. That a restarted job reproduces the uninterrupted losses is
    tests/test_checkpoint_resume.py's (a worker killed and restarted by torchrun)."""
    cfg = tiny_config(tmp_path, tiny_model, train={"max_steps": 12, "save_every": 2},
                      launch={"max_restarts": 1, "stall_timeout_s": 10, "startup_timeout_s": 120})
    started = time.time()
    proc = shardtune("launch", str(cfg), env={"SHARDTUNE_FAULTS": "hang_in_data@5:1"}, timeout=300)
    run = tmp_path / "run"
    assert "rank 1 stuck in 'data' at step 5" in proc.stdout + proc.stderr
    assert "resumed from" in proc.stderr and "step_00000004 at step 4" in proc.stderr
    assert sorted(losses(run)) == list(range(1, 13)) and RunDir(run).read_status()["state"] == "completed"
    dump = RunDir(run).stack_file(1).read_text()
    assert "made no progress" in dump and "in maybe_hang" in dump and "in batch" in dump
    status = shardtune("status", str(run)).stdout
    assert str(RunDir(run).stack_file(1)) in status and "heartbeats  2 ranks" in status
    assert time.time() - started < 200


def test_the_heartbeat_file_tightens_to_the_stall_timeout_as_soon_as_training_runs(tmp_path):
    """A process frozen right after its first steps must not get the startup timeout from a monitor outside just
    because the periodic write had not come round yet (seen: frozen at step 5 < 5 s after start, 20 min allowed)."""
    from trainer.watchdog import Heartbeat

    run = RunDir(tmp_path)
    heartbeat = Heartbeat(run, 0, stall_timeout_s=6, startup_timeout_s=1200, write_every_s=3600).start()
    try:
        read = lambda: json.loads(run.heartbeat_file(0).read_text())  # noqa: E731
        assert read()["allowance_s"] == 1200
        heartbeat.beat("train", 1)
        assert read()["allowance_s"] == 1200  # the first step may still compile, load and warm up
        heartbeat.beat("train", 2)
        assert read()["allowance_s"] == 6 and read()["step"] == 2
    finally:
        heartbeat.stop()


def llama_shaped(tmp_path, tiny_model, h: int, inter: int, layers: int, heads: int, head_dim: int):
    """The tiny model's directory with a config.json of another Llama shape (its weights stay tiny: preflight never
    loads them), and that shape's parameters counted by hand: embeddings and head, per layer q/k/v/o (4·h²),
    gate/up/down (3·h·inter) and two norms, and the final norm."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=heads, head_dim=head_dim, tie_word_embeddings=False)
    (model / "config.json").write_text(json.dumps(config))
    return model, 2 * config["vocab_size"] * h + layers * (4 * h * h + 3 * h * inter + 2 * h) + h


def test_preflight_fails_a_run_whose_first_checkpoint_cannot_fit_on_its_filesystem(tmp_path, tiny_model):
    """A model whose checkpoint no test machine has room for (a config.json of ~69 trillion parameters beside the
    tiny model's tokenizer): every rank's preflight sees the free space of the run's filesystem and fails the
    job before the model loads, instead of failing the first save after hours of training."""
    model, params = llama_shaped(tmp_path, tiny_model, h=65536, inter=262144, layers=1000, heads=512, head_dim=128)
    checkpoint_gb = 16 * params / 1e9  # ZeRO-2 in fp32: weights, fp32 master, two Adam moments
    free_gb = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize / 1e9
    assert free_gb < checkpoint_gb / 2, "this test needs a filesystem with less than a petabyte free"
    started = time.time()
    proc = shardtune("launch", str(tiny_config(tmp_path, model)), check=False)
    assert proc.returncode != 0
    problem = (f"on {os.uname().nodename}: {tmp_path / 'run'} has "), "less than one checkpoint ("
    assert "preflight failed" in proc.stderr and all(p in proc.stderr for p in problem), proc.stderr[-3000:]
    said = float(proc.stderr.split("less than one checkpoint (")[1].split(" GB")[0].replace(",", ""))
    assert said == pytest.approx(checkpoint_gb, rel=1e-3)
    assert not RunDir(tmp_path / "run").metrics_file.exists() and not RunDir(tmp_path / "run").checkpoints.exists()
    assert time.time() - started < 120


def test_preflight_warns_when_the_first_save_fits_but_keep_last_plus_one_checkpoints_do_not(tmp_path, tiny_model):
    """A config.json sized so one checkpoint takes 40% of the filesystem's free space: with keep_last 3 and four
    saves, four checkpoints are on disk at once (160%). `shardtune preflight` (which never loads the model)
    passes, warning with the numbers; only a save that cannot fit at all fails a job."""
    stat = os.statvfs(tmp_path)
    free_gb = stat.f_bavail * stat.f_frsize / 1e9
    h, inter = 1024, 4096
    layers = max(1, round(0.4 * free_gb * 1e9 / 16 / (4 * h * h + 3 * h * inter + 2 * h)))
    model, params = llama_shaped(tmp_path, tiny_model, h=h, inter=inter, layers=layers, heads=8, head_dim=128)
    checkpoint_gb = 16 * params / 1e9
    assert 0.3 < checkpoint_gb / free_gb < 0.5, (checkpoint_gb, free_gb)
    cfg = tiny_config(tmp_path, model, train={"max_steps": 40, "save_every": 10, "keep_last": 3})
    out = shardtune("preflight", str(cfg))
    said = out.stdout + out.stderr
    assert "preflight passed: 2 ranks" in said, said[-3000:]
    warning = said.split("warning: ", 1)[1].splitlines()[0]
    assert warning.startswith(str(tmp_path / "run")) and "but the run needs 4 checkpoints of" in warning
    needs = float(warning.split("checkpoints of ")[1].split(" GB")[0].replace(",", ""))
    assert needs == pytest.approx(checkpoint_gb, abs=0.06)  # printed to 0.1 GB


def test_preflight_reserves_the_checkpoints_a_quota_would_refuse_though_the_free_space_shows_room(tmp_path, tiny_model):
    """Free space does not show a quota, the usual limit on a cluster's shared filesystems: a run under one planned
    and started with room to spare and failed its first save hours in. Rank 0's preflight now reserves one
    checkpoint's bytes (a problem when refused) and what the whole run writes (a warning); `launch` warns of both
    before queueing, from the same verdict. No quota can be set here, so a file-size limit (RLIMIT_FSIZE, which a
    write past a quota fails like, with EFBIG for EDQUOT) stands in for it; the free space is this machine's disk."""
    model, params = llama_shaped(tmp_path, tiny_model, h=256, inter=1024, layers=4, heads=4, head_dim=64)
    checkpoint = 16 * params  # ZeRO-2 in fp32: weights, fp32 master, two Adam moments
    cfg = tiny_config(tmp_path, model, train={"max_steps": 40, "save_every": 10, "keep_last": 2})

    def limited(limit: int, command: str, *args: str) -> str:
        proc = subprocess.run([str(Path(sys.executable).parent / "shardtune"), command, str(cfg), *args],
                              capture_output=True, text=True, timeout=300,
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
        return proc.stdout + proc.stderr + f"\nexit {proc.returncode}"

    # `launch` says so before the job is queued, as it warns of a checkpoint larger than the free space.
    planned = limited(checkpoint // 2, "launch", "--dry_run")
    assert planned.endswith("exit 0") and "one checkpoint (" in planned, planned[-3000:]
    assert "cannot be written there (File too large)" in planned.split("one checkpoint (")[1], planned[-3000:]
    # The job's preflight fails it before the model loads.
    refused = limited(checkpoint // 2, "preflight")
    assert "preflight failed" in refused and not refused.endswith("exit 0"), refused[-3000:]
    said = refused.split(f"on {os.uname().nodename}: {tmp_path / 'run'}", 1)[1]
    assert said.split(": ", 1)[1].startswith("one checkpoint (") and "cannot be written there (File too large), " \
        "though its filesystem reports" in said and "The first save would fail" in said, said[:1000]
    # The state, and the 5 MB the plan allows every checkpoint for its tokenizer, config and RNG states.
    assert float(said.split("one checkpoint (")[1].split(" MB")[0]) == pytest.approx(checkpoint / 1e6 + 5, abs=0.06)
    # Room for one checkpoint but not for the three on disk at once while the third is written: a warning, which
    # launch gives from the same verdict as preflight.
    warned = limited(2 * checkpoint, "launch", "--dry_run")
    assert warned.endswith("exit 0") and "one checkpoint (" not in warned, warned[-3000:]
    warning = [line for line in warned.splitlines() if "File too large" in line]
    assert len(warning) == 1 and "3 checkpoints of" in warning[0] and "A later save or the export may fail" \
        in warning[0], warned[-3000:]
