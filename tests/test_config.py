"""Config loading, strict validation, overrides and batch arithmetic (no torch, milliseconds each)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launcher.contract.config import RunConfig, apply_overrides, field_docs, load_config, validate_config
from launcher.contract.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def base() -> dict:
    return {
        "model": {"name_or_path": "org/model"},
        "data": {"path": "data.jsonl", "format": "messages", "seq_len": 256},
        "train": {"max_steps": 10, "micro_batch_size": 2, "grad_accum_steps": 4, "lr": 1e-5, "seed": 1},
        "launch": {"nodes": 2, "procs_per_node": 4},
        "output_dir": "/tmp/x",
    }


def problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    return info.value.problems


def test_valid_config_gets_defaults():
    cfg = validate_config(base())
    assert cfg.zero.stage == 2 and cfg.wandb.mode == "auto" and cfg.data.packing is True
    assert cfg.train.lr == 1e-5


def test_every_problem_is_reported_at_once_with_field_value_and_allowed():
    raw = apply_overrides(base(), ["train.micro_batch_size=0", "train.lr_typo=1", "zero.stage=5", "data.format=csv"])
    found = problems(raw)
    assert len(found) == 4, found
    text = "\n".join(found)
    assert "train.micro_batch_size: 0 is not allowed" in text and "greater than 0" in text
    assert "train.lr_typo: unknown key; did you mean 'train.lr'?" in text
    assert "zero.stage: 5 is not allowed" in text and "0, 1, 2 or 3" in text
    assert "data.format: 'csv'" in text and "'messages'" in text


def test_missing_required_fields_are_named():
    raw = base()
    del raw["train"]["lr"]
    del raw["output_dir"]
    found = problems(raw)
    assert "train.lr: required field is missing" in found
    assert "output_dir: required field is missing" in found


def test_unknown_section_suggests_nearest():
    raw = base()
    raw["trian"] = {"lr": 1}
    assert any("trian: unknown key; did you mean 'train'" in p for p in problems(raw))


def test_overrides_are_parsed_to_field_types():
    raw = apply_overrides(base(), ["train.lr=3e-4", "wandb.tags=[a, b]", "data.packing=false", "zero.stage=3",
                                   "launch.env={NCCL_DEBUG: INFO}"])
    cfg = validate_config(raw)
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.wandb.tags == ["a", "b"] and cfg.data.packing is False and cfg.zero.stage == 3
    assert cfg.launch.env == {"NCCL_DEBUG": "INFO"}


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected section.field=value"):
        apply_overrides(base(), ["train.lr"])


def test_cross_field_rules():
    raw = apply_overrides(base(), ["zero.offload_params=cpu", "zero.stage=2", "train.global_batch_size=100"])
    found = "\n".join(problems(raw))
    assert "zero.offload_params: 'cpu' needs zero.stage 3" in found
    assert "train.global_batch_size: 100 contradicts micro 2 × accumulation 4 × world 8 = 64" in found


def test_evaluation_on_training_rows_and_hub_eval_fields_on_local_data_are_refused(tmp_path, monkeypatch):
    """A local eval file that is also trained on (written as another path to the same file), or a data.mix
    dataset evaluated at the split it trains on: the eval loss would score training rows. Hub-only fields on a
    local eval file would be ignored."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text("{}\n")
    local = problems(apply_overrides(base(), [f"data.eval_path={tmp_path / 'data.jsonl'}", "data.eval_split=test",
                                              "data.eval_revision=v1"]))
    assert local == [
        f"data.eval_revision: 'v1' applies to a hub dataset, and data.eval_path is {tmp_path / 'data.jsonl'}",
        f"data.eval_split: 'test' applies to a hub dataset, and data.eval_path is {tmp_path / 'data.jsonl'}",
        f"data.eval_path: {tmp_path / 'data.jsonl'} is also data.path: evaluation would score rows the run trains "
        f"on; give held-out rows, or hold some out with data.eval_fraction"]
    mixed = apply_overrides(base(), ["data.mix=[{path: org/chats, split: train_sft}]", "data.eval_path=org/chats"])
    assert problems({**mixed, "data": {**mixed["data"], "eval_split": "train_sft"}}) == [
        "data.eval_split: 'train_sft' is the split data.mix[0].path (org/chats) trains on: evaluation would score "
        "rows the run trains on; name a held-out split of it (e.g. test), or hold some out with data.eval_fraction"]
    validate_config({**mixed, "data": {**mixed["data"], "eval_split": "test_sft"}})
    validate_config(apply_overrides(base(), ["data.eval_path=org/other"]))


def test_global_batch_size_without_accumulation_must_divide():
    raw = base()
    del raw["train"]["grad_accum_steps"]
    raw["train"]["global_batch_size"] = 20
    assert any("not a multiple of micro 2 × world 8 = 16" in p for p in problems(raw))
    raw["train"]["global_batch_size"] = 32
    assert validate_config(raw).train.global_batch_size == 32


def test_accumulation_or_global_batch_is_required():
    raw = base()
    del raw["train"]["grad_accum_steps"]
    assert any("train.grad_accum_steps: required unless train.global_batch_size" in p for p in problems(raw))


def test_yaml_errors_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_local_paths_become_absolute_and_hub_ids_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    raw = base()
    raw["model"]["name_or_path"] = "model"
    raw["data"]["path"] = "./data/*.jsonl"
    raw["output_dir"] = "out"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    assert cfg.model.name_or_path == str(tmp_path / "model")
    assert cfg.data.path == str(tmp_path / "data" / "*.jsonl")
    assert cfg.output_dir == str(tmp_path / "out")
    name = "HuggingFaceTB/SmolLM2-135M"
    assert load_config(path, [f"model.name_or_path={name}"]).model.name_or_path == name


def test_every_field_is_documented():
    undocumented = [name for name, _, doc in field_docs(RunConfig) if not doc]
    assert not undocumented, undocumented


@pytest.mark.parametrize("example", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_loads_validates_and_says_how_to_run_it(example):
    first = example.read_text().splitlines()[0]
    assert first.startswith("# Run:") and "shardtune" in first, \
        f"{example.name} must open with the command that runs it"
    from launcher.planning.plan import build_plan

    plan = build_plan(load_config(example))
    assert plan.deepspeed["train_batch_size"] == plan.micro_batch_size * plan.grad_accum_steps * plan.world_size


def test_offload_needs_a_sharding_stage_and_auto_is_allowed():
    found = "\n".join(problems(apply_overrides(base(), ["zero.stage=0", "zero.offload_optimizer=auto"])))
    assert "zero.offload_optimizer: 'auto' needs zero.stage 1, 2, 3 or auto, got stage 0" in found
    cfg = validate_config(apply_overrides(base(), ["zero.stage=auto", "zero.offload_optimizer=auto",
                                                   "zero.offload_params=auto"]))
    assert (cfg.zero.offload_optimizer, cfg.zero.offload_params) == ("auto", "auto")
