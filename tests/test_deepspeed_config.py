"""DeepSpeed config rendering: templates and user JSON, every "auto" filled, contradictions caught."""
from __future__ import annotations

import json
from pathlib import Path

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
    if int(stage) == 3:  # no config.json on disk: the bucket rule's floor, 90 MB of bf16 gradients
        assert ds["zero_optimization"]["reduce_bucket_size"] == 90_000_000 // 2


def test_every_shipped_template_is_covered():
    from launcher.planning.deepspeed_config import template_name

    used = {template_name(int(s), o, p) for s, o, p in TEMPLATE_CHOICES}
    shipped = {p.name for p in data_dir("ds_configs").glob("*.json")}
    assert shipped == used


def test_cpu_uses_torch_adamw_and_fp32():
    ds = render_deepspeed_config(config("launch.device=cpu", "train.precision=fp32", "zero.offload_optimizer=cpu"))
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["optimizer"]["params"]["fused"] is True
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
    assert ("train_batch_size is 64 but train.micro_batch_size × train.grad_accum_steps × world = 3 × 5 × 8 "
            "gives 120") in text
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
    got = (z["reduce_bucket_size"], z["overlap_comm"], z["stage3_prefetch_bucket_size"])
    assert got == (500_000_000, False, 50_000_000)
    with pytest.raises(ConfigError, match="overlap_comm is False but zero.overlap_comm gives True"):
        render_deepspeed_config(config(f"zero.config={path}", "zero.stage=3", "zero.overlap_comm=true"))


# The bucket rule's inputs as the README states them: a collective's fixed latency of 25 µs, a bus bandwidth
# of 400 GB/s, and latency at most 10 % of a bucket's time.
LATENCY_S, BUS_BANDWIDTH, LATENCY_SHARE = 25e-6, 400e9, 0.10
CONFIGS = Path(__file__).resolve().parent / "data" / "model_configs"
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 512, "tie_word_embeddings": False}


def llama_parameters(c: dict) -> int:
    """A Llama's parameters counted by hand from its config.json: embeddings, per layer q, k, v, o, the
    SwiGLU MLP and two RMSNorms, and the final norm."""
    h, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    d = h // heads
    layer = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * c["intermediate_size"] + 2 * h
    return c["vocab_size"] * h * (1 if c["tie_word_embeddings"] else 2) + c["num_hidden_layers"] * layer + h


def plan_with_model(tmp_path: Path, model_config: dict, precision: str, stage: int):
    """The plan of a run whose model directory holds only config.json, as a downloaded model looks to the planner."""
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(model_config))
    raw = {"model": {"name_or_path": str(model)}, "data": {"path": "d.jsonl", "format": "text", "seq_len": 512},
           "train": {"max_steps": 10, "micro_batch_size": 1, "grad_accum_steps": 1, "lr": 1e-5, "seed": 0,
                     "precision": precision},
           "zero": {"stage": stage}, "launch": {"nodes": 2, "procs_per_node": 4, "device": "cuda"},
           "output_dir": str(tmp_path / "run")}
    return build_plan(validate_config(raw))


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("stage", [2, 3])
def test_bucket_sizes_follow_the_rule_for_a_tiny_and_a_70b_model(tmp_path, precision, stage):
    """Never a bucket so small that latency dominates, never one larger than the gradients it could hold,
    and the planner's memory estimate counts what DeepSpeed allocates for them."""
    grad_bytes = {"bf16": 2, "fp32": 4}[precision]
    floor_bytes = (1 - LATENCY_SHARE) / LATENCY_SHARE * LATENCY_S * BUS_BANDWIDTH  # 90 MB
    llama_70b = json.loads((CONFIGS / "llama3_70b.json").read_text())
    assert 70.5e9 < llama_parameters(llama_70b) < 70.6e9  # Meta's published 70.6B
    for model_config, expected in ((llama_70b, floor_bytes / grad_bytes),
                                   (TINY_LLAMA, llama_parameters(TINY_LLAMA))):
        plan = plan_with_model(tmp_path, model_config, precision, stage)
        z = plan.deepspeed["zero_optimization"]
        bucket = z["reduce_bucket_size"]
        if expected < floor_bytes / grad_bytes:  # the tiny model: one bucket holds all its gradients
            assert expected <= bucket < expected + 1024 and bucket % 2 == 0
        else:  # the 70B model: at the floor, where latency is exactly 10 % of a bucket's time
            assert bucket == pytest.approx(expected, rel=1e-12)
            seconds = bucket * grad_bytes / BUS_BANDWIDTH
            assert LATENCY_S / (LATENCY_S + seconds) == pytest.approx(LATENCY_SHARE)
        if stage == 3:
            assert z["stage3_prefetch_bucket_size"] == bucket
        else:
            assert z["allgather_bucket_size"] == 500_000_000  # DeepSpeed's own: no memory, >= the floor
        # DeepSpeed allocates the reduce bucket whole: twice at stages 1-2 with overlap_comm (on on GPUs), once at 3.
        buffers = 2 if stage == 2 and z["overlap_comm"] else 1
        assert plan.memory["device_gb"]["reduce_buckets"] == round(buffers * bucket * grad_bytes / 1e9, 3)


UPDATE_PEAK = """
import sys, torch
def status(field):  # bytes
    return 1024 * int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])
torch.set_num_threads(1)
n = 50_000_000
p = torch.nn.Parameter(torch.randn(n)); p.grad = torch.randn(n)
opt = torch.optim.AdamW([p], lr=1e-3, fused=sys.argv[1] == "fused")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # the peak RSS restarts from the current one (an earlier, higher peak would hide the step's)
before = status("VmRSS:")
opt.step()  # allocates the two moments, and the update's temporaries if it has any
print(status("VmHWM:") - before)
"""


def test_torch_fused_adamw_updates_in_place_so_the_planner_counts_no_temporaries_for_it():
    """The planner leaves optimizer temporaries out for what the launcher renders on CPU (torch's AdamW with
    fused kernels) and counts them for a user's zero.config that turns fusion off: measured, not assumed."""
    import subprocess
    import sys

    from launcher.planning.memory_plan import optimizer_of

    rendered = render_deepspeed_config(config("launch.device=cpu", "train.precision=fp32"))
    assert optimizer_of(rendered) == "fused"
    assert optimizer_of({"optimizer": {"params": {"torch_adam": True, "fused": False}}}) == "torch"
    grown = {mode: int(subprocess.run([sys.executable, "-c", UPDATE_PEAK, mode], capture_output=True, text=True,
                                      check=True).stdout.split()[-1]) for mode in ("fused", "unfused")}
    tensor = 4 * 50_000_000
    assert 1.9 * tensor < grown["fused"] < 2.2 * tensor  # the two moments, updated in place
    assert grown["unfused"] > 3.8 * tensor  # and the two fp32 temporaries optimizer_temporaries counts
