"""Preprocess once: the cache key follows exactly the inputs that change the data, and one process builds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from launcher.contract.config import load_config
from trainer.build_once import BuildFailed, build_once
from trainer.data.cache import cache_key
from trainer.data.prepare import DataError, cache_inputs, load_tokenizer, prepare

from conftest import EXAMPLES, REPO, RenameDurability, tiny_config


def prep(cfg, log: list | None = None):
    return prepare(cfg, log=(log.append if log is not None else (lambda _: None)))


def entries(root) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_second_prepare_reuses_the_cache(tmp_path, tiny_model):
    cfg = load_config(tiny_config(tmp_path, tiny_model, data={"cache_dir": str(tmp_path / "cache")}))
    built_log, hit_log = [], []
    first = prep(cfg, built_log)
    complete = (first.cache_dir / "COMPLETE").read_text()
    second = prep(load_config(tiny_config(tmp_path, tiny_model, data={"cache_dir": str(tmp_path / "cache")})), hit_log)
    assert not first.summary["cache_hit"] and second.summary["cache_hit"]
    assert second.cache_dir == first.cache_dir and (second.cache_dir / "COMPLETE").read_text() == complete
    assert any(m.startswith("preprocessing") for m in built_log) and hit_log == []  # nothing re-tokenized
    assert entries(tmp_path / "cache") == [first.cache_dir.name]  # no lock or temporary directory left
    assert (second.train.tokens == first.train.tokens).all()


def test_seq_len_or_tokenizer_change_rebuilds(tmp_path, tiny_model):
    from examples.tiny_model import make_tokenizer

    other_tok = tmp_path / "other-tokenizer"
    make_tokenizer(vocab_size=600).save_pretrained(other_tok)
    cache = {"cache_dir": str(tmp_path / "cache")}
    base = prep(load_config(tiny_config(tmp_path, tiny_model, data=cache)))
    longer = prep(load_config(tiny_config(tmp_path, tiny_model, data={**cache, "seq_len": 256})))
    retok = prep(load_config(tiny_config(tmp_path, tiny_model, data=cache), [f"model.tokenizer={other_tok}"]))
    assert not longer.summary["cache_hit"] and not retok.summary["cache_hit"]
    assert len({base.cache_dir, longer.cache_dir, retok.cache_dir}) == 3
    assert longer.summary["sequences"] < base.summary["sequences"]
    assert retok.summary["tokens"] != base.summary["tokens"]


def test_key_changes_exactly_when_the_prepared_data_would(tmp_path, tiny_model):
    # Rows valid as both `text` and `messages`, so the format alone can change.
    rows = [{"text": f"doc {i}", "body": f"other {i}", "messages": [{"role": "user", "content": f"q {i}"},
                                                                    {"role": "assistant", "content": f"a {i}"}]}
            for i in range(20)]
    data_file = tmp_path / "rows.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    other = tmp_path / "other.jsonl"
    other.write_text(data_file.read_text())
    cfg_path = tiny_config(tmp_path, tiny_model, data={"path": str(data_file), "format": "messages", "seq_len": 128})

    def key(*overrides: str) -> str:
        cfg = load_config(cfg_path, list(overrides))
        return cache_key(cache_inputs(cfg, load_tokenizer(cfg)))

    def mix(weight: float, other_weight: float) -> list[str]:
        return [f"data.weight={weight}", f"data.mix=[{{path: {other}, weight: {other_weight}}}]"]

    reference = key()
    same = ["train.lr=1e-5", "train.max_steps=99", "train.seed=123", "data.num_proc=2", "data.on_bad_row=skip",
            "data.shuffle=false", "data.weight=5.0", "data.fields.text=body", "launch.procs_per_node=1",
            "zero.stage=3", f"output_dir={tmp_path / 'elsewhere'}"]
    for override in same:
        assert key(override) == reference, override
    assert key(*mix(1.0, 3.0)) == key(*mix(2.0, 6.0)), "only the weights' ratio matters"
    changed = {
        name: key(name) for name in [
            "data.seq_len=256", "data.packing=false", "data.truncation=truncate", "data.train_on=all",
            "data.multi_turn=per_turn", "data.multi_turn=whole", "data.train_on_reasoning=false",
            "data.fields.tools=tl",
            "data.format=text", "data.fields.messages=msgs", "data.chat_template={{ messages[0]['content'] }}",
            "data.eval_fraction=0.1", f"data.eval_path={other}", f"data.mix=[{{path: {other}}}]",
        ]}
    changed["mixture weights"] = key(*mix(1.0, 3.0))
    changed["seed with an eval split"] = key("data.eval_fraction=0.1", "train.seed=123")
    assert reference not in changed.values() and len(set(changed.values())) == len(changed), changed
    with open(data_file, "a") as fh:  # the data itself changes
        fh.write(json.dumps(rows[0]) + "\n")
    assert key() != reference


def test_switching_on_bad_row_reuses_the_entry_but_still_enforces_error(tmp_path, tiny_model):
    path = tmp_path / "a.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    data = {"path": str(path), "format": "alpaca", "seq_len": 64, "cache_dir": str(tmp_path / "cache")}
    with pytest.raises(DataError, match=r"a\.jsonl:2: invalid_json"):
        prep(load_config(tiny_config(tmp_path, tiny_model, data=data)))
    skipped = prep(load_config(tiny_config(tmp_path, tiny_model, data={**data, "on_bad_row": "skip"})))
    assert skipped.summary["cache_hit"] and skipped.summary["rows_skipped"] == {"invalid_json": 1}
    with pytest.raises(DataError, match=r"a\.jsonl:2: invalid_json"):  # a cache hit does not hide bad rows
        prep(load_config(tiny_config(tmp_path, tiny_model, data=data)))


RACER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from launcher.contract.config import load_config
    from trainer.data.prepare import load_tokenizer, prepare

    cfg = load_config(sys.argv[1])
    tok = load_tokenizer(cfg)
    barrier, me = Path(sys.argv[2]), sys.argv[3]
    (barrier / me).touch()
    deadline = time.time() + 120
    while len(list(barrier.iterdir())) < 2 and time.time() < deadline:  # start prepare together
        time.sleep(0.005)
    log = []
    p = prepare(cfg, tok, log=log.append)
    print(json.dumps({"hit": p.summary["cache_hit"], "dir": str(p.cache_dir), "log": log,
                      "sequences": len(p.train)}))
""")


