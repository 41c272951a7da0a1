"""Mixture-of-experts sizes (issue 19): published totals and active counts from config.json alone, exact
against transformers' modules, unknown layouts counted on the meta device or refused for fit checks, and
memory from all parameters while FLOPs count only the active ones."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import yaml

from launcher.contract.config import validate_config
from launcher.contract.errors import ConfigError
from launcher.planning import meta_size
from launcher.planning.estimate import estimate_command
from launcher.planning.memory import Setup, estimate_memory, layer_activation_bytes
from launcher.planning.model_size import counts_from_config, counts_from_path
from launcher.planning.plan import build_plan, format_plan

from conftest import shardtune

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "data" / "model_configs"

# Published sizes: (total, which active convention the publisher uses, active). Sources: Mistral AI's Mixtral
# announcement (46.7B total, 12.9B per token); the Qwen3-30B-A3B model card (30.5B, 3.3B activated); the OLMoE
# paper (6.9B total, 1.3B active); the DeepSeek-V3 technical report (671B, 37B activated per token); OpenAI's
# gpt-oss model card (21B, 3.6B active). Rounded to what they print, hence 2 % on the active counts.
PUBLISHED = {
    "mixtral_8x7b": (46.7e9, "params_active", 12.9e9),
    "qwen3_30b_a3b": (30.5e9, "params_active", 3.3e9),
    "olmoe_1b_7b": (6.9e9, "params_active", 1.3e9),
    "deepseek_v3": (671e9, "params_active_matmul", 37e9),
    "gpt_oss_20b": (21e9, "params_active_matmul", 3.6e9),
}
ALL_MOE = sorted(PUBLISHED) + ["deepseek_v2_lite", "qwen1_5_moe_a2_7b"]


def model_dir(tmp_path: Path, name: str, cfg: dict | None = None) -> Path:
    out = tmp_path / name
    out.mkdir()
    if cfg is None:
        shutil.copy(CONFIGS / f"{name}.json", out / "config.json")
    else:
        (out / "config.json").write_text(json.dumps(cfg))
    return out


# ---------------------------------------------------------------- the acceptance: published counts


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_estimate_reports_published_total_and_active(tmp_path, name):
    total, convention, active = PUBLISHED[name]
    out = json.loads(shardtune("estimate", f"--model={model_dir(tmp_path, name)}", "--gpus=8", "--json").stdout)
    assert out["params_exact"] is True
    assert abs(out["params"] - total) / total < 0.01, (out["params"], total)
    assert abs(out[convention] - active) / active < 0.02, (out[convention], active)
    assert out["params_active_matmul"] < out["params_active"] < out["params"]  # untied: the embedding is a gather
    # Memory is made of every expert: ZeRO-3 model states are 16 bytes per parameter of the total over 8 ranks.
    assert out["stages"]["3"]["model_states_gb"] == pytest.approx(16 * out["params"] / 8 / 1e9, rel=1e-3)


def test_experts_change_what_fits(tmp_path, capsys):
    """The issue's case: sized like the dense model it is built from (Mistral-7B's shape, 7.2B), Mixtral-8x7B
    would fit 8 × 80 GB at ZeRO-3; with all 46.7B counted, only offloading fits."""
    cfg = json.loads((CONFIGS / "mixtral_8x7b.json").read_text())
    dense = model_dir(tmp_path, "dense", {**cfg, "model_type": "mistral"})
    verdicts = {}
    for name, path in (("dense", dense), ("moe", CONFIGS / "mixtral_8x7b.json")):
        assert estimate_command(model=str(path), gpus=8, gpu_memory_gb=80, json=True) == 0
        verdicts[name] = json.loads(capsys.readouterr().out)
    assert verdicts["moe"]["params"] > 6 * verdicts["dense"]["params"]
    assert verdicts["dense"]["stages"]["3"]["fits"] is True
    assert [verdicts["moe"]["stages"][s]["fits"] for s in "0123"] == [False] * 4
    assert verdicts["moe"]["recommended"]["offload_optimizer"] is True


def test_text_output_names_both_sizes(capsys):
    assert estimate_command(model=str(CONFIGS / "mixtral_8x7b.json"), gpus=8) == 0
    out = capsys.readouterr().out
    assert "46,702,792,704 parameters (46.70B, exact; 12.88B active per token" in out
    assert "2 of 8 experts per token" in out and "memory counts all 46.70B" in out


# ---------------------------------------------------------------- exact against the real modules


def _variants(base: dict, rng: random.Random, n: int) -> list[dict]:
    """Small random variants keeping each family's constraints: layers, widths, heads, experts, top-k, tying,
    biases, dense-layer rules (mlp_only_layers, decoder_sparse_step, first_k_dense_replace), q_lora_rank=None."""
    mt, out = base["model_type"], []
    for _ in range(n):
        c = {k: v for k, v in base.items() if k not in ("pad_token_id", "bos_token_id", "eos_token_id",
                                                         "layer_types", "rope_scaling", "architectures")}
        heads = rng.choice([2, 4, 8])
        kv = rng.choice([d for d in (1, 2, 4, 8) if heads % d == 0])
        hidden = heads * rng.choice([8, 16])
        experts = rng.randint(2, 12)
        c.update(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv, vocab_size=rng.randint(50, 400),
                 num_hidden_layers=rng.randint(1, 5), tie_word_embeddings=rng.random() < 0.4,
                 intermediate_size=rng.randint(8, 96), num_experts_per_tok=rng.randint(1, experts),
                 max_position_embeddings=256)
        if mt in ("mixtral", "gpt_oss"):
            c["num_local_experts"] = experts
            c["head_dim"] = rng.choice([8, 16, 24])
            if mt == "gpt_oss":
                c.update(attention_bias=rng.random() < 0.7, sliding_window=16)
        elif mt in ("qwen2_moe", "qwen3_moe", "olmoe"):
            c["num_experts"] = experts
            if mt == "olmoe":
                c["attention_bias"] = rng.random() < 0.5
            else:
                layers = c["num_hidden_layers"]
                c.update(moe_intermediate_size=rng.randint(4, 48), decoder_sparse_step=rng.randint(1, 3),
                         mlp_only_layers=sorted(rng.sample(range(layers), rng.randint(0, layers - 1))))
                if mt == "qwen2_moe":
                    c.update(shared_expert_intermediate_size=rng.randint(4, 64), qkv_bias=rng.random() < 0.6)
                else:
                    c.update(attention_bias=rng.random() < 0.5, head_dim=rng.choice([8, 16, 24]))
        else:  # deepseek_v2 / v3
            c.update(num_key_value_heads=heads, n_routed_experts=experts, n_group=1, topk_group=1,
                     moe_intermediate_size=rng.randint(4, 48), n_shared_experts=rng.randint(1, 3),
                     first_k_dense_replace=rng.randint(0, c["num_hidden_layers"] - 1), kv_lora_rank=rng.randint(4, 32),
                     q_lora_rank=rng.choice([None, rng.randint(4, 32)]), qk_nope_head_dim=rng.choice([8, 16]),
                     qk_rope_head_dim=rng.choice([4, 8]), v_head_dim=rng.choice([8, 16]),
                     attention_bias=rng.random() < 0.5)
            if mt == "deepseek_v2":
                c.update(mlp_bias=rng.random() < 0.5, topk_method="greedy")
        out.append(c)
    return out


def _meta_model(cfg: dict):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config), config


def _reference(model, top_k: int) -> tuple[int, int, int, int]:
    """(total, active, largest tensor, largest MoE block) read off the modules: the classes transformers names
    `*Experts` hold each layer's experts as 3D tensors with the expert first; a token uses top_k of them."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    inactive, blocks = 0, [0]
    for module in model.modules():
        if type(module).__name__.endswith("Experts"):
            experts = next(module.parameters()).shape[0]
            numel = sum(p.numel() for p in module.parameters())
            inactive += numel // experts * (experts - top_k)
        children = [type(c).__name__ for c in module.children()]
        if any(name.endswith("Experts") for name in children):
            blocks.append(sum(p.numel() for p in module.parameters()))
    return total, total - inactive, max(p.numel() for p in params), max(blocks)


