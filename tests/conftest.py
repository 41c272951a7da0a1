"""Shared fixtures: a tiny real Llama with a real tokenizer, isolated caches, and a way to run the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher.contract.run_dir import RunDir

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random 2-layer Llama (untied) with a trained byte-level BPE tokenizer and a ChatML template."""
    from examples.tiny_model import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SHARDTUNE_CACHE", str(tmp_path_factory.getbasetemp() / "data-cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def tiny_config(tmp_path: Path, model: Path, **sections) -> Path:
    """A run config for the tiny model on the shipped chat data, with sections merged in; returns its path."""
    cfg = {
        "model": {"name_or_path": str(model)},
        "data": {"path": str(EXAMPLES / "data" / "tiny_chat.jsonl"), "format": "messages", "seq_len": 128},
        "train": {"max_steps": 12, "micro_batch_size": 2, "grad_accum_steps": 2, "lr": 3e-3, "warmup_steps": 2,
                  "seed": 0},
        "zero": {"stage": 2},
        "launch": {"nodes": 1, "procs_per_node": 2},
        "wandb": {"mode": "disabled"},
        "output_dir": str(tmp_path / "run"),
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def shardtune(*args: str, timeout: float = 600, env: dict | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run the real `shardtune` console script in a subprocess."""
    proc = subprocess.run([str(Path(sys.executable).parent / "shardtune"), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"shardtune {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's metrics rows, through the product's own reader."""
    return RunDir(run_dir).read_metrics()


def losses(run_dir: Path) -> dict[int, float]:
    return RunDir(run_dir).losses()
