"""The planner for long sequences: sequence parallelism, the chunked loss, tiled MLPs and offloaded checkpoints.

Config arithmetic only (no torch). The measured side, estimate against peak RSS, is bench/long_context.py.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from launcher.contract.config import validate_config
from launcher.contract.errors import ConfigError
from launcher.planning.chunked_loss import loss_chunk_tokens
from launcher.planning.estimate import estimate_command
from launcher.planning.fastest_fit import longest_seq_len
from launcher.planning.memory import (
    PARAM_BYTES,
    Setup,
    activation_bytes,
    estimate_memory,
    layer_activation_bytes,
    logits_bytes,
)
from launcher.planning.model_size import counts_from_path
from launcher.planning.plan import build_plan, format_plan

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "data" / "model_configs"
LLAMA = counts_from_path(CONFIGS / "llama3_8b.json")  # 32 heads, 8 kv heads, vocab 128256


def test_a_rank_of_a_group_holds_the_activations_of_its_slice():
    """SP=N keeps what SP=1 keeps for seq_len / N tokens, plus one more copy of the attention output (the
    all-to-all's); with fewer kv heads than N each rank also holds the replicated kv heads."""
    e, s = PARAM_BYTES["bf16"], 32768
    q = LLAMA.num_heads * LLAMA.head_dim
    for n in (2, 4, 8):
        slice_bytes = layer_activation_bytes(LLAMA, 1, s // n)
        assert layer_activation_bytes(LLAMA, 1, s, sequence_parallel=n) == slice_bytes + e * (s // n) * q
    # 16 ranks, 8 kv heads: k and v count as 16 heads of the slice (each kv head on two ranks).
    replicated = layer_activation_bytes(LLAMA, 1, s, sequence_parallel=16) - layer_activation_bytes(LLAMA, 1, s // 16)
    assert replicated == e * (s // 16) * (q + 2 * (16 - 8) * LLAMA.head_dim)
    whole = activation_bytes(LLAMA, 1, s, "bf16", checkpointing=True)
    assert activation_bytes(LLAMA, 1, s, "bf16", checkpointing=True, sequence_parallel=8) < whole / 7


def test_the_chunked_loss_holds_one_chunk_not_the_logits():
    e, v, h = PARAM_BYTES["bf16"], LLAMA.vocab_size, LLAMA.hidden_size
    chunk = loss_chunk_tokens(v)
    assert chunk == 128 and chunk * v * 4 <= 64 * 2 ** 20  # one chunk's fp32 logits within the budget
    full = logits_bytes(LLAMA, 4, 4096, "bf16")
    assert full == 4 * 4096 * v * 12  # the 4 × 4096 × 128k: ~8.6 GB of fp32 logits and more
    chunked = logits_bytes(LLAMA, 4, 4096, "bf16", chunk_tokens=chunk)
    assert chunked == chunk * v * (4 + e) + (4 + e) * v * h + e * 4 * 4096 * h
    assert chunked < full / 4
    # Longer sequences add only the hidden states' gradient, not logits.
    longer = logits_bytes(LLAMA, 4, 8192, "bf16", chunk_tokens=chunk)
    assert longer - chunked == e * 4 * 4096 * h


def test_tiled_mlp_and_offloaded_checkpoints_shrink_the_activations():
    base = dict(counts=LLAMA, micro_batch_size=1, seq_len=65536, dtype="bf16", checkpointing=True)
    plain = activation_bytes(**base)
    tiled = activation_bytes(**base, tiled_mlp=True)
    offloaded = activation_bytes(**base, offload_checkpoints=True)
    e, t = PARAM_BYTES["bf16"], 65536
    # The recomputed layer keeps one tile of 4 MLP intermediates instead of all of them.
    tile = -(-t // -(-t // LLAMA.hidden_size))
    assert plain - tiled == 4 * e * (t - tile) * LLAMA.intermediate_size + 2 * e * (t - tile) * LLAMA.intermediate_size
    # All but 3 layer inputs leave the device.
    assert plain - offloaded == (LLAMA.num_layers - 3) * e * t * LLAMA.hidden_size
    setup = Setup(stage=3, world_size=8, gpus_per_node=8, seq_len=65536, activation_checkpointing=True,
                  offload_checkpoints=True)
    est = estimate_memory(LLAMA, setup)
    assert est.host["offloaded_checkpoints"] == 8 * (LLAMA.num_layers - 3) * e * t * LLAMA.hidden_size


@pytest.mark.parametrize("sp", [1, 8])
def test_longest_seq_len_is_the_fit_boundary(sp):
    setup = Setup(stage=3, world_size=8, gpus_per_node=8, activation_checkpointing=True, sequence_parallel=sp,
                  chunked_loss=True)
    longest = longest_seq_len(LLAMA, setup, 80.0)
    step = math.lcm(128, sp)  # answers in multiples of 128 that N divides
    assert longest % step == 0
    assert estimate_memory(LLAMA, replace(setup, seq_len=longest)).fits(80.0)
    assert not estimate_memory(LLAMA, replace(setup, seq_len=longest + step)).fits(80.0)
    if sp == 8:
        assert longest > 6 * longest_seq_len(LLAMA, replace(setup, sequence_parallel=1), 80.0)


def test_estimate_answers_the_longest_seq_len(capsys, tmp_path):
    shutil.copy(CONFIGS / "llama3_8b.json", tmp_path / "config.json")
    assert estimate_command(model=str(tmp_path), gpus=8, activation_checkpointing=True, sequence_parallel=8,
                            seq_len=8192, max_seq_len=True, json=True) == 0
    out = json.loads(capsys.readouterr().out)
    longest = out["longest_seq_len"]["3_none"]
    setup = Setup(stage=3, world_size=8, gpus_per_node=8, activation_checkpointing=True, sequence_parallel=8,
                  chunked_loss=True)
    assert longest == longest_seq_len(LLAMA, setup, 80.0) and longest > 131072
    assert estimate_command(model=str(tmp_path), gpus=8, sequence_parallel=3) == 2
    assert "--sequence_parallel: 3 does not divide the 8 devices" in capsys.readouterr().err


def _raw(tmp_path, **train) -> dict:
    model = tmp_path / "llama3_8b"
    model.mkdir(exist_ok=True)
    shutil.copy(CONFIGS / "llama3_8b.json", model / "config.json")
    return {"model": {"name_or_path": str(model)},
            "data": {"path": "data.jsonl", "format": "messages", "seq_len": 131072},
            "train": {"max_steps": 10, "global_batch_size": 8, "micro_batch_size": 1, "lr": 1e-5, "seed": 0,
                      "precision": "bf16", "activation_checkpointing": True, **train},
            "zero": {"stage": 3}, "launch": {"nodes": 1, "procs_per_node": 8, "device": "cuda", "gpu_memory_gb": 80},
            "wandb": {"mode": "disabled"}, "output_dir": str(tmp_path / "run")}


def test_sequence_parallel_auto_picks_the_smallest_group_that_fits(tmp_path):
    plan = build_plan(validate_config(_raw(tmp_path, sequence_parallel="auto")))
    n = plan.config.train.sequence_parallel
    assert n > 1
    for smaller in (d for d in range(1, n) if 8 % d == 0):
        assert not estimate_memory(LLAMA, replace(_setup_of(plan), sequence_parallel=smaller)).fits(80.0)
    assert estimate_memory(LLAMA, _setup_of(plan)).fits(80.0)
    note = next(x for x in plan.notes if x.startswith("train.sequence_parallel=auto"))
    assert f"-> {n}: the smallest group size that fits" in note and "1 does not fit" in note
    # global 8 = micro 1 × accumulation × replicas (8 / n)
    assert plan.config.train.grad_accum_steps == 8 // (8 // n) and plan.deepspeed["train_batch_size"] == 8
    assert plan.deepspeed["sequence_parallel_size"] == n
    text = format_plan(plan)
    assert f"split over {n} ranks" in text and "longest data.seq_len that fits 80 GB with these settings" in text
    # A short sequence fits without splitting it.
    short = build_plan(validate_config({**_raw(tmp_path, sequence_parallel="auto"),
                                        "data": {"path": "data.jsonl", "format": "messages", "seq_len": 2048}}))
    assert short.config.train.sequence_parallel == 1


def _setup_of(plan) -> Setup:
    t = plan.config.train
    return Setup(stage=3, world_size=8, gpus_per_node=8, micro_batch_size=1, seq_len=plan.config.data.seq_len,
                 dtype="bf16", activation_checkpointing=True, sequence_parallel=t.sequence_parallel,
                 chunked_loss=t.chunked_loss is True)


def test_chunked_loss_auto_is_on_where_exact_and_shown_in_the_plan(tmp_path):
    plan = build_plan(validate_config(_raw(tmp_path, sequence_parallel=8)))
    assert plan.config.train.chunked_loss is True
    assert "loss chunked (chunks of 128 positions" in format_plan(plan)
    raw = _raw(tmp_path, sequence_parallel=8)
    config = json.loads((CONFIGS / "llama3_8b.json").read_text())
    Path(raw["model"]["name_or_path"], "config.json").write_text(json.dumps({**config, "logit_scale": 0.25}))
    plan = build_plan(validate_config(raw))
    assert plan.config.train.chunked_loss is False
    assert any("train.chunked_loss=auto -> false: its config transforms the logits (logit_scale=0.25)" in n
               for n in plan.notes)


def _llama31_70b_run(tmp_path, **sections) -> dict:
    """Llama 3.1 70B (the 3.0 fixture's shape with its 128k context) at 131,072 tokens on 8 nodes × 8 GPUs of
    80 GB, every long-context setting at its default: no activation checkpointing, no sequence parallelism."""
    model = tmp_path / "llama31_70b"
    model.mkdir(exist_ok=True)
    config = json.loads((CONFIGS / "llama3_70b.json").read_text())
    config.update(max_position_embeddings=131072, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    (model / "config.json").write_text(json.dumps(config))
    raw = {"model": {"name_or_path": str(model)},
           "data": {"path": "data.jsonl", "format": "messages", "seq_len": 131072},
           "train": {"max_steps": 10, "global_batch_size": 64, "micro_batch_size": "auto", "lr": 1e-5, "seed": 0,
                     "precision": "bf16"},
           "zero": {"stage": "auto"},
           "launch": {"nodes": 8, "procs_per_node": 8, "device": "cuda", "gpu_memory_gb": 80,
                      "rdzv_endpoint": "node1:29400"},
           "wandb": {"mode": "disabled"}, "output_dir": str(tmp_path / "run")}
    for section, values in sections.items():
        raw[section].update(values)
    return raw


@pytest.mark.parametrize("pinned", [False, True], ids=["auto-stage", "pinned-stage"])
def test_a_length_that_needs_several_settings_at_once_is_told_them(tmp_path, pinned, capsys):
    """No single change fits 128k tokens of a 70B model on 80 GB devices: the checkpointed layer inputs alone are
    80 layers × 131,072 × 8,192 × 2 bytes = 172 GB per sequence, so only a sequence split over at least 4 ranks
    (172 / 4 = 43 GB, beside ZeRO-3's 16 bytes × 70.6B / 64 = 17.6 GB of model states) fits, and only with
    activation checkpointing. The refusal used to offer a 128-fold shorter data.seq_len; now its first remedy keeps
    the length and the devices, and following it gives a plan that fits."""
    pin = {"zero": {"stage": 3}, "train": {"micro_batch_size": 1}} if pinned else {}
    raw = _llama31_70b_run(tmp_path, **pin)
    with pytest.raises(ConfigError) as info:
        build_plan(validate_config(raw))
    assert info.value.title == "does not fit"
    same = "would fit: the same data.seq_len 131072 on the same 64 devices with "
    remedies = [p for p in info.value.problems if p.startswith(same)]
    assert len(remedies) == 1, info.value.problems
    fields = dict(f.split(": ") for f in remedies[0].split(" with ", 1)[1].split(" (", 1)[0].split(", "))
    assert fields["train.activation_checkpointing"] == "true" and fields["zero.offload_optimizer"] == "none"
    group = int(fields["train.sequence_parallel"])
    assert group >= 4
    for name, value in fields.items():
        section, key = name.split(".")
        raw[section][key] = yaml_value(value)
    plan = build_plan(validate_config(raw))
    assert plan.config.train.sequence_parallel == group and plan.config.train.recomputes
    assert plan.memory["fits"] is True and plan.memory["total_gb"] <= 80
    # The planner's own choice, asked with these fields on auto, is the same group.
    auto = build_plan(validate_config(_llama31_70b_run(tmp_path, train={"sequence_parallel": "auto",
                                                                         "activation_checkpointing": "auto"})))
    assert auto.config.train.sequence_parallel == group
    # `shardtune estimate` gives the same remedy for the same model and devices.
    assert estimate_command(model=str(tmp_path / "llama31_70b"), gpus=64, seq_len=131072) == 0
    out = capsys.readouterr().out
    assert "nothing fits; what would:" in out and f"train.sequence_parallel: {group} (" in out


def yaml_value(text: str):
    return {"true": True, "false": False}.get(text, int(text) if text.isdigit() else text)


def test_the_remedy_never_splits_a_sliding_window_model(tmp_path, capsys):
    """Mistral 7B attends within 4,096 tokens, a window sequence parallelism cannot keep (launch refuses it), so
    at 32k tokens on 40 GB devices the remedy that keeps the length finds another way, and it plans."""
    model = tmp_path / "mistral_7b"
    model.mkdir()
    shutil.copy(CONFIGS / "mistral_7b.json", model / "config.json")
    raw = {"model": {"name_or_path": str(model)},
           "data": {"path": "data.jsonl", "format": "messages", "seq_len": 32768},
           "train": {"max_steps": 10, "global_batch_size": 8, "micro_batch_size": 1, "lr": 1e-5, "seed": 0,
                     "precision": "bf16"},
           "zero": {"stage": 3}, "launch": {"nodes": 1, "procs_per_node": 8, "device": "cuda", "gpu_memory_gb": 40},
           "wandb": {"mode": "disabled"}, "output_dir": str(tmp_path / "run")}
    with pytest.raises(ConfigError) as info:
        build_plan(validate_config(raw))
    remedy = next(p for p in info.value.problems if p.startswith("would fit: the same data.seq_len 32768"))
    assert "sequence_parallel" not in remedy
    for field in remedy.split(" with ", 1)[1].split(" (", 1)[0].split(", "):
        (section, key), value = field.split(": ")[0].split("."), field.split(": ")[1]
        raw[section][key] = yaml_value(value)
    assert build_plan(validate_config(raw)).memory["fits"] is True
    assert estimate_command(model=str(model), gpus=8, gpu_memory_gb=40, seq_len=32768) == 0
    assert "sequence_parallel" not in capsys.readouterr().out


def test_sequence_parallel_auto_prefers_a_larger_group_with_room_to_a_tight_fit(tmp_path):
    """At the longest length SP=1 fits at all, its fit is tight (less room than measured peaks have exceeded their
    estimates by). `auto` passes a tight fit over for the next configuration with room, and the next group size is
    one: it must be chosen, not the tight SP=1 that the smallest-group rule alone would take."""
    base = Setup(stage=3, world_size=8, gpus_per_node=8, micro_batch_size=1, dtype="bf16",
                 activation_checkpointing=True, chunked_loss=True)
    seq = longest_seq_len(LLAMA, base, 80.0)
    alone = estimate_memory(LLAMA, replace(base, seq_len=seq))
    assert alone.tight(80.0)
    raw = _raw(tmp_path, sequence_parallel="auto")
    raw["data"]["seq_len"] = seq
    plan = build_plan(validate_config(raw))
    n = plan.config.train.sequence_parallel
    assert n == 2 and plan.memory["fits"] is True
    assert not estimate_memory(LLAMA, replace(_setup_of(plan))).tight(80.0)
    note = next(x for x in plan.notes if x.startswith("train.sequence_parallel=auto"))
    assert "-> 2: the smallest group size that fits with room (1 does not fit with room (" in note and "tight" in note
    # Pinned to 1, the same length still plans, flagged as tight.
    pinned = build_plan(validate_config({**raw, "train": {**raw["train"], "sequence_parallel": 1}}))
    assert pinned.config.train.sequence_parallel == 1 and "TIGHT" in format_plan(pinned)


def test_sequence_parallel_is_allowed_for_the_moe_families_it_was_verified_on():
    """tests/test_moe_e2e.py trains Mixtral and Qwen3-MoE under SP, tests/test_sink_attention.py gpt-oss (its sinks
    and windows on the sink kernel); DeepSeek's latent attention is refused, naming the families allowed."""
    from launcher.planning.sequence_parallel import SEQUENCE_PARALLEL_MOE, sliding_window_problem, split_problems

    for fixture in ("qwen3_30b_a3b", "mixtral_8x7b", "gpt_oss_20b"):
        assert split_problems(8, counts_from_path(CONFIGS / f"{fixture}.json")) == [], fixture
    gpt_oss = json.loads((CONFIGS / "gpt_oss_20b.json").read_text())
    assert sliding_window_problem(8, gpt_oss, 131072) is None  # the kernel applies its 128-token windows itself
    assert sliding_window_problem(8, {**gpt_oss, "model_type": "mistral"}, 131072) is not None
    problems = split_problems(8, counts_from_path(CONFIGS / "deepseek_v3.json"))
    assert any(f"verified for the mixture-of-experts families {', '.join(SEQUENCE_PARALLEL_MOE)} only" in p
               for p in problems), problems