CASES = [(name, i) for name in ALL_MOE for i in range(4)]


@pytest.mark.parametrize("name,variant", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_formula_matches_transformers_modules(name, variant):
    base = json.loads((CONFIGS / f"{name}.json").read_text())
    cfg = base if variant == 0 else _variants(base, random.Random(f"{name}{variant}"), 1)[0]
    model, config = _meta_model(cfg)
    total, active, largest, block = _reference(model, config.num_experts_per_tok)
    counts = counts_from_config(cfg)
    assert (counts.total, counts.active, counts.largest_tensor) == (total, active, largest)
    assert counts.moe.block_params == block


@pytest.mark.parametrize("name", ALL_MOE)
def test_trainer_flops_count_the_active_parameters(name):
    """trainer/flops.py reads the live model; it must agree with the launcher's formula: 6 FLOPs per active weight."""
    from trainer.flops import model_flops_of

    cfg = json.loads((CONFIGS / f"{name}.json").read_text())
    model, config = _meta_model(cfg)
    counts = counts_from_config(cfg)
    flops = model_flops_of(model, config)
    assert flops.matmul_params == counts.moe.active_matmul
    assert flops.matmul_params < counts.total / 3  # all of them would overstate MFU 3.6× (Mixtral) to 18× (V3)


# ---------------------------------------------------------------- architectures without a formula


TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=16)


