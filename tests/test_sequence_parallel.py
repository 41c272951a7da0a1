"""Long context with real torchrun processes on CPU (2 ranks): Ulysses sequence parallelism and the chunked loss.

Every expected value comes from a run that does not use the code under test: sequence parallelism (SP) is
checked against SP=1 on the same global batch (the 4D-mask attention, the full-logits loss), the chunked
loss against the full-logits loss, packed rows against each sample run alone by plain transformers.

The runs are shared: one module-scoped set of launches (~10 short runs) serves every assertion. The data is
the shipped chat set at seq_len 256, so rows pack several samples and many cross the slice boundary at 128.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from launcher.contract.config import validate_config
from launcher.contract.errors import ConfigError
from launcher.contract.run_dir import RunDir
from launcher.planning.plan import build_plan, format_plan

from conftest import REPO, losses, read_metrics, shardtune, tiny_config
from remote_models import custom_code_model
from test_e2e_train import final_logits_match_checkpoint

STEPS = 6
# Global batch 4: SP=1 on 2 ranks is 2 replicas × micro 2 × accumulation 1; SP=2 is 1 replica × 2 × 2.
TRAIN = {"max_steps": STEPS, "micro_batch_size": 2, "grad_accum_steps": None, "global_batch_size": 4,
         "eval_every": 3}
DATA = {"seq_len": 256, "eval_fraction": 0.1}


def launch(tmp, model, name, train=None, zero=2, procs=2, *overrides, check=True):
    cfg = tiny_config(tmp, model, train={**TRAIN, **(train or {})}, data=DATA, zero={"stage": zero},
                      launch={"procs_per_node": procs})
    run = tmp / name
    proc = shardtune("launch", str(cfg), f"output_dir={run}", *overrides, check=check)
    return run, proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """Every launch the tests compare, by name: (run directory, the launch's stderr)."""
    tmp = tmp_path_factory.mktemp("long-context")
    plans = {
        "ref_z2": ({"sequence_parallel": 1, "chunked_loss": False}, 2),
        "chunked_z2": ({"sequence_parallel": 1, "chunked_loss": True}, 2),
        "sp_z2": ({"sequence_parallel": 2, "save_every": 3}, 2),  # its step-3 checkpoint: the resume test's start
        "sp_z3": ({"sequence_parallel": 2, "tiled_mlp": True, "activation_checkpointing": "offload"}, 3),
    }
    out = {}
    for name, (train, zero) in plans.items():
        run, proc = launch(tmp, tiny_model, name, train, zero)
        out[name] = (run, proc.stderr + proc.stdout)
    return out


def rows(run) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run) if r.get("loss") is not None}


def eval_losses(run) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in read_metrics(run) if "eval_loss" in r}


def assert_close(got: dict, want: dict, rel: float, what: str):
    assert sorted(got) == sorted(want) and got, (what, sorted(got), sorted(want))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=rel, abs=0), (what, step, got[step], want[step])


@pytest.mark.parametrize("stage", [2, 3])
def test_sp2_equals_sp1_on_the_same_global_batch(runs, stage):
    """Losses, gradient norms, eval losses and token counts of SP=2 equal SP=1's: packed rows included.

    At ZeRO-3 the SP run also tiles its MLPs (2 tiles per slice) and offloads checkpointed inputs, and this is
    the regression test for DeepSpeed's reductions: ZeRO 0-2 divide SP gradients by world / N, ZeRO-3's
    reduce-scatter by the world (trainer/sequence_parallel.py scales each accordingly). Should DeepSpeed make
    them agree, the step-1 gradient norm here is off by 2× and this test fails. Both stages are held to the one
    ZeRO-2 reference on the full logits (the stages train the same model on the same batches), so the ZeRO-3 run
    also checks the chunked loss where ZeRO-3 gathers the head's weight.
    """
    sp, sp_log = runs[f"sp_z{stage}"]
    ref, _ = runs["ref_z2"]
    got, want = rows(sp), rows(ref)
    assert_close({s: r["loss"] for s, r in got.items()}, {s: r["loss"] for s, r in want.items()}, 1e-5, "loss")
    assert got[1]["grad_norm"] == pytest.approx(want[1]["grad_norm"], rel=1e-5)
    assert_close({s: r["grad_norm"] for s, r in got.items()}, {s: r["grad_norm"] for s, r in want.items()}, 1e-4,
                 "grad_norm")
    assert_close(eval_losses(sp), eval_losses(ref), 1e-5, "eval_loss")
    # Tokens are counted once per SP group: the same trained tokens as SP=1, and the rate covers them once.
    for step, row in got.items():
        assert row["trained_tokens"] == want[step]["trained_tokens"]
        step_tokens = row["trained_tokens"] - got.get(step - 1, {"trained_tokens": 0})["trained_tokens"]
        assert row["tokens_per_sec"] * row["step_time"] == pytest.approx(step_tokens, rel=1e-6)
    summary = read_metrics(sp)[0]
    assert summary["data/samples"] > 2 * summary["data/sequences"], "rows should pack several samples"
    assert "train.grad_accum_steps = global 4 / (micro 2 × data-parallel 1 (world 2 / sequence_parallel 2)" in sp_log
    if stage == 3:
        assert "MLPs run in 2 tiles" in sp_log, "the SP=2 ZeRO-3 run must actually tile its MLPs"
        assert "loss chunked" in sp_log, "the SP=2 ZeRO-3 run must chunk its loss"


