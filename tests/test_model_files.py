"""A model directory whose weight files are not whole or not all there fails before anything trains.

Damaged the ways an interrupted download or copy, or a shard of another revision, leaves a real
`save_pretrained` directory. The judge of "damaged" is transformers itself: for each case, its from_pretrained
raises or reports weights it had to start at random, and for the intact directories it does neither. Then the
same damage through `shardtune launch` (refused before any run file is written), through the preflight of a job
whose model was damaged after it was planned, and a consistent checkpoint that lacks the model's head, which
transformers would load without an error.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from launcher.contract.run_dir import RunDir
from launcher.planning.model_files import weight_files_problems

from conftest import shardtune, tiny_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """The same random Llama saved three ways: in 100 KB safetensors shards with an index, as one safetensors
    file, and as one torch.save pickle."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=512,
                                         tie_word_embeddings=False))
    model.save_pretrained(root / "sharded", max_shard_size="100KB")
    model.save_pretrained(root / "single")
    (root / "pickle").mkdir()
    model.config.save_pretrained(root / "pickle")
    torch.save(model.state_dict(), root / "pickle" / "pytorch_model.bin")
    return {"sharded": root / "sharded", "single": root / "single", "pickle": root / "pickle"}


def shard(i: int) -> str:
    return f"model-{i:05d}-of-00009.safetensors"


def cut(file: Path, keep: float = 0.5) -> None:
    os.truncate(file, int(file.stat().st_size * keep))


DAMAGES = {
    "a shard missing": ("sharded", shard(5), lambda d: (d / shard(5)).unlink()),
    "a shard cut short": ("sharded", shard(3), lambda d: cut(d / shard(3))),
    "a shard empty": ("sharded", shard(7), lambda d: cut(d / shard(7), 0)),
    "bytes after a shard's last tensor": ("sharded", shard(2), lambda d: open(d / shard(2), "ab").write(b"garbage")),
    "a shard of another revision": ("sharded", shard(3), lambda d: shutil.copy(d / shard(4), d / shard(3))),
    "the index cut short": ("sharded", "model.safetensors.index.json",
                            lambda d: cut(d / "model.safetensors.index.json")),
    "one safetensors file cut short": ("single", "model.safetensors", lambda d: cut(d / "model.safetensors", 0.9)),
    "a pickle cut short": ("pickle", "pytorch_model.bin", lambda d: cut(d / "pytorch_model.bin", 0.9)),
}


def transformers_refuses(model_dir: Path) -> str:
    """Why transformers' own loader fails this directory ('' when it loads every weight from the files)."""
    from transformers import AutoModelForCausalLM

    try:
        _, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - any refusal is the judge's verdict
        return f"{type(exc).__name__}: {exc}"
    return f"weights started at random: {sorted(info['missing_keys'])}" if info["missing_keys"] else ""


@pytest.mark.parametrize("kind", ["sharded", "single", "pickle"])
def test_intact_directories_pass_and_load(saved, kind):
    assert weight_files_problems(str(saved[kind])) == []
    assert transformers_refuses(saved[kind]) == ""


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_each_damage_is_named_by_file_and_transformers_agrees_it_is_damaged(saved, tmp_path, damage):
    kind, damaged_file, do = DAMAGES[damage]
    model_dir = tmp_path / kind
    shutil.copytree(saved[kind], model_dir)
    do(model_dir)
    problems = weight_files_problems(str(model_dir))
    assert len(problems) == 1 and problems[0].startswith(damaged_file), problems
    assert transformers_refuses(model_dir), f"transformers loaded {damage} without complaint"