def test_unknown_moe_is_counted_exactly_on_the_meta_device(capsys):
    """granitemoe: experts in transformers, no formula here. Same SwiGLU experts as Mixtral, so by hand:
    per layer 4 experts × 3·32·16 + router 4·32, attention 2·32·32 + 2·32·16, 2 norms."""
    pytest.importorskip("transformers")
    cfg = {"model_type": "granitemoe", "num_local_experts": 4, "num_experts_per_tok": 2, **TINY}
    counts = counts_from_config(cfg)
    per_layer = 4 * 3 * 32 * 16 + 4 * 32 + 2 * 32 * 32 + 2 * 32 * 16 + 2 * 32
    assert counts.exact and "meta device" in counts.note
    assert counts.total == 2 * 100 * 32 + 32 + 2 * per_layer
    assert counts.active == counts.total - 2 * 2 * 3 * 32 * 16  # 2 of 4 experts idle in each of 2 layers
    assert counts.moe.counted_by == "meta-device"


@pytest.mark.parametrize("real", ["mixtral_8x7b", "olmoe_1b_7b", "qwen3_30b_a3b"])
def test_unknown_moe_without_a_build_is_approximate_within_its_stated_bound(monkeypatch, real):
    """A renamed published config nobody can build: the generic layout must land within the error it states."""
    monkeypatch.setattr(meta_size, "missing_library", lambda: "torch")  # as on a login node without torch
    cfg = {**json.loads((CONFIGS / f"{real}.json").read_text()), "model_type": "someone_elses_moe"}
    truth = PUBLISHED[real][0]
    counts = counts_from_config(cfg)
    assert not counts.exact and counts.moe.counted_by == "approximate"
    assert "torch is not installed here" in counts.note and f"±{counts.moe.uncertainty:.0%}" in counts.note
    assert abs(counts.total - truth) / truth <= counts.moe.uncertainty


def approximate_moe_dir(tmp_path: Path) -> Path:
    cfg = {**json.loads((CONFIGS / "mixtral_8x7b.json").read_text()), "model_type": "someone_elses_moe"}
    return model_dir(tmp_path, "someone_elses_moe", cfg)


def test_estimate_refuses_a_fit_verdict_on_an_approximate_moe_unless_forced(tmp_path, capsys):
    model = str(approximate_moe_dir(tmp_path))
    assert estimate_command(model=model, gpus=8, json=True) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params_exact"] is False and out["recommended"] is None
    assert all(entry["fits"] is None for entry in [*out["stages"].values(), *out["offload"].values()])
    assert "may be off by ±" in out["fit_not_checked"] and "--force_approximate_fit" in out["fit_not_checked"]
    assert estimate_command(model=model, gpus=8) == 0
    text = capsys.readouterr().out
    assert "fit against 80 GB not checked" in text and "fits 80 GB" not in text
    assert estimate_command(model=model, gpus=8, json=True, force_approximate_fit=True) == 0
    forced = json.loads(capsys.readouterr().out)
    assert forced["recommended"] is not None and forced["stages"]["3"]["fits"] in (True, False)


def plan_config(tmp_path: Path, model_path: Path, **sections) -> dict:
    raw = {"model": {"name_or_path": str(model_path)},
           "data": {"path": "d.jsonl", "format": "messages", "seq_len": 2048},
           "train": {"max_steps": 10, "global_batch_size": 64, "lr": 1e-5, "seed": 0, "precision": "bf16"},
           "zero": {"stage": 3}, "launch": {"nodes": 2, "procs_per_node": 4, "device": "cuda", "gpu_memory_gb": 80,
                                            "rdzv_endpoint": "node1:29400"},
           "wandb": {"mode": "disabled"}, "output_dir": str(tmp_path / "run")}
    for section, values in sections.items():
        raw[section].update(values)
    return raw


def test_plan_refuses_gpu_memory_check_on_an_approximate_moe_unless_forced(tmp_path):
    model = approximate_moe_dir(tmp_path)
    with pytest.raises(ConfigError) as info:
        build_plan(validate_config(plan_config(tmp_path, model)))
    message = str(info.value)
    assert "launch.gpu_memory_gb: 80 GB cannot be checked" in message and "may be off by ±" in message
    assert "launch.force_approximate_fit: true" in message
    forced = build_plan(validate_config(plan_config(tmp_path, model, launch={"force_approximate_fit": True,
                                                                             "gpu_memory_gb": 2000})))
    assert forced.memory["params_exact"] is False
    unchecked = build_plan(validate_config(plan_config(tmp_path, model, launch={"gpu_memory_gb": None})))
    assert "may be off by ±" in format_plan(unchecked)