def test_two_processes_racing_on_an_empty_cache_build_once(tmp_path, tiny_model):
    words = "the a of cat dog bird red blue green tree river city".split()
    rows = [{"instruction": " ".join(words[(i + j) % len(words)] for j in range(i % 9 + 2)), "output": f"{i}"}
            for i in range(4000)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(tmp_path, tiny_model, data={"path": str(path), "format": "alpaca", "seq_len": 256,
                                                  "cache_dir": str(tmp_path / "cache"), "num_proc": 1})
    (tmp_path / "barrier").mkdir()
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, str(script), str(cfg), str(tmp_path / "barrier"), name],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
             for name in ("a", "b")]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    builders = [o for o in outs if not o["hit"]]
    waiters = [o for o in outs if o["hit"]]
    assert len(builders) == 1 and len(waiters) == 1, outs
    assert any(m.startswith("preprocessing") for m in builders[0]["log"])
    assert [m for m in waiters[0]["log"] if m.startswith("waiting for")], waiters[0]["log"]  # it really waited
    assert not any(m.startswith("preprocessing") for m in waiters[0]["log"])
    assert builders[0]["dir"] == waiters[0]["dir"] and builders[0]["sequences"] == waiters[0]["sequences"]
    assert entries(tmp_path / "cache") == [os.path.basename(builders[0]["dir"])]


def _write_marker(tmp) -> None:
    tmp.mkdir()
    (tmp / "data").write_text("built")


