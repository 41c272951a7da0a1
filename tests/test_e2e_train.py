"""End to end: `shardtune launch` with 2 real torchrun processes on CPU at ZeRO 1, 2 and 3."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from launcher.contract.run_dir import RunDir

from conftest import read_metrics, shardtune, tiny_config


def final_logits_match_checkpoint(run_dir, model_dir):
    """final/ must reproduce the trained weights; DeepSpeed's own zero_to_fp32.py recovers them independently."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ckpts = RunDir(run_dir).checkpoints
    recovered = run_dir / "zero_to_fp32"
    proc = subprocess.run([sys.executable, str(ckpts / "zero_to_fp32.py"), str(ckpts), str(recovered),
                           "--safe_serialization"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = {}
    for f in recovered.glob("*.safetensors"):
        state.update(load_file(f))
    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    final = AutoModelForCausalLM.from_pretrained(RunDir(run_dir).final)
    tok = AutoTokenizer.from_pretrained(RunDir(run_dir).final)
    ids = tok.apply_chat_template([{"role": "user", "content": "reverse: cat dog"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.equal(final(ids).logits, reference(ids).logits)
        initial = AutoModelForCausalLM.from_pretrained(model_dir)(ids).logits
    assert not torch.allclose(final(ids).logits, initial), "the exported model still holds the initial weights"
    generated = final.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > ids.shape[1]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_launch_trains_and_exports(tmp_path, tiny_model, stage):
    cfg = tiny_config(tmp_path, tiny_model, zero={"stage": stage}, train={"sample_prompt": "reverse: cat dog"})
    proc = shardtune("launch", str(cfg))
    run_dir = tmp_path / "run"
    assert "sample: 'reverse: cat dog'\n    -> '" in proc.stdout + proc.stderr
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 13))
    for r in rows:
        assert {"loss", "lr", "grad_norm", "tokens_per_sec"} <= r.keys() and r["tokens_per_sec"] > 0
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    final_logits_match_checkpoint(run_dir, tiny_model)


def test_a_failed_sample_reply_leaves_the_run_completed(tmp_path, tiny_model):
    """The sample reply loads and runs the whole exported model on rank 0's CPU after the export: it used to run
    before the run was marked completed, so its failure failed a run whose model was already written."""
    cfg = tiny_config(tmp_path, tiny_model, zero={"stage": 0}, launch={"procs_per_node": 1},
                      train={"max_steps": 2, "warmup_steps": 1, "sample_prompt": "hi"})
    proc = shardtune("launch", str(cfg), env={"SHARDTUNE_FAULTS": "fail_sample@0:0"})
    run = RunDir(tmp_path / "run")
    assert "sample: not generated (RuntimeError: injected fault" in proc.stdout + proc.stderr
    assert run.read_status()["state"] == "completed" and (run.final / "config.json").is_file()


def test_a_rank_whose_interpreter_teardown_aborts_still_ends_a_completed_run_cleanly(tmp_path, tiny_model):
    """A rank of a completed ZeRO-3 run once aborted in CI after its last step ("terminate called without an
    active exception"): gloo's worker threads outlive `destroy_process_group`, and one touching Python while the
    interpreter was being torn down is the likely cause. That race cannot be timed from outside, so rank 1's
    teardown is made to abort (`abort_in_teardown`, an atexit hook calling os.abort); the ranks end before any
    teardown runs."""
    cfg = tiny_config(tmp_path, tiny_model, zero={"stage": 3}, train={"max_steps": 2, "warmup_steps": 1})
    proc = shardtune("launch", str(cfg), env={"SHARDTUNE_FAULTS": "abort_in_teardown@0:1"})
    assert "fault injection armed on rank 1: abort_in_teardown@0" in proc.stderr
    assert "SIGABRT" not in proc.stderr and "exitcode" not in proc.stderr, proc.stderr[-3000:]
    run = RunDir(tmp_path / "run")
    assert run.read_status()["state"] == "completed" and (run.final / "config.json").is_file()


@pytest.mark.parametrize("stage", [2, 3])
def test_training_runs_in_training_mode_and_activation_checkpointing_recomputes(tmp_path, tiny_model, stage):
    """from_pretrained returns a model in eval mode and DeepSpeed leaves it there: the trainer trained that way, so
    transformers' activation checkpointing (on only in training mode) recomputed nothing and dropout was off. A
    remote-code Llama whose MLPs record every call: each runs with grad, in training mode, twice per micro-batch
    (forward, then the recompute in backward): 2 steps × 2 micro-batches × 2 layers × 2 = 16 calls. The data is
    not packed here, so nothing else (the packing check) switches modes first. One rank: the mode is each
    process's own."""
    import yaml

    from remote_models import custom_code_model

    model = custom_code_model(tiny_model, tmp_path / "records", "records")
    cfg = tiny_config(tmp_path, model, zero={"stage": stage}, data={"packing": False}, launch={"procs_per_node": 1},
                      train={"max_steps": 2, "warmup_steps": 1, "activation_checkpointing": True, "compile": False})
    raw = yaml.safe_load(cfg.read_text())
    raw["model"]["trust_remote_code"] = True
    cfg.write_text(yaml.safe_dump(raw))
    record = tmp_path / "calls"
    shardtune("launch", str(cfg), env={"SHARDTUNE_TEST_RECORD": str(record)})
    (path,) = tmp_path.glob("calls.*")  # one per rank
    calls = [tuple(map(int, line.split())) for line in path.read_text().splitlines()]
    assert calls == [(1, 1)] * 16, path.read_text()