def test_chunked_loss_equals_full_logits(runs):
    """The first step sees the same weights: loss and gradient norm equal to 1e-6; later steps follow. (At ZeRO-3
    the SP=2 run's chunked loss is held to the same reference.)"""
    got, want = rows(runs["chunked_z2"][0]), rows(runs["ref_z2"][0])
    assert got[1]["loss"] == pytest.approx(want[1]["loss"], rel=1e-6)
    assert got[1]["grad_norm"] == pytest.approx(want[1]["grad_norm"], rel=1e-6)
    assert_close({s: r["loss"] for s, r in got.items()}, {s: r["loss"] for s, r in want.items()}, 1e-5, "loss")
    assert "loss chunked" in runs["chunked_z2"][1] and "loss on the full logits" in runs["ref_z2"][1]


def test_packed_row_token_losses_under_sp_equal_each_sample_alone(tmp_path, tiny_model):
    """Per-token cross-entropy of two packed rows, computed by 2 ranks on their slices, equals each sample run
    alone through plain transformers (sdpa, one sample per forward)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "tokens.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "tests" / "sp_token_losses.py"), str(tiny_model), str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(out.read_text())
    assert got["attention"] == "shardtune_packed_sdpa" and got["slice"] == 64
    ids, targets, token_losses = (torch.tensor(got[k]) for k in ("input_ids", "targets", "token_losses"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.float32)
    crossing = 0
    for row, lengths in enumerate(got["lengths"]):
        start = 0
        for n in lengths:
            end = start + n
            with torch.no_grad():
                logits = model(input_ids=ids[row:row + 1, start:end], use_cache=False).logits[0]
            alone = F.cross_entropy(logits, targets[row, start:end], ignore_index=-100, reduction="none")
            trained = targets[row, start:end] != -100
            assert trained.sum() == n - 1
            diff = (token_losses[row, start:end][trained] - alone[trained]).abs().max().item()
            assert diff < 1e-5, (row, start, end, diff)
            crossing += start < 64 < end
            start = end
    assert crossing == 2, "each row should have a sample that crosses the slice boundary"


def test_resume_with_sp_reproduces_the_uninterrupted_losses(tmp_path, tiny_model, runs):
    """Relaunched from the uninterrupted SP=2 run's step-3 checkpoint: the same later losses; resumed from that
    checkpoint on one rank with SP=1 (a world-size change through the universal format): equal to 1e-5."""
    reference, _ = runs["sp_z2"]
    start = f"train.resume={RunDir(reference).checkpoint(3)}"
    want, want_eval = losses(reference), eval_losses(reference)
    assert sorted(want_eval) == [3, STEPS]
    resumes = {"resumed": ({"sequence_parallel": 2}, 2, 0), "one-rank": ({"sequence_parallel": 1}, 1, 1e-5)}
    for name, (train, procs, rel) in resumes.items():
        run, proc = launch(tmp_path, tiny_model, name, train, 2, procs, start)
        assert "step_00000003 at step 3" in proc.stderr
        assert ("written by 2 ranks, resuming on 1" in proc.stderr) is (procs == 1)
        assert_close(losses(run), {s: want[s] for s in range(4, STEPS + 1)}, rel, f"loss, {name}")
        assert_close(eval_losses(run), {STEPS: want_eval[STEPS]}, rel, f"eval_loss, {name}")


def test_remote_code_trains_under_sp_where_its_attention_can_be_split_and_stops_where_not(tmp_path, tiny_model,
                                                                                          runs):
    """DeepSpeed splits only the attention transformers dispatches by name. The tiny Llama behind its own code
    trains under SP=2 as transformers' Llama does (sp_z2's losses). The same weights behind code that computes its
    own attention would see only each rank's slice of every row (before, that trained without a word): it stops
    at its first forward, naming train.sequence_parallel, with no checkpoint written."""
    remote = custom_code_model(tiny_model, tmp_path / "builders")
    run, _ = launch(tmp_path, remote, "remote", {"sequence_parallel": 2}, 2, 2, "model.trust_remote_code=true")
    assert_close(losses(run), losses(runs["sp_z2"][0]), 1e-6, "remote code under SP")
    own = custom_code_model(tiny_model, tmp_path / "own", "own_attention")
    run, proc = launch(tmp_path, own, "own", {"sequence_parallel": 2}, 2, 2, "model.trust_remote_code=true",
                       check=False)
    assert proc.returncode != 0
    assert "train.sequence_parallel: 2, but TinyCustomForCausalLM sent 0 attention calls through transformers' " \
        "attention functions in one forward of its 2 layers" in proc.stderr
    assert not RunDir(run).complete_checkpoints()


def test_export_of_an_sp_run_loads_and_holds_the_trained_weights(runs, tiny_model):
    final_logits_match_checkpoint(runs["sp_z3"][0], tiny_model)


def _raw(tmp_path, model_dir, attention=None, **sections) -> dict:
    import yaml

    raw = yaml.safe_load(tiny_config(tmp_path, model_dir, **sections).read_text())
    if attention:
        raw["model"]["attn_implementation"] = attention
    return raw


def test_configurations_that_would_leak_attention_are_refused(tmp_path, tiny_model):
    """Under SP the attention gets no mask: kernels that need one (eager), or flash-attention with several rows
    (it reads samples from position ids only for one row), would attend across packed samples."""
    with pytest.raises(ConfigError) as info:
        validate_config(_raw(tmp_path, tiny_model, attention="eager",
                             train={"sequence_parallel": 2}))
    assert "model.attn_implementation: 'eager' cannot run under train.sequence_parallel 2" in str(info.value)
    with pytest.raises(ConfigError) as info:
        validate_config(_raw(tmp_path, tiny_model, attention="flash_attention_2",
                             train={"sequence_parallel": 2, "micro_batch_size": 2}))
    assert "keeps packed samples apart only with one row per micro-batch" in str(info.value)
    # One row per micro-batch, or no packing, is exact with flash-attention: accepted.
    validate_config(_raw(tmp_path, tiny_model, attention="flash_attention_2",
                         train={"sequence_parallel": 2, "micro_batch_size": 1, "grad_accum_steps": 4}))
    validate_config(_raw(tmp_path, tiny_model, attention="flash_attention_2",
                         data={"packing": False}, train={"sequence_parallel": 2}))


def test_sequence_parallel_sizes_the_model_or_world_cannot_split_are_refused(tmp_path, tiny_model):
    with pytest.raises(ConfigError) as info:
        validate_config(_raw(tmp_path, tiny_model, train={"sequence_parallel": 3}, data={"seq_len": 100}))
    text = str(info.value)
    assert "train.sequence_parallel: 3 does not divide the world size 2" in text and "allowed: 1, 2" in text
    assert "data.seq_len: 100 is not a multiple of train.sequence_parallel 3" in text
    # The tiny model has 4 query heads and 2 kv heads: 4 ranks split neither way... only the plan knows the heads.
    raw = _raw(tmp_path, tiny_model, train={"sequence_parallel": 8}, launch={"procs_per_node": 8})
    with pytest.raises(ConfigError) as info:
        build_plan(validate_config(raw))
    assert "train.sequence_parallel: 8 does not divide the model's 4 attention heads" in str(info.value)
    raw = _raw(tmp_path, tiny_model, train={"sequence_parallel": 4}, launch={"procs_per_node": 4})
    plan = build_plan(validate_config(raw))  # 2 kv heads, 4 ranks: each kv head is replicated to 2 ranks
    assert plan.deepspeed["sequence_parallel_size"] == 4 and plan.deepspeed["train_batch_size"] == 2 * 2 * 1
    assert "1 of 2 kv heads per rank, each replicated to 2 ranks" in format_plan(plan)


def test_deepspeed_settings_the_sp_loss_scaling_depends_on_are_refused(tmp_path, tiny_model):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_scatter": False},
                                "gradient_predivide_factor": 2.0}))
    raw = _raw(tmp_path, tiny_model, train={"sequence_parallel": 2}, zero={"stage": 3, "config": str(user)})
    with pytest.raises(ConfigError) as info:
        build_plan(validate_config(raw))
    assert "zero_optimization.reduce_scatter must stay true at ZeRO-3" in str(info.value)
    assert "remove gradient_predivide_factor" in str(info.value)


def test_packed_attention_alone_equals_each_sample_alone(tiny_model):
    """Without any SP: the tiny model loaded with packed_causal_attention gives a packed row the per-token
    losses of its samples run alone (and differs from plain causal attention over the row)."""
    from transformers import AttentionInterface, AutoModelForCausalLM

    from trainer.separation import PACKED_ATTENTION, packed_causal_attention

    AttentionInterface.register(PACKED_ATTENTION, packed_causal_attention)
    packed = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=PACKED_ATTENTION,
                                                  dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.float32)
    lengths = [7, 30, 19]
    ids = torch.tensor(np.random.default_rng(1).integers(1, 500, size=(1, sum(lengths))))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        got = packed(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
        mixed = plain(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], use_cache=False).logits[0]
        start = 0
        for n in lengths:
            alone = plain(input_ids=ids[:, start:start + n], use_cache=False).logits[0]
            assert (got[start:start + n] - alone).abs().max() < 1e-5
            start += n
    assert (got[7:] - mixed[7:]).abs().max() > 1e-2, "the check would not notice attention across samples"
