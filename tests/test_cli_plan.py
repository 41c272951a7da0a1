"""`shardtune plan`: the real console script in a subprocess, torch-free, failing early on bad input."""
from __future__ import annotations

import json
import subprocess
import sys

from launcher.contract.run_dir import RunDir

from conftest import EXAMPLES, REPO, shardtune


def test_plan_json_has_the_contract_fields_and_consistent_batch():
    out = json.loads(shardtune("plan", str(EXAMPLES / "tiny.yaml"), "--json").stdout)
    for key in ("world_size", "micro_batch_size", "grad_accum_steps", "global_batch_size", "deepspeed", "command"):
        assert key in out, key
    ds = out["deepspeed"]
    assert ds["train_batch_size"] == out["micro_batch_size"] * out["grad_accum_steps"] * out["world_size"]
    assert ds["train_batch_size"] == out["global_batch_size"]
    assert "torch.distributed.run" in out["command"] and "-m trainer" in out["command"]


def test_plan_overrides_change_the_plan():
    out = json.loads(shardtune("plan", str(EXAMPLES / "tiny.yaml"), "launch.procs_per_node=4",
                               "train.micro_batch_size=3", "--json").stdout)
    assert out["world_size"] == 4 and out["deepspeed"]["train_batch_size"] == 3 * 2 * 4


def test_plan_does_not_import_torch():
    code = (f"import sys; from launcher.cli import main; "
            f"rc = main(['plan', {str(EXAMPLES / 'tiny.yaml')!r}, '--json']);"
            "heavy = [m for m in ('torch', 'deepspeed', 'transformers', 'datasets', 'trainer') if m in sys.modules];"
            "print('HEAVY', heavy); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout


def test_bad_values_fail_before_anything_starts_naming_the_field(tmp_path):
    proc = shardtune("plan", str(EXAMPLES / "tiny.yaml"), "train.micro_batch_size=0", check=False)
    assert proc.returncode == 2
    assert "train.micro_batch_size: 0 is not allowed" in proc.stderr
    proc = shardtune("plan", str(EXAMPLES / "tiny.yaml"), "train.lr_typo=1", check=False)
    assert proc.returncode == 2
    assert "train.lr_typo: unknown key; did you mean 'train.lr'?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_launch_refuses_bad_config_without_writing_anything(tmp_path):
    out = tmp_path / "run"
    proc = shardtune("launch", str(EXAMPLES / "tiny.yaml"), f"output_dir={out}", "zero.stage=7", check=False)
    assert proc.returncode == 2 and "zero.stage: 7 is not allowed" in proc.stderr
    assert not out.exists()


def test_launch_dry_run_writes_the_run_files(tmp_path):
    out = tmp_path / "run"
    shardtune("launch", str(EXAMPLES / "tiny.yaml"), f"output_dir={out}", "--dry_run")
    assert RunDir(out).config_file.is_file()
    ds = json.loads(RunDir(out).ds_config_file.read_text())
    assert ds["train_batch_size"] == 8
    script = RunDir(out).script("torchrun").read_text()
    assert script.startswith("#!/usr/bin/env bash") and "torch.distributed.run" in script and str(out) in script
    assert subprocess.run(["bash", "-n", str(RunDir(out).script("torchrun"))]).returncode == 0


def test_multi_node_torchrun_renders_rendezvous(tmp_path):
    out = tmp_path / "run"
    proc = shardtune("launch", str(EXAMPLES / "tiny.yaml"), f"output_dir={out}", "launch.nodes=2",
                     "launch.rdzv_endpoint=10.0.0.1:29400", "launch.device=cpu")
    script = RunDir(out).script("torchrun").read_text()
    assert "--nnodes=2" in script and "--rdzv_endpoint=10.0.0.1:29400" in script and "--rdzv_backend=c10d" in script
    assert "each of the 2 nodes" in proc.stdout


def test_multi_node_torchrun_never_takes_its_device_from_this_machine(tmp_path):
    """A GPU-less login node must not render a multi-node run for CPU (fp32, gloo, torch AdamW)."""
    proc = shardtune("plan", str(EXAMPLES / "tiny.yaml"), f"output_dir={tmp_path}", "launch.nodes=2",
                     "launch.rdzv_endpoint=10.0.0.1:29400", check=False)
    assert proc.returncode == 2 and "launch.device: 'auto' cannot be decided for a 2-node torchrun run" in proc.stderr