def test_a_stale_lock_is_taken_over_and_a_live_one_is_waited_for(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    lock = root / "k1.lock"
    lock.write_text("deadhost 1\n")
    old = time.time() - 3600
    os.utime(lock, (old, old))  # its builder died an hour ago
    path, built = build_once(root, "k1", _write_marker)
    assert built and (path / "data").read_text() == "built" and not lock.exists()

    (root / "k2.lock").write_text("otherhost 2\n")  # a live builder elsewhere
    waits = []
    with pytest.raises(TimeoutError):
        build_once(root, "k2", _write_marker, on_wait=waits.append, timeout_s=1.0)
    assert waits and "otherhost 2" in waits[0] and not (root / "k2").exists()


def test_a_build_is_on_disk_before_its_name_appears_fsyncs_recorded_as_no_power_cut_can_be_staged(
        tmp_path, monkeypatch):
    """COMPLETE vouches for the directory (a universal checkpoint, a tokenized cache): after a crash it must not
    stand over files the filesystem never wrote."""
    durability = RenameDurability(monkeypatch)

    def build(tmp) -> None:
        (tmp / "sub").mkdir(parents=True)
        (tmp / "sub" / "part").write_bytes(b"x" * 4096)
        (tmp / "data").write_text("built")

    path, built = build_once(tmp_path / "cache", "k", build)
    assert built and (path / "COMPLETE").is_file()
    durability.assert_durable(path)


def test_a_failed_build_fails_the_waiters_too(tmp_path):
    root = tmp_path / "cache"
    started, release = threading.Event(), threading.Event()
    errors = {}

    def failing_build(tmp) -> None:
        started.set()
        release.wait(10)
        raise RuntimeError("template exploded")

    def builder() -> None:
        try:
            build_once(root, "k", failing_build)
        except RuntimeError as exc:
            errors["builder"] = exc

    thread = threading.Thread(target=builder)
    thread.start()
    assert started.wait(10)
    waiter_waits = []

    def waiter() -> None:
        try:
            build_once(root, "k", _write_marker, on_wait=waiter_waits.append)
        except BuildFailed as exc:
            errors["waiter"] = exc

    other = threading.Thread(target=waiter)
    other.start()
    deadline = time.time() + 10
    while not waiter_waits and time.time() < deadline:
        time.sleep(0.01)
    release.set()
    thread.join(10)
    other.join(10)
    assert waiter_waits
    assert "template exploded" in str(errors["builder"]) and "template exploded" in str(errors["waiter"])
    assert not (root / "k").exists() and not (root / "k.lock").exists()


def test_a_build_run_again_right_after_a_failure_builds_instead_of_repeating_it(tmp_path):
    """A failure record is for the processes that waited on the failed build. A call that finds nobody building
    builds again, however soon after: the user fetched what was missing and ran the command again within seconds,
    and got the old failure back (it was honoured for 5 s after it was written)."""
    root = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="the rest of the split is not here"):
        build_once(root, "k", lambda tmp: (_ for _ in ()).throw(RuntimeError("the rest of the split is not here")))
    assert (root / "k.failed").is_file()
    path, built_here = build_once(root, "k", _write_marker)
    assert built_here and (path / "COMPLETE").is_file() and not (root / "k.failed").exists()