# ---------------------------------------------------------------- memory: ZeRO-3 gathers, activations, plan


def test_zero3_gathers_a_whole_moe_block():
    """DeepSeek-V3: one layer's 256 experts of 3·7168·2048 weights are gathered together (a leaf module)."""
    counts = counts_from_path(CONFIGS / "deepseek_v3.json")
    experts_per_layer = 256 * 3 * 7168 * 2048
    assert counts.largest_tensor == 256 * 2 * 2048 * 7168  # the fused gate_up_proj
    z3 = estimate_memory(counts, Setup(stage=3, world_size=64, gpus_per_node=8))
    assert z3.device["zero3_live_params"] >= 2 * experts_per_layer  # bf16
    assert z3.device["gradient_in_flight"] >= 2 * experts_per_layer
    z2 = estimate_memory(counts, Setup(stage=2, world_size=64, gpus_per_node=8))
    assert z2.device["gradient_in_flight"] == 2 * counts.largest_tensor  # no leaf modules below stage 3


@pytest.mark.parametrize("model_type,extra", [
    ("mixtral", dict(intermediate_size=128, num_local_experts=8, num_experts_per_tok=2)),
    ("mixtral", dict(intermediate_size=96, num_local_experts=16, num_experts_per_tok=4)),
    ("qwen3_moe", dict(intermediate_size=688, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2)),
    ("qwen2_moe", dict(intermediate_size=688, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                       shared_expert_intermediate_size=256)),
], ids=["mixtral-8x2", "mixtral-16x4", "qwen3_moe", "qwen2_moe-shared"])
def test_moe_layer_activations_match_saved_tensors(model_type, extra):
    """What autograd keeps for one MoE layer (grouped_mm experts, sdpa), measured as in test_memory.py."""
    from test_memory import TINY as MEMORY_TINY
    from test_memory import saved_bytes

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = {**MEMORY_TINY, "model_type": model_type, **extra}
    b, s = 2, 64
    hf = (torch, transformers)
    measured = (saved_bytes(hf, cfg, 2, b, s, torch.bfloat16, "sdpa")
                - saved_bytes(hf, cfg, 1, b, s, torch.bfloat16, "sdpa"))
    estimated = layer_activation_bytes(counts_from_config({**cfg, "num_hidden_layers": 1}), b, s, "bf16", "sdpa")
    assert abs(estimated - measured) / measured < 0.005, (estimated, measured)


def test_plan_explains_the_moe_machinery_and_refuses_a_loss_the_model_lacks(tmp_path):
    mixtral = model_dir(tmp_path, "mixtral_8x7b")
    plan = build_plan(validate_config(plan_config(tmp_path, mixtral, launch={"gpu_memory_gb": None})))
    text = format_plan(plan)
    assert "router aux loss × 0.02 (config.json's router_aux_loss_coef)" in text
    assert "ZeRO-3 gathers each MoE block whole as a leaf module" in text and "1.41B parameters at a time" in text
    assert plan.memory["params_active"] == counts_from_path(mixtral).active
    deepseek = model_dir(tmp_path, "deepseek_v3")
    with pytest.raises(ConfigError, match=r"model.router_aux_loss_coef: 0.01 is not allowed for deepseek_v3"):
        build_plan(validate_config(plan_config(tmp_path, deepseek, model={"router_aux_loss_coef": 0.01},
                                               launch={"gpu_memory_gb": None})))
    dense = model_dir(tmp_path, "llama3_8b")
    with pytest.raises(ConfigError, match=r"model.router_aux_loss_coef: 0.01 is not allowed: .* has no experts"):
        build_plan(validate_config(plan_config(tmp_path, dense, model={"router_aux_loss_coef": 0.01})))


def test_bad_moe_settings_fail_validation_naming_field_value_and_allowed(tmp_path):
    raw = plan_config(tmp_path, tmp_path, model={"router_aux_loss_coef": -0.1, "moe_leaf_modules": ["My Block"],
                                                  "experts_implementation": "fastest"})
    with pytest.raises(ConfigError) as info:
        validate_config(yaml.safe_load(yaml.safe_dump(raw)))
    message = str(info.value)
    assert "model.router_aux_loss_coef: -0.1 is not allowed: input should be greater than or equal to 0" in message
    assert "model.moe_leaf_modules.0: 'My Block' is not allowed" in message
    assert "model.experts_implementation: 'fastest' is not allowed: input should be 'auto'" in message
