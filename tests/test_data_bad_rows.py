"""Bad input: named by file:line with data.on_bad_row=error, counted exactly per reason with skip."""
from __future__ import annotations

import json

import numpy as np
import pytest

from launcher import cli
from launcher.contract.config import load_config
from trainer.data.prepare import DataError, prepare

from conftest import shardtune, tiny_config

GOOD = {"instruction": "sort: b a", "output": "a b"}


def chat(*turns: tuple[str, object]) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})


def write_lines(path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


@pytest.fixture
def acceptance_file(tmp_path) -> str:
    """The issue's case: an invalid JSON line (3) and a row missing its response (5) among good rows."""
    return write_lines(tmp_path / "alpaca.jsonl", [
        json.dumps(GOOD), json.dumps({"instruction": "count: a b c", "output": "3"}),
        '{"instruction": "reverse: a b", "output": ',
        json.dumps({"instruction": "reverse: cat dog", "input": "", "output": "dog cat"}),
        json.dumps({"instruction": "sort: c a b"}),
        json.dumps({"instruction": "count: a", "output": "1"})])


def config(tmp_path, tiny_model, path: str, fmt: str = "alpaca", **data):
    return load_config(tiny_config(tmp_path, tiny_model, data={"path": path, "format": fmt, "seq_len": 128, **data}))


def test_error_names_both_file_lines(tmp_path, tiny_model, acceptance_file):
    with pytest.raises(DataError) as err:
        prepare(config(tmp_path, tiny_model, acceptance_file), log=lambda _: None)
    message = str(err.value)
    assert f"{acceptance_file}:3: invalid_json" in message
    assert f"{acceptance_file}:5: missing_field: no 'output' field" in message
    assert message.startswith("2 bad row(s)") and "data.on_bad_row=skip" in message


def test_skip_counts_exactly_per_reason(tmp_path, tiny_model, acceptance_file):
    s = prepare(config(tmp_path, tiny_model, acceptance_file, on_bad_row="skip"), log=lambda _: None).summary
    assert s["rows_skipped"] == {"invalid_json": 1, "missing_field": 1}
    assert (s["rows_read"], s["rows_kept"], s["samples"]) == (6, 4, 4)


@pytest.mark.skipif("prepare" not in cli.COMMANDS, reason="`prepare` is not registered in launcher/cli.py yet")
def test_shardtune_prepare_fails_naming_both_lines(tmp_path, tiny_model, acceptance_file):
    cfg = tiny_config(tmp_path, tiny_model, data={"path": acceptance_file, "format": "alpaca", "seq_len": 128})
    proc = shardtune("prepare", str(cfg), "--json", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"{acceptance_file}:3: invalid_json" in proc.stderr and f"{acceptance_file}:5: missing_field" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout.strip() == ""


# Every reason, each on a known line (blank line 4 is not a row and does not shift the numbering).
REASON_LINES = [
    (chat(("user", "hi"), ("assistant", "yo")), None),
    ('{"messages": [', "invalid_json"),
    ("[1, 2]", "not_an_object"),
    ("", None),
    (json.dumps({"msgs": []}), "missing_field"),
    (json.dumps({"messages": "hello"}), "wrong_type"),
    (chat(("user", 5), ("assistant", "yo")), "wrong_type"),
    (json.dumps({"messages": [{"role": ["user"], "content": "x"}]}), "wrong_type"),
    (chat(("user", "   "), ("assistant", "yo")), "empty_content"),
    (json.dumps({"messages": []}), "empty_content"),
    (chat(("user", "hi"), ("function", "{}"), ("assistant", "yo")), "unknown_role"),
    (chat(("user", "hi"), ("tool", "{}"), ("assistant", "yo")), "tool_without_call"),
    (chat(("user", "hi"), ("system", "be nice"), ("assistant", "yo")), "system_not_first"),
    (chat(("system", "be nice"), ("assistant", "yo"), ("user", "hi")), "assistant_before_user"),
    (chat(("user", "a"), ("user", "b"), ("assistant", "c")), "consecutive_user"),
    (chat(("user", "a"), ("assistant", "b"), ("assistant", "c")), "consecutive_assistant"),
    (chat(("system", "be nice"), ("user", "hi")), "no_assistant_turn"),
    (chat(("user", "hi " * 200), ("assistant", "yo")), "too_long"),
    (chat(("system", "s"), ("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "a2")), None),
]


def test_every_reason_is_named_by_line_and_counted(tmp_path, tiny_model):
    path = write_lines(tmp_path / "chat.jsonl", [line for line, _ in REASON_LINES])
    malformed = [(n, r) for n, (_, r) in enumerate(REASON_LINES, start=1) if r not in (None, "too_long")]
    with pytest.raises(DataError) as err:
        prepare(config(tmp_path, tiny_model, path, "messages"), log=lambda _: None)
    listed = [line.strip() for line in str(err.value).splitlines() if line.startswith("  ")]
    assert [(int(w.split(":")[1]), w.split(": ")[1]) for w in listed] == malformed
    assert all(w.startswith(f"{path}:") for w in listed)
    s = prepare(config(tmp_path, tiny_model, path, "messages", on_bad_row="skip"), log=lambda _: None).summary
    expected = {}
    for _, r in REASON_LINES:
        if r:
            expected[r] = expected.get(r, 0) + 1
    assert s["rows_skipped"] == expected
    assert s["rows_read"] == len(REASON_LINES) - 1 and s["rows_kept"] == 2


def test_sharegpt_unknown_speaker_and_wrong_types(tmp_path, tiny_model):
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "narrator", "value": "{}"}]},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "{}"}]},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": None}]},
            {"conversations": {"from": "human"}}]
    path = write_lines(tmp_path / "s.jsonl", [json.dumps(r) for r in rows])
    s = prepare(config(tmp_path, tiny_model, path, "sharegpt", on_bad_row="skip"), log=lambda _: None).summary
    assert s["rows_skipped"] == {"unknown_role": 1, "bad_tool_call": 1, "missing_field": 1, "wrong_type": 1}
    assert s["rows_kept"] == 1