@pytest.fixture
def small_filesystem(tmp_path):
    """Mount a real filesystem of a given size (tmpfs; needs root, which CI has): `mount(kib)` -> its path."""
    mounted = []

    def mount(kib: int):
        point = tmp_path / f"fs-{len(mounted)}"
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(point)], check=True)
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small filesystem needs root")
def test_a_cache_filesystem_without_room_is_named_and_left_empty(tmp_path, tiny_model, small_filesystem):
    """The cache's filesystem fills while samples are written (ENOSPC), or is seen before packing to have no
    room for the packed set: either way the error names the field and the room, and the unfinished entry is
    gone (a full shared filesystem stops other users' jobs too)."""
    reference = prep(load_config(tiny_config(tmp_path, tiny_model)))
    tokens = reference.summary["tokens"]  # one source, no holdout: the samples are the packed tokens
    room_for_samples = 8 * tokens * 3 // 2 // 1024  # int32 ids and labels: room for the samples, not for both
    for kib, says in ((8 * tokens // 1024 // 2, "preparing the data ran out of room (No space left on device"),
                      (room_for_samples, f"the packed set of {tokens:,} tokens needs")):
        cache = small_filesystem(kib)
        with pytest.raises(DataError) as err:
            prep(load_config(tiny_config(tmp_path, tiny_model, data={"cache_dir": str(cache)})))
        assert str(err.value).startswith(f"data.cache_dir: {cache}") and says in str(err.value), str(err.value)
        assert "set data.cache_dir to a filesystem with room" in str(err.value)
        assert [p.name for p in cache.iterdir() if not p.name.endswith(".failed")] == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small filesystem needs root")
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_a_source_too_big_for_the_cache_is_refused_after_its_first_rows_not_after_tokenizing(
        tmp_path, tiny_model, small_filesystem, monkeypatch, suffix):
    """A 10,000-row source whose tokenized samples fit the cache's filesystem but not with the packed set beside
    them: it used to be refused after every row was tokenized (hours, at scale). Now the first rows (1,000 here,
    20,000 by default) project the whole, per byte of text for JSON Lines and per row for Parquet (from its
    footer), and the build stops there. The projection is checked against the tokens the whole source really
    gives, prepared on a filesystem with room."""
    import re

    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainer.data import prepare as prepare_module

    monkeypatch.setattr(prepare_module, "FORECAST_AFTER_ROWS", 1000, raising=False)  # raising: the old code had none
    rows = [json.loads(line) for line in (EXAMPLES / "data" / "tiny_chat.jsonl").read_text().splitlines()] * 25
    source = tmp_path / f"big{suffix}"
    if suffix == ".jsonl":
        source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), source)
    data = {"path": str(source), "format": "messages", "seq_len": 128}
    whole = prep(load_config(tiny_config(tmp_path, tiny_model, data=data))).summary
    assert whole["rows_read"] == 10_000
    cache = small_filesystem(8 * whole["tokens"] * 5 // 4 // 1024)  # the samples fit, not the packed set too
    with pytest.raises(DataError) as err:
        prep(load_config(tiny_config(tmp_path, tiny_model, data={**data, "cache_dir": str(cache)})))
    message = str(err.value)
    assert message.startswith(f"data.cache_dir: {cache} has ") and "set data.cache_dir to a filesystem" in message
    assert "its first 1,000 rows gave" in message and "stopped after 1,000 rows" in message, message
    projected = int(re.search(r"project to ~([\d,]+) tokens", message).group(1).replace(",", ""))
    assert projected == pytest.approx(whole["tokens"], rel=0.05), (projected, whole["tokens"])
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".failed")] == []


def test_a_quota_the_free_space_does_not_show_stops_a_build_after_its_first_rows(tmp_path, tiny_model, monkeypatch):
    """A quota is not in the free space a filesystem reports, so the early check saw room and the build failed
    hours later on its first write past the quota. The cache's bytes are now reserved as well. No quota can be set
    here: a file-size limit (RLIMIT_FSIZE, this process's soft limit, restored after) stands in for it, which a
    write past a quota fails like (EFBIG for EDQUOT); the free space is this machine's disk."""
    import resource

    from trainer.data import prepare as prepare_module

    monkeypatch.setattr(prepare_module, "FORECAST_AFTER_ROWS", 1000)
    rows = [json.loads(line) for line in (EXAMPLES / "data" / "tiny_chat.jsonl").read_text().splitlines()] * 25
    source = tmp_path / "big.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def refused(cache) -> str:
        cfg = load_config(tiny_config(tmp_path, tiny_model, data={"path": str(source), "format": "messages",
                                                                   "seq_len": 128, "cache_dir": str(cache)}))
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))  # 1 MiB: the 10,000 rows' ids take ~1.8 MB
        try:
            with pytest.raises(DataError) as err:
                prep(cfg)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert [p.name for p in cache.iterdir() if not p.name.endswith(".failed")] == []
        return str(err.value)

    cache = tmp_path / "cache"
    message = refused(cache)
    assert message.startswith(f"data.cache_dir: {cache}: preparing {source} (") and "cannot be written there (File " \
        "too large), though its filesystem reports" in message, message
    assert "its first 1,000 rows gave" in message and "stopped after 1,000 rows" in message, message
    # A source too small to be projected: the write past the limit itself is named as running out of room.
    monkeypatch.setattr(prepare_module, "FORECAST_AFTER_ROWS", 20_000)
    cache = tmp_path / "small-source-cache"
    message = refused(cache)
    assert message.startswith(f"data.cache_dir: {cache}: preparing the data ran out of room (File too large; a "
                              f"full filesystem or a quota)"), message
