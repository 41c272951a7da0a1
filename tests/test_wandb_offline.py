"""Round-trip tests for trainer/wandb_offline.py against real wandb offline runs (no network).

They write runs with the installed wandb, so they also pin down wandb's offline behaviour that the
trainer relies on: one new directory per init of the same id, and how ``_step`` behaves on resume.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

wandb = pytest.importorskip("wandb")

from wandb_reader import (  # noqa: E402
    CorruptRunError,
    find_runs,
    iter_records,
    read_history_for_id,
    read_run,
    runs_for_id,
)


@pytest.fixture
def wandb_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Offline, silent wandb writing under tmp_path/wandb; yields that wandb/ dir.

    wandb reads WANDB_DIR once per process (its setup singleton), so the singleton is torn down
    after each test; otherwise later tests would write into the first test's directory.
    """
    monkeypatch.chdir(tmp_path)
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
                       "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(key, value)
    wandb.teardown()
    yield tmp_path / "wandb"
    wandb.teardown()


def _finish(run) -> None:
    """finish() can return before wandb-core has written the .wandb file (measured: about 1 in 10
    here, file still only the 7-byte header); teardown() waits for it (0 of 40 incomplete)."""
    run.finish()
    wandb.teardown()


def _rows(n: int, base: int = 0) -> list[dict]:
    """Known values: awkward floats, ints, and a nested dict (read back as ``mem.rss_gb``)."""
    return [{"loss": 1 / (i + 3), "tokens": 1024 * i, "lr": 3e-4, "mem": {"rss_gb": 1.5 + i / 7}}
            for i in range(base, base + n)]


def _flat(row: dict) -> dict:
    return {"loss": row["loss"], "tokens": row["tokens"], "lr": row["lr"],
            "mem.rss_gb": row["mem"]["rss_gb"]}


def test_roundtrip_history_config_summary(wandb_tmp: Path) -> None:
    config = {"lr": 3e-4, "batch": 8, "model": {"hidden": 256, "layers": [1, 2]}, "name": "tiny"}
    rows = _rows(150)  # enough records to fill several 32 KiB blocks
    big = "x" * 70_000  # one record larger than a block: first/middle/last chunks
    t0 = time.perf_counter()
    run = wandb.init(project="shardtune-test", config=config, id="rt01", name="roundtrip")
    init_s = time.perf_counter() - t0
    for row in rows:
        run.log(row)
    run.log({"blob": big})
    _finish(run)
    print(f"wandb.init took {init_s:.2f}s")

    dirs = find_runs(wandb_tmp)
    assert len(dirs) == 1 and dirs[0].name.endswith("-rt01")
    assert (dirs[0] / "run-rt01.wandb").stat().st_size > 2 * 32 * 1024
    got = read_run(dirs[0])
    assert read_run(dirs[0] / "run-rt01.wandb") == got  # dir or file both accepted
    assert (got.run_id, got.project, got.name) == ("rt01", "shardtune-test", "roundtrip")
    assert got.config == config
    assert got.exit_code == 0 and not got.resume_requested and not got.resumed
    assert len(got.history) == len(rows) + 1
    for step, (logged, read) in enumerate(zip(rows, got.history)):
        assert read["_step"] == step
        assert {k: read[k] for k in _flat(logged)} == _flat(logged)  # exact, not approx
        assert isinstance(read["tokens"], int)
    assert got.history[-1]["blob"] == big and got.history[-1]["_step"] == len(rows)
    assert got.summary["loss"] == rows[-1]["loss"]
    assert got.summary["mem.rss_gb"] == rows[-1]["mem"]["rss_gb"]


def test_resume_same_id_offline_writes_new_dir_per_init(wandb_tmp: Path) -> None:
    """Offline, init(id=X, resume="allow") does not append: it starts a new offline-run-*-X dir."""
    segments = [(_rows(3), False, False), (_rows(2, base=3), True, True), (_rows(2), True, False)]
    for i, (rows, resume, explicit_step) in enumerate(segments):
        if i == 2:
            time.sleep(1.1)  # next second: ordering by the dir timestamp, not only by -N suffix
        run = wandb.init(project="p", id="res01", resume="allow" if resume else None,
                         config={"segment": i})
        for j, row in enumerate(rows):
            run.log(row, step=3 + j if explicit_step else None)
        _finish(run)

    dirs = find_runs(wandb_tmp)
    assert len(dirs) == 3 and len({d.name for d in dirs}) == 3
    assert all((d / "run-res01.wandb").is_file() for d in dirs)
    parts = runs_for_id(wandb_tmp, "res01")
    assert [p.config["segment"] for p in parts] == [0, 1, 2]  # creation order
    assert [p.resume_requested for p in parts] == [False, True, True]
    assert not any(p.resumed for p in parts)  # nothing to confirm a resume against offline
    assert all(p.run_id == "res01" and p.exit_code == 0 for p in parts)
    history = read_history_for_id(wandb_tmp, "res01")
    logged = [row for rows, _, _ in segments for row in rows]
    assert [{k: h[k] for k in _flat(r)} for h, r in zip(history, logged)] == list(map(_flat, logged))
    # _step restarts at 0 in a resumed offline segment unless log(step=...) carries it on.
    assert [h["_step"] for h in history] == [0, 1, 2, 3, 4, 0, 1]


def test_killed_before_first_flush_reads_as_empty(wandb_tmp: Path) -> None:
    """A run killed before wandb-core's first flush leaves only the 7-byte header on disk."""
    d = wandb_tmp / "offline-run-20260101_000000-dead1"
    d.mkdir(parents=True)
    (d / "run-dead1.wandb").write_bytes(b":W&B\xe1\xbe\x00")
    got = read_run(d)
    assert got.run_id == "dead1" and got.history == [] and got.exit_code is None


def test_corruption_is_reported(wandb_tmp: Path, tmp_path: Path) -> None:
    run = wandb.init(project="p", id="bad01")
    for row in _rows(5):
        run.log(row)
    _finish(run)
    src = find_runs(wandb_tmp)[0] / "run-bad01.wandb"
    data = src.read_bytes()
    assert sum(1 for _ in iter_records(src)) > 5

    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    cases = {"CRC": bytes(flipped), "truncated|overruns|ends inside": data[:-3],
             "header": b"XXXX" + data[4:]}
    for i, (message, content) in enumerate(cases.items()):
        bad = tmp_path / f"run-bad{i}.wandb"
        bad.write_bytes(content)
        with pytest.raises(CorruptRunError, match=message):
            read_run(bad)
