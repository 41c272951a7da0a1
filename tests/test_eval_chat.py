"""The demo pipeline on a tiny model (score, fine-tune, score again) and trying a model in a terminal."""
from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from conftest import EXAMPLES, shardtune, tiny_config

EVAL = str(EXAMPLES / "data" / "tiny_chat_eval.jsonl")


def test_demo_pipeline_writes_before_and_after(tmp_path, tiny_model):
    before = tmp_path / "run" / "eval_before.json"
    shardtune("eval", str(tiny_model), "--data", EVAL, "--out", str(before), "--max_new_tokens", "8")
    # One rank: scoring is the subject here; `make demo` itself fine-tunes on two.
    shardtune("launch", str(tiny_config(tmp_path, tiny_model, train={"max_steps": 6}, launch={"procs_per_node": 1})))
    out = tmp_path / "run" / "eval.json"
    proc = shardtune("eval", str(tmp_path / "run"), "--data", EVAL, "--compare_to", str(before), "--out", str(out),
                     "--max_new_tokens", "8")
    result = json.loads(out.read_text())
    for side in ("before", "after"):
        assert 0.0 <= result[side]["exact_match"] <= 1.0 and result[side]["rows"] == 40
        assert result[side]["eval_loss"] > 0 and len(result[side]["examples"]) == 3
    assert result["after"]["model"].endswith("final")
    assert result["after"]["eval_loss"] < result["before"]["eval_loss"], "fine-tuning did not lower the eval loss"
    assert "before" in proc.stdout and "after" in proc.stdout and "reference:" in proc.stdout


def test_generate_answers_one_prompt(tiny_model):
    proc = shardtune("generate", str(tiny_model), "reverse: cat dog", "--max_new_tokens", "5")
    assert proc.stdout.strip() != ""


def _read_until(fd: int, marker: bytes, timeout: float = 120) -> bytes:
    seen = b""
    deadline = time.time() + timeout
    while marker not in seen:
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {marker!r}; got {seen[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    return seen


def test_chat_under_a_terminal(tiny_model):
    """As a new user would: start it in a terminal, talk for a few turns, reset, exit."""
    main, child = pty.openpty()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "shardtune"), "chat", str(tiny_model),
                             "--max_new_tokens", "6"], stdin=child, stdout=child, stderr=child, close_fds=True)
    os.close(child)
    try:
        assert b"/exit" in _read_until(main, b"you> ")
        for turn in ("hello", "reverse: cat dog", "/reset", "count: red blue"):
            os.write(main, turn.encode() + b"\n")
            answer = _read_until(main, b"you> ")
            assert (b"new conversation" in answer) if turn == "/reset" else (b"model> " in answer)
        os.write(main, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(main)
