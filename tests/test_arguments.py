"""The `shardtune` command line: words -> a command function's arguments (launcher/arguments.py)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from launcher.arguments import call
from launcher.cli import main

SEEN: list = []


def sample(config: str, *overrides: str, json: bool = False, wait: bool = True, workers: int | None = None,
           scale: float = 1.0, name: str = "x") -> int:
    """A command with every kind of parameter the real ones use."""
    SEEN.append((config, overrides, json, wait, workers, scale, name))
    return 3


def parsed(*words: str) -> tuple:
    SEEN.clear()
    assert call({"sample": sample}, ["sample", *words]) == 3
    return SEEN[-1]


def test_positionals_overrides_and_typed_options_in_any_order():
    assert parsed("c.yaml") == ("c.yaml", (), False, True, None, 1.0, "x")
    assert parsed("c.yaml", "a.b=1", "--workers", "4", "c.d=2", "--scale=2e3", "--name=y") == \
        ("c.yaml", ("a.b=1", "c.d=2"), False, True, 4, 2000.0, "y")


def pair(target: str, data: str, json: bool = False) -> None:
    SEEN.append((target, data, json))


@pytest.mark.parametrize("words", [["m", "d.jsonl"], ["m", "--data", "d.jsonl"], ["--data=d.jsonl", "--json", "m"],
                                   ["--target", "m", "--data", "d.jsonl", "--json=false"]])
def test_a_positional_parameter_may_be_given_by_name(words):
    SEEN.clear()
    call({"pair": pair}, ["pair", *words])
    assert SEEN == [("m", "d.jsonl", "--json" in words)]


@pytest.mark.parametrize("words, json, wait", [
    (["--json", "a.b=1"], True, True),       # a bare switch never swallows the override after it
    (["--json=false", "a.b=1"], False, True),
    (["--json=True", "--nowait", "a.b=1"], True, False),
    (["a.b=1", "--wait=0", "--json"], True, False),
])
def test_switches_are_bare_or_spelled_out(words, json, wait):
    config, overrides, got_json, got_wait, *_ = parsed("c.yaml", *words)
    assert (overrides, got_json, got_wait) == (("a.b=1",), json, wait)


@pytest.mark.parametrize("words, message", [
    (["--workers=four"], "--workers: invalid int value: 'four'"),
    (["--json=maybe"], "expected true or false, got 'maybe'"),
    (["c.yaml", "--colour=red"], "unrecognized arguments: --colour=red"),
    ([], "the following arguments are required: config\n"),
])
def test_usage_errors_exit_2_and_name_the_word(words, message, capsys):
    with pytest.raises(SystemExit) as exc:
        call({"sample": sample}, ["sample", *words])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_the_console_script_lists_commands_and_passes_exit_codes_on():
    listing = subprocess.run([sys.executable, "-m", "launcher.cli"], capture_output=True, text=True)
    assert listing.returncode == 2 and "plan " in listing.stdout and "estimate " in listing.stdout
    unknown = subprocess.run([sys.executable, "-m", "launcher.cli", "plna"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "no command 'plna'" in unknown.stderr
    # estimate returns its exit code (2: no device count given); main must pass it on, not print it
    assert main(["estimate", "--params=7e9"]) == 2


def test_cli_plan_imports_neither_fire_nor_asyncio():
    probe = ("import sys, launcher.cli; print(sorted(m for m in ('fire', 'asyncio', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
