"""DeepSpeed config rendering: templates and user JSON, every "auto" filled, contradictions caught."""
from __future__ import annotations

import json

import pytest

from launcher.contract.config import apply_overrides, validate_config
from launcher.contract.errors import ConfigError
from launcher.contract.resources import data_dir
from launcher.planning.deepspeed_config import render_deepspeed_config
from launcher.planning.plan import build_plan, resolve


def config(*overrides: str):
    raw = {
        "model": {"name_or_path": "org/model"},
        "data": {"path": "d.jsonl", "format": "text", "seq_len": 512},
        "train": {"max_steps": 10, "micro_batch_size": 3, "grad_accum_steps": 5, "lr": 2e-5, "seed": 0,
                  "weight_decay": 0.1, "grad_clip": 0.5},
        "launch": {"nodes": 2, "procs_per_node": 4, "device": "cuda"},
        "output_dir": "/tmp/run",
    }
    cfg, _ = resolve(validate_config(apply_overrides(raw, list(overrides))))
    return cfg


def autos(tree) -> list:
    if isinstance(tree, dict):
        return [a for v in tree.values() for a in autos(v)]
    return ["auto"] if tree == "auto" else []


TEMPLATE_CHOICES = [("0", "none", "none"), ("1", "none", "none"), ("2", "none", "none"), ("3", "none", "none"),
                    ("1", "cpu", "none"), ("2", "cpu", "none"), ("3", "cpu", "none"), ("3", "cpu", "cpu")]


@pytest.mark.parametrize("stage,opt,params", TEMPLATE_CHOICES)
def test_every_template_renders_without_auto(stage, opt, params):
    ds = render_deepspeed_config(config(f"zero.stage={stage}", f"zero.offload_optimizer={opt}",
                                        f"zero.offload_params={params}"), hidden_size=1024)
    assert autos(ds) == []
    assert ds["train_batch_size"] == 3 * 5 * 8
    assert ds["zero_optimization"]["stage"] == int(stage)
    assert ds["optimizer"]["params"]["lr"] == 2e-5 and ds["optimizer"]["params"]["weight_decay"] == 0.1
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True
    if opt == "cpu":
        assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    if int(stage) == 3:
        assert ds["zero_optimization"]["reduce_bucket_size"] == 1024 * 1024


def test_every_shipped_template_is_covered():
    from launcher.planning.deepspeed_config import template_name

    used = {template_name(int(s), o, p) for s, o, p in TEMPLATE_CHOICES}
    shipped = {p.name for p in data_dir("ds_configs").glob("*.json")}
    assert shipped == used


def test_cpu_uses_torch_adamw_and_fp32():
    ds = render_deepspeed_config(config("launch.device=cpu", "train.precision=fp32", "zero.offload_optimizer=cpu"))
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["zero_force_ds_cpu_optimizer"] is False


def test_user_json_autos_are_filled(tmp_path):
    user = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 2},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}, "bf16": {"enabled": "auto"}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    ds = render_deepspeed_config(config(f"zero.config={path}"))
    assert ds["train_batch_size"] == 120 and ds["optimizer"]["params"]["lr"] == 2e-5
    assert ds["gradient_accumulation_steps"] == 5 and ds["bf16"]["enabled"] is True
    assert autos(ds) == []


def test_user_json_contradictions_are_all_listed(tmp_path):
    user = {"train_batch_size": 64, "gradient_accumulation_steps": 5, "zero_optimization": {"stage": 3},
            "scheduler": {"type": "WarmupLR"}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    with pytest.raises(ConfigError) as info:
        render_deepspeed_config(config(f"zero.config={path}"))
    text = str(info.value)
    assert "train_batch_size is 64 but train.micro_batch_size × train.grad_accum_steps × world = 3 × 5 × 8 gives 120" in text
    assert "zero_optimization.stage is 3 but zero.stage gives 2" in text
    assert "optimizer.params.lr is 0.001 but train.lr gives 2e-05" in text
    assert "remove 'scheduler'" in text
    assert "gradient_accumulation_steps" not in text  # 5 agrees


def test_plan_batch_arithmetic_and_command():
    plan = build_plan(config("launch.rdzv_endpoint=head:29500"))
    assert plan.global_batch_size == 120 == plan.deepspeed["train_batch_size"]
    assert plan.batch_arithmetic == "global batch = micro 3 × accumulation 5 × world 8 (2 nodes × 4) = 120 sequences"
    assert plan.tokens_per_step == 120 * 512
    argv = plan.command
    assert "--nnodes=2" in argv and "--rdzv_backend=c10d" in argv and "--rdzv_endpoint=head:29500" in argv
    assert argv[-3:] == ["-m", "trainer", "/tmp/run"] and "--nproc_per_node=4" in argv


def test_global_batch_size_derives_accumulation():
    cfg = config("train.grad_accum_steps=null", "train.global_batch_size=96")
    assert cfg.train.grad_accum_steps == 4
    plan = build_plan(cfg)
    assert plan.deepspeed["gradient_accumulation_steps"] == 4 and plan.deepspeed["train_batch_size"] == 96


def test_user_json_tuning_numbers_win_over_our_defaults(tmp_path):
    """Bucket sizes and overlap are tuning knobs, not facts of the run: a GPU user's own numbers are kept."""
    user = {"optimizer": {"type": "AdamW", "params": {"torch_adam": True}},
            "zero_optimization": {"stage": 3, "reduce_bucket_size": 500_000_000, "overlap_comm": False,
                                  "stage3_prefetch_bucket_size": 50_000_000}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    ds = render_deepspeed_config(config(f"zero.config={path}", "zero.stage=3"), hidden_size=1024)
    z = ds["zero_optimization"]
    assert ds["optimizer"]["params"]["torch_adam"] is True  # launch.device is cuda here: FusedAdam by default
    assert (z["reduce_bucket_size"], z["overlap_comm"], z["stage3_prefetch_bucket_size"]) == (500_000_000, False, 50_000_000)
    with pytest.raises(ConfigError, match="overlap_comm is False but zero.overlap_comm gives True"):
        render_deepspeed_config(config(f"zero.config={path}", "zero.stage=3", "zero.overlap_comm=true"))
