"""`shardtune prepare`: the summary it prints, its exit status, and a launcher that stays torch-free."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from examples.tiny_model import make_tiny_llama
from launcher.cli import main
from trainer.data.packing import PackedSet

from conftest import REPO, shardtune, tiny_config

REQUIRED = {"rows_read", "rows_kept", "rows_skipped", "sequences", "tokens", "trained_tokens", "pad_tokens",
            "packing_efficiency", "cache_dir", "cache_hit", "eval"}


def run(*argv: str) -> None:
    """The console script's own entry point, in-process."""
    code = main(["prepare", *argv])
    if code:
        raise SystemExit(code)


def test_json_summary_and_overrides_after_the_flag(tmp_path, tiny_model, capsys):
    # its own cache: the session's cache may already hold this data from another test on this worker
    cfg = tiny_config(tmp_path, tiny_model, data={"cache_dir": str(tmp_path / "cache")})
    # a bare switch must not take the next word (an override) as its value
    run(str(cfg), "--json", "data.seq_len=256", "data.eval_fraction=0.1")
    out = capsys.readouterr().out
    s = json.loads(out)
    assert REQUIRED <= s.keys() and s["seq_len"] == 256 and not s["cache_hit"]
    assert s["tokens"] + s["pad_tokens"] == s["sequences"] * 256
    assert s["eval"]["from"] == "eval_fraction" and s["eval"]["samples"] == 40 and s["rows_read"] == 400
    run(str(cfg), "data.seq_len=256", "data.eval_fraction=0.1", "--json")
    again = json.loads(capsys.readouterr().out)
    assert again["cache_hit"] and again["cache_dir"] == s["cache_dir"]


def test_human_summary(tmp_path, tiny_model, capsys):
    run(str(tiny_config(tmp_path, tiny_model)))
    out = capsys.readouterr().out
    assert "400 read, 400 kept, 0 skipped" in out and "packing efficiency" in out and "cache:" in out


def test_bad_rows_exit_non_zero_with_every_position_on_stderr(tmp_path, tiny_model, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": 3}\n\n{"txt": "x"}\n')
    cfg = tiny_config(tmp_path, tiny_model, data={"path": str(path), "format": "text", "seq_len": 64})
    with pytest.raises(SystemExit) as exit_:
        run(str(cfg), "--json")
    captured = capsys.readouterr()
    assert exit_.value.code == 1 and captured.out == ""
    assert f"{path}:2: wrong_type" in captured.err and f"{path}:4: missing_field" in captured.err


def test_importing_the_command_loads_no_trainer_or_torch():
    code = ("import sys, launcher.cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'trainer', 'transformers', 'datasets'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "[]"


def test_summary_metrics_carry_per_reason_skip_counts(tmp_path, tiny_model):
    from launcher.contract.config import load_config
    from trainer.data.prepare import prepare
    from trainer.data.show import summary_metrics

    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "fine"}\n{"text": 3}\n{oops\n{"text": "also fine"}\n')
    cfg = load_config(tiny_config(tmp_path, tiny_model, data={"path": str(path), "format": "text", "seq_len": 64,
                                                              "on_bad_row": "skip"}))
    m = summary_metrics(prepare(cfg, log=lambda _: None).summary)
    assert m["data/rows_read"] == 4 and m["data/rows_kept"] == 2 and m["data/cache_hit"] == 0
    assert m["data/skipped/wrong_type"] == 1 and m["data/skipped/invalid_json"] == 1
    assert all(isinstance(v, (int, float)) for v in m.values())


def test_a_tokenizer_that_is_not_the_models_fails_prepare_and_launch_before_the_model_loads(tmp_path, tiny_model,
                                                                                            capsys):
    """The tiny model's 512-token tokenizer on a 300-token model: its ids run past the embedding. On a GPU the first
    forward would stop on a device-side assert naming nothing; on this CPU, an IndexError after the model loaded."""
    small = make_tiny_llama(tmp_path / "small", vocab_size=300)
    cfg = tiny_config(tmp_path, small, data={"cache_dir": str(tmp_path / "cache")})
    raw = yaml.safe_load(cfg.read_text())
    raw["model"]["tokenizer"] = str(tiny_model)
    cfg.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as exit_:
        run(str(cfg))
    err = capsys.readouterr().err
    cache = next((tmp_path / "cache").iterdir())
    largest = int(PackedSet.load(cache / "train").tokens.max())  # what the model would be fed
    assert largest >= 300 and exit_.value.code == 1
    assert f"the data holds token id {largest}, but {small} embeds ids 0..299 (vocab_size 300): the tokenizer " \
        f"{tiny_model} (512 tokens) is not this model's" in err and "Set model.tokenizer" in err

    summary = json.loads((cache / "summary.json").read_text())
    del summary["largest_token_id"]  # a cache built before the id was recorded
    (cache / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(SystemExit):
        run(str(cfg))
    assert f"the data holds token id {largest}" in capsys.readouterr().err

    proc = shardtune("launch", str(cfg), check=False)
    assert proc.returncode != 0 and f"the data holds token id {largest}" in proc.stderr
    assert "preflight ok" not in proc.stderr  # stopped before the process group, let alone the model


def test_a_pad_token_added_past_the_embedding_fails_prepare(tmp_path, tiny_model, capsys):
    """A pad token added to a tokenizer without one (and no resize) gets id 512 of a 512-row embedding."""
    from transformers import AutoTokenizer

    model = shutil.copytree(tiny_model, tmp_path / "padded")
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_special_tokens({"pad_token": "<|my_pad|>"})
    tokenizer.save_pretrained(model)
    assert tokenizer.pad_token_id == 512
    with pytest.raises(SystemExit):
        run(str(tiny_config(tmp_path, model, data={"cache_dir": str(tmp_path / "cache")})))
    assert "rows are padded with id 512 (the tokenizer's pad token), but" in capsys.readouterr().err