def test_more_than_twenty_bad_rows_lists_twenty_then_a_count(tmp_path, tiny_model):
    path = write_lines(tmp_path / "a.jsonl", [json.dumps(GOOD)] + ["{oops"] * 25)
    with pytest.raises(DataError) as err:
        prepare(config(tmp_path, tiny_model, path), log=lambda _: None)
    message = str(err.value)
    assert message.startswith("25 bad row(s)") and "... and 5 more" in message
    assert f"{path}:21:" in message and f"{path}:22:" not in message


def test_too_long_rows_are_a_setting_not_an_error(tmp_path, tiny_model):
    path = write_lines(tmp_path / "a.jsonl", [json.dumps(GOOD), json.dumps({"instruction": "x " * 300, "output": "y"})])
    s = prepare(config(tmp_path, tiny_model, path), log=lambda _: None).summary  # on_bad_row=error
    assert s["rows_skipped"] == {"too_long": 1} and s["rows_kept"] == 1 and s["bad_rows"] == 0


def truncation_rows() -> list[str]:
    return [
        chat(("user", "count: a b"), ("assistant", "2")),  # fits
        chat(("user", "reverse: " + "cat dog " * 40), ("assistant", "dog cat")),  # answer lies past seq_len
        chat(("user", "count: a"), ("assistant", "1"), ("user", "sort: " + "b a " * 40), ("assistant", "a b")),
    ]


def test_truncate_cuts_counts_and_drops_rows_left_without_labels(tmp_path, tiny_model):
    path = write_lines(tmp_path / "t.jsonl", truncation_rows())
    prepared = prepare(config(tmp_path, tiny_model, path, "messages", seq_len=64, truncation="truncate"),
                       log=lambda _: None)
    s = prepared.summary
    assert s["rows_skipped"] == {"no_trained_tokens": 1} and s["rows_truncated"] == 1 and s["rows_kept"] == 2
    data = prepared.train
    lengths = np.diff(data.seq_starts)
    assert lengths.max() <= 64 and 64 in data.sample_lens  # the third row, cut to exactly seq_len
    start = 0
    for length in data.sample_lens:  # every sample that is fed to the loss has a target
        assert (data.labels[start + 1:start + length] != -100).any()
        start += length


def test_drop_counts_over_long_rows(tmp_path, tiny_model):
    path = write_lines(tmp_path / "t.jsonl", truncation_rows())
    s = prepare(config(tmp_path, tiny_model, path, "messages", seq_len=64), log=lambda _: None).summary
    assert s["rows_skipped"] == {"too_long": 2} and s["rows_truncated"] == 0 and s["rows_kept"] == 1


def test_no_usable_rows_is_a_clear_error(tmp_path, tiny_model):
    path = write_lines(tmp_path / "a.jsonl", ["{oops"])
    with pytest.raises(DataError, match="no usable training rows"):
        prepare(config(tmp_path, tiny_model, path, on_bad_row="skip"), log=lambda _: None)
