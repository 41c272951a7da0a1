"""Shared fixtures: a tiny real Llama with a real tokenizer, isolated caches, and a way to run the CLI."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from launcher.contract.run_dir import RunDir

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"

# The modules that took longest in a full `make test` (--durations, 2026-12-06), longest first. `make test` hands
# whole modules to its two workers in collection order (--dist loadscope --no-loadscope-reorder), so these start
# first and the short unit-test modules fill the end: a long module started last leaves the other worker idle
# until it ends, and test_slurm's waits on SLURM's two-minute requeue hold overlap the other worker's CPU work.
# A stale list costs time, never a test.
SLOWEST_FIRST = ("test_slurm", "test_checkpoint_resume", "test_large_model_io", "test_checkpoint_trust",
                 "test_compile", "test_hub_snapshot", "test_moe_e2e", "test_packed_attention",
                 "test_sequence_parallel", "test_e2e_train", "test_tracking", "test_bench_smoke", "test_hangs")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: tests keep their order in a module


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cpu-report", metavar="PATH",
                     help="write each test's CPU seconds to PATH (JSON lines) and print each module's at the end")


def _cpu_seconds() -> float:
    """This process's CPU and that of every process it started and waited for: a launch's torchrun agent and its
    ranks included (not SLURM's, which run under slurmd)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    path = session.config.getoption("cpu_report")
    if path and not hasattr(session.config, "workerinput"):  # the controller, before any worker's first test
        Path(path).write_text("")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    """The suite's time is its CPU time (the Makefile's TEST_WORKERS comment): this is how a test's is measured."""
    path = item.config.getoption("cpu_report")
    started, cpu = time.time(), _cpu_seconds()
    yield
    if path:
        row = {"test": item.nodeid, "cpu_s": round(_cpu_seconds() - cpu, 2), "wall_s": round(time.time() - started, 2)}
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    path = config.getoption("cpu_report")
    if not path or hasattr(config, "workerinput") or not Path(path).exists():
        return
    modules: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        totals = modules[row["test"].split("::")[0]]
        totals[0] += row["cpu_s"]
        totals[1] += row["wall_s"]
    terminalreporter.write_sep("=", f"CPU by module ({path})")
    for module, (cpu, wall) in sorted(modules.items(), key=lambda m: -m[1][0])[:20]:
        terminalreporter.write_line(f"{cpu:8.1f} s CPU {wall:8.1f} s wall  {module}")
    terminalreporter.write_line(f"{sum(c for c, _ in modules.values()):8.1f} s CPU in all")


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


STATED_PEAK_TFLOPS = 0.1  # about what the probe reads for a rank of this VM (0.08-0.11 over the days)


def tiny_config(tmp_path: Path, model: Path, **sections) -> Path:
    """A run config for the tiny model on the shipped chat data, with sections merged in; returns its path.

    It states the device's peak (`launch.peak_tflops`), so a launch skips the start-up matmul probe: 0.4-0.8 s of
    a core per rank, in a suite whose time is its ranks' CPU. The probe's own tests set it back to None."""
    cfg = {
        "model": {"name_or_path": str(model)},
        "data": {"path": str(EXAMPLES / "data" / "tiny_chat.jsonl"), "format": "messages", "seq_len": 128},
        "train": {"max_steps": 12, "micro_batch_size": 2, "grad_accum_steps": 2, "lr": 3e-3, "warmup_steps": 2,
                  "seed": 0},
        "zero": {"stage": 2},
        "launch": {"nodes": 1, "procs_per_node": 2, "peak_tflops": STATED_PEAK_TFLOPS},
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


class RenameDurability:
    """What was fsynced before each rename into place, and after it. A power cut cannot be staged here, so this
    records the real os.fsync / os.replace / os.rename calls (they still run) instead of crashing the machine."""

    def __init__(self, monkeypatch):
        self.synced: list[str] = []
        self.renames: list[tuple[str, str, int]] = []
        real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

        def fsync(fd):
            self.synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
            return real_fsync(fd)

        def renamer(real):
            def rename(src, dst, *args, **kwargs):
                self.renames.append((os.path.realpath(src), os.path.realpath(dst), len(self.synced)))
                return real(src, dst, *args, **kwargs)
            return rename

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", renamer(real_replace))
        monkeypatch.setattr(os, "rename", renamer(real_rename))

    def assert_durable(self, final: Path) -> None:
        """final (a directory renamed into place) had every file and directory under it synced before the rename,
        and its parent directory (which holds the new name) after."""
        final = Path(os.path.realpath(final))
        src, _, n = next(r for r in reversed(self.renames) if r[1] == str(final))
        before, after = set(self.synced[:n]), self.synced[n:]
        wanted = {str(Path(src) / p.relative_to(final)) for p in final.rglob("*")} | {src}
        assert wanted <= before, sorted(wanted - before)[:5]
        assert str(final.parent) in after