def test_launch_refuses_every_damaged_file_at_once_and_writes_nothing(saved, tmp_path, tiny_model):
    model_dir = tmp_path / "model"
    shutil.copytree(saved["sharded"], model_dir)
    (model_dir / shard(5)).unlink()
    cut(model_dir / shard(8))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, model_dir / name)
    proc = shardtune("launch", str(tiny_config(tmp_path, model_dir)), check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "(2 problems)" in proc.stderr
    assert f"model.name_or_path: {model_dir}: {shard(5)} is missing" in proc.stderr
    size = (model_dir / shard(8)).stat().st_size
    assert f"{shard(8)} is {size:,} bytes, its header describes" in proc.stderr and "cut short" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_model_damaged_after_planning_fails_preflight_on_every_node_before_it_loads(tmp_path, tiny_model):
    """The job a SLURM queue starts hours after `launch` planned it: every node checks its model files again."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    shardtune("launch", str(tiny_config(tmp_path, model_dir)), "--dry_run")
    cut(model_dir / "model.safetensors", 0.7)
    run = RunDir(tmp_path / "run")
    proc = subprocess.run(["bash", str(run.script("torchrun"))], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    said = proc.stdout + proc.stderr
    assert "preflight failed" in said and f"model.name_or_path: {model_dir}: model.safetensors is" in said, said[-3000:]
    assert f"cut short: an interrupted download or copy?) (seen on {os.uname().nodename})" in said
    assert not run.metrics_file.exists() and not run.checkpoints.exists()


def test_a_checkpoint_without_the_models_head_is_refused_at_load_not_trained_at_random(tmp_path, tiny_model):
    """Files that are whole and agree with each other, but lack a weight the architecture has (here the untied
    head): transformers loads it with that weight random and a log line. Under ZeRO-3, where the model is built
    partitioned, the run stops at load naming the weight."""
    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    weights = load_file(model_dir / "model.safetensors")
    assert "lm_head.weight" in weights and not json.loads((model_dir / "config.json").read_text()).get(
        "tie_word_embeddings")
    save_file({k: v for k, v in weights.items() if k != "lm_head.weight"}, model_dir / "model.safetensors",
              metadata={"format": "pt"})
    assert weight_files_problems(str(model_dir)) == []
    assert transformers_refuses(model_dir) == "weights started at random: ['lm_head.weight']"
    proc = shardtune("launch", str(tiny_config(tmp_path, model_dir, zero={"stage": 3})), check=False)
    assert proc.returncode != 0
    expected = (f"model.name_or_path: {model_dir}: 1 weight(s) of LlamaForCausalLM are in none of its files "
                f"(e.g. lm_head.weight)")
    assert expected in proc.stderr, proc.stderr[-3000:]
    assert not RunDir(tmp_path / "run").metrics_file.exists()


def test_only_parameters_count_as_missing_not_buffers_a_module_computes():
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.contract.errors import UserError
    from trainer.model import refuse_missing_weights

    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, vocab_size=512, tie_word_embeddings=False))
    assert "model.rotary_emb.inv_freq" in dict(model.named_buffers())
    refuse_missing_weights("m", model, ["model.rotary_emb.inv_freq"])
    with pytest.raises(UserError, match=r"1 weight\(s\) of LlamaForCausalLM are in none of its files \(e.g. "
                                        r"lm_head.weight\)"):
        refuse_missing_weights("m", model, ["lm_head.weight", "model.rotary_emb.inv_freq"])


def test_eval_and_generate_refuse_a_damaged_model_instead_of_scoring_noise(saved, tmp_path, tiny_model):
    """A model directory evaluated or asked for an answer: a shard cut short, or a file that lacks the head, used
    to load with those weights at random (transformers' verdict above) and score or answer as noise."""
    from safetensors.torch import load_file, save_file

    cut_dir = tmp_path / "cut"
    shutil.copytree(saved["sharded"], cut_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, cut_dir / name)
    shutil.copy(cut_dir / shard(4), cut_dir / shard(3))  # a shard of another revision: loads without an error
    proc = shardtune("generate", str(cut_dir), "hello", check=False)
    assert proc.returncode == 1 and f"shardtune: {cut_dir}: {shard(3)} lacks" in proc.stderr, proc.stderr[-2000:]

    headless = tmp_path / "headless"
    shutil.copytree(tiny_model, headless)
    weights = load_file(headless / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "lm_head.weight"}, headless / "model.safetensors",
              metadata={"format": "pt"})
    data = Path(__file__).parent.parent / "examples" / "data" / "tiny_chat.jsonl"
    proc = shardtune("eval", str(headless), str(data), check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"shardtune: {headless}: 1 weight(s) of LlamaForCausalLM are in none of its files (e.g. lm_head.weight)" \
        in proc.stderr


def test_plan_warns_of_model_code_from_another_hub_repository(tmp_path, tiny_model):
    """An auto_map naming another repository's code (`org/code--module.Class`, as community fine-tunes of
    remote-code models do) is fetched by transformers at every load, unpinned: `plan` says so, with the files."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    for name, auto_map in (("config.json", {"AutoModelForCausalLM": "org/code--modeling_tiny.TinyForCausalLM"}),
                           ("tokenizer_config.json", {"AutoTokenizer": ["org/code--tokenization_tiny.Tiny", None]})):
        data = json.loads((model_dir / name).read_text())
        (model_dir / name).write_text(json.dumps({**data, "auto_map": auto_map}))
    config = str(tiny_config(tmp_path, model_dir))

    def warnings(*overrides: str) -> str:
        return "\n".join(json.loads(shardtune("plan", config, "--json", *overrides).stdout)["warnings"])

    said = warnings("model.trust_remote_code=true")
    assert ("the model's auto_map runs code from another hub repository, org/code (modeling_tiny.py, "
            "tokenization_tiny.py)") in said and "drop the 'org/code--' prefix" in said
    assert "org/code" not in warnings()
