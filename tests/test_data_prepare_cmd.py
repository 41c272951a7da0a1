"""`shardtune prepare`: the summary it prints, its exit status, and a launcher that stays torch-free."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launcher.cli import main

from conftest import REPO, tiny_config

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
