"""Sources: every file type, globs and directories read the same rows; mixtures, eval splits, workers."""
from __future__ import annotations

import csv
import json
import random
import resource

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from launcher.contract.config import load_config
from trainer.data.prepare import DataError, prepare
from trainer.data.sources import SourceError, _json_array_items

from conftest import tiny_config

ROWS = [{"instruction": f"sort: {' '.join(random.Random(i).sample('abcdefgh', 4))}", "input": "x" if i % 3 == 0 else "",
         "output": f"answer {i}"} for i in range(40)]


def quiet(_msg: str) -> None:
    pass


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_csv(path, rows) -> str:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(rows)
    return str(path)


def prep(tmp_path, tiny_model, path, fmt="alpaca", **data):
    cfg = load_config(tiny_config(tmp_path, tiny_model, data={"path": path, "format": fmt, "seq_len": 128, **data}))
    return prepare(cfg, log=quiet)


def arrays(prepared):
    t = prepared.train
    return [np.asarray(getattr(t, f)) for f in ("tokens", "labels", "seq_starts", "sample_lens")]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def sample_texts(data, tok) -> list[str]:
    out, start = [], 0
    for length in data.sample_lens:
        out.append(tok.decode(np.asarray(data.tokens[start:start + length]).tolist()))
        start += length
    return out


def test_every_file_type_glob_and_directory_read_the_same_rows(tmp_path, tiny_model):
    (tmp_path / "dir" / "b").mkdir(parents=True)  # read in sorted path order: a.jsonl, b/, c.json
    paths = {
        "jsonl": write_jsonl(tmp_path / "rows.jsonl", ROWS),
        "json": str(tmp_path / "rows.json"),
        "parquet": str(tmp_path / "rows.parquet"),
        "csv": write_csv(tmp_path / "rows.csv", ROWS),
        "glob": str(tmp_path / "part-*.jsonl"),
        "directory": str(tmp_path / "dir"),
    }
    (tmp_path / "rows.json").write_text(json.dumps(ROWS, indent=2))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "rows.parquet")
    write_jsonl(tmp_path / "part-1.jsonl", ROWS[:25])
    write_jsonl(tmp_path / "part-2.jsonl", ROWS[25:])
    write_jsonl(tmp_path / "dir" / "a.jsonl", ROWS[:10])
    write_csv(tmp_path / "dir" / "b" / "rows.csv", ROWS[10:30])
    (tmp_path / "dir" / "c.json").write_text(json.dumps(ROWS[30:]))
    (tmp_path / "dir" / "notes.txt").write_text("not data")
    reference = None
    for name, path in paths.items():
        sub = tmp_path / name
        sub.mkdir()
        prepared = prep(sub, tiny_model, path)
        assert prepared.summary["rows_read"] == prepared.summary["rows_kept"] == 40, name
        got = arrays(prepared)
        reference = reference or got
        assert all(np.array_equal(a, b) for a, b in zip(got, reference)), name


def test_bad_rows_are_located_in_json_csv_and_parquet(tmp_path, tiny_model):
    rows = [ROWS[0], {"instruction": "two\nlines", "input": "", "output": "ok"}, ROWS[1], {"instruction": "no output"}]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    text = (tmp_path / "a.json").read_text()
    json_line = text[:text.index('"no output"')].count("\n")  # the line of the item's opening brace
    with open(tmp_path / "a.csv", "w", newline="") as fh:  # a quoted newline makes row 4 start on line 6
        w = csv.writer(fh)
        w.writerows([["instruction", "input", "output"], ["a", "", "b"], ["two\nlines", "", "ok"], ["c", "", "d"],
                     ["no output", ""]])
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    expected = {"json": f"a.json:{json_line}", "csv": "a.csv:6", "parquet": "a.parquet:row 3"}
    for suffix, where in expected.items():
        with pytest.raises(DataError) as err:
            prep(tmp_path, tiny_model, str(tmp_path / f"a.{suffix}"))
        assert f"{tmp_path}/{where}: missing_field" in str(err.value), str(err.value)
        assert str(err.value).startswith("1 bad row(s)")


def test_broken_json_array_reports_where_parsing_stopped(tmp_path, tiny_model):
    (tmp_path / "b.json").write_text('[\n  {"instruction": "a", "output": "b"},\n'
                                     '  {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(DataError, match=r"b\.json:3: invalid_json"):
        prep(tmp_path, tiny_model, str(tmp_path / "b.json"))


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_a_json_array_read_a_chunk_at_a_time_gives_every_item_where_it_starts(tmp_path, chunk):
    """A large .json array is read a chunk of text at a time: items cut by a chunk's end (a number too, which
    would parse as a shorter one), items longer than a chunk, and one-line arrays give what json.loads gives,
    at the lines the text shows; a syntax error is placed where json.loads places it."""
    items = [{"instruction": "a" * 100, "output": "b"}, 12345, "x", [1, [2, {"c": None}]], 6.5e3, {"d": "\n"}]
    for name, text in (("indented", "[\n" + ",\n".join(json.dumps(i, indent=2) for i in items) + "\n]\n"),
                       ("one-line", json.dumps(items)),
                       ("commas", "  [\n" + ",\n\n".join(json.dumps(i) for i in items) + "  ]  ")):
        path = tmp_path / f"{name}.json"
        path.write_text(text)
        rows = list(_json_array_items(path, chunk=chunk))
        assert [json.loads(r.text) for r in rows] == json.loads(text), name
        starts = [text.index(json.dumps(i, indent=2 if name == "indented" else None)) for i in items]
        assert [r.where for r in rows] == [f"{path}:{text.count(chr(10), 0, at) + 1}" for at in starts], name
    for name, text in (("inside", '[{"a": 1},\n  {"b": 2 "c": 3}]'), ("one-line", '[' + '{"a": 1}, ' * 20 + '{"b" 2}]'),
                       ("cut", '[{"a": 1},\n{"b": "unterminated')):
        path = tmp_path / f"broken-{name}.json"
        path.write_text(text)
        with pytest.raises(json.JSONDecodeError) as reference:
            json.loads(text)
        *good, bad = list(_json_array_items(path, chunk=chunk))
        assert bad.where == f"{path}:{reference.value.lineno}" and not bad.text, name
        assert bad.error == (f"invalid_json: {reference.value.msg} at column {reference.value.colno} "
                             f"(the rest of this .json array is not read)"), name
        assert [json.loads(r.text) for r in good] == json.loads(text[:text.rindex("{")].rstrip(", \n") + "]"), name


def test_a_large_json_array_is_not_held_in_memory_to_be_read(tmp_path):
    """Python's own allocations (tracemalloc: exact, not the noisy RSS) while every item of a 3 MB array is read:
    a few chunks of text, not the file."""
    import tracemalloc

    path = tmp_path / "large.json"
    path.write_text(json.dumps([{"instruction": f"question {i} " + "w" * 300, "output": "answer"}
                                for i in range(10_000)], indent=1))
    tracemalloc.start()
    try:
        count = sum(1 for _ in _json_array_items(path, chunk=1 << 16))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 10_000 and path.stat().st_size > 3e6
    assert peak < 1e6, f"{peak / 1e6:.1f} MB of Python allocations to read a {path.stat().st_size / 1e6:.1f} MB array"


def test_missing_path_is_a_clear_error(tmp_path, tiny_model):
    with pytest.raises(SourceError, match="no such file"):
        prep(tmp_path, tiny_model, str(tmp_path / "nope.jsonl"))
    with pytest.raises(SourceError, match="matches no"):
        prep(tmp_path, tiny_model, str(tmp_path / "nothing-*.jsonl"))


def test_mixture_follows_the_weights(tmp_path, tiny_model, tokenizer):
    alpha = write_jsonl(tmp_path / "alpha.jsonl", [{"instruction": f"alpha {i}", "output": "a"} for i in range(60)])
    beta = write_jsonl(tmp_path / "beta.jsonl", [{"instruction": f"beta {i}", "output": "b"} for i in range(30)])
    prepared = prep(tmp_path, tiny_model, alpha, weight=1.0, mix=[{"path": beta, "weight": 3.0}])
    s = prepared.summary
    assert [src["samples"] for src in s["sources"]] == [22, 68] and s["samples"] == 90  # 90 × 1/4, 90 × 3/4
    texts = sample_texts(prepared.train, tokenizer)
    alphas = [t.split("alpha ")[1].split("<")[0] for t in texts if "alpha " in t]
    betas = [t.split("beta ")[1].split("<")[0] for t in texts if "beta " in t]
    assert len(alphas) == 22 and len(set(alphas)) == 22  # a subset, without repeats
    counts = np.bincount([int(b) for b in betas], minlength=30)
    assert len(betas) == 68 and counts.min() == 2 and counts.max() == 3  # every row twice, 8 of them thrice


def test_eval_path_is_kept_apart(tmp_path, tiny_model, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    held = write_jsonl(tmp_path / "eval.jsonl", [{"instruction": f"evalrow {i}", "output": "e"} for i in range(10)]
                       + [{"instruction": "no output"}])
    prepared = prep(tmp_path, tiny_model, train, eval_path=held, on_bad_row="skip")
    e = prepared.summary["eval"]
    assert (e["from"], e["rows_read"], e["rows_kept"], e["rows_skipped"], e["samples"]) == \
        ("eval_path", 11, 10, {"missing_field": 1}, 10)
    assert all("evalrow" in t for t in sample_texts(prepared.eval, tokenizer))
    assert not any("evalrow" in t for t in sample_texts(prepared.train, tokenizer))
    assert prepared.summary["rows_read"] == 40 and prepared.summary["rows_skipped"] == {}


def test_eval_fraction_holds_out_rows_disjointly(tmp_path, tiny_model, tokenizer):
    prepared = prep(tmp_path, tiny_model, write_jsonl(tmp_path / "rows.jsonl", ROWS), eval_fraction=0.25)
    train, held = sample_texts(prepared.train, tokenizer), sample_texts(prepared.eval, tokenizer)
    assert (len(train), len(held)) == (30, 10) and prepared.summary["eval"]["samples"] == 10
    assert not set(train) & set(held) and len(set(train) | set(held)) == 40
    assert prepared.summary["eval"]["packing_efficiency"] > 0


def test_two_workers_give_the_same_result(tmp_path, tiny_model, capfd):
    rng = random.Random(0)
    words = "the a of cat dog bird red blue green tree river city".split()
    rows = []
    for i in range(3000):
        msgs = [{"role": "system", "content": "Be brief."}] if i % 2 else []
        for _ in range(rng.randint(1, 3)):
            msgs += [{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(2, 12)))},
                     {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 20)))}]
        rows.append({"messages": msgs} if i % 500 else {"messages": msgs[:1]})  # a few bad rows too
    path = write_jsonl(tmp_path / "many.jsonl", rows)
    results, child_cpu = [], []
    for workers in (2, 1):
        sub = tmp_path / f"w{workers}"
        sub.mkdir()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        results.append(prep(sub, tiny_model, path, "messages", seq_len=512, num_proc=workers, on_bad_row="skip",
                            cache_dir=str(sub / "cache")))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        child_cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    # Two worker processes really tokenized (the kernel counts their CPU time once they are reaped), one did not.
    assert child_cpu[0] > 0.3 and child_cpu[1] < 0.01, child_cpu
    assert "with 2 workers" in capfd.readouterr().err
    two, one = results
    assert all(np.array_equal(a, b) for a, b in zip(arrays(two), arrays(one)))
    assert two.summary["rows_skipped"] == one.summary["rows_skipped"] == {"no_assistant_turn": 6}
    assert two.summary["rows_kept"] == 2994


def test_max_rows_reads_the_first_rows_of_each_source(tmp_path, tiny_model):
    """data.max_rows and data.mix[i].max_rows give the sequences (mixed, and an eval_fraction held out) that the
    first rows copied into files of their own give; a bad row past the limit is never read."""
    from trainer.data.prepare import cache_inputs, load_tokenizer

    alpha = [{"instruction": f"alpha {i}", "output": "a" * (i % 7 + 1)} for i in range(60)] + [{"instruction": "x"}]
    beta = [{"instruction": f"beta {i}", "output": "b"} for i in range(30)]
    (tmp_path / "full").mkdir()
    (tmp_path / "first").mkdir()
    write_jsonl(tmp_path / "full" / "alpha.jsonl", alpha)
    (tmp_path / "full" / "beta.json").write_text(json.dumps(beta))
    write_jsonl(tmp_path / "first" / "alpha.jsonl", alpha[:40])
    (tmp_path / "first" / "beta.json").write_text(json.dumps(beta[:12]))

    def run(where: str, **limits):
        return prep(tmp_path / where, tiny_model, str(tmp_path / where / "alpha.jsonl"), eval_fraction=0.25,
                    mix=[{"path": str(tmp_path / where / "beta.json"), "weight": 2.0,
                          **({"max_rows": limits["beta"]} if limits else {})}],
                    **({"max_rows": limits["alpha"]} if limits else {}))

    limited, reference = run("full", alpha=40, beta=12), run("first")
    for got, want in zip(arrays(limited), arrays(reference)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(limited.eval.tokens, reference.eval.tokens)
    assert [s["rows_read"] for s in limited.summary["sources"]] == [40, 12]

    cfg = load_config(tiny_config(tmp_path, tiny_model, data={"path": str(tmp_path / "full" / "alpha.jsonl"),
                                                               "format": "alpaca", "seq_len": 128}))
    tok = load_tokenizer(cfg)
    assert "max_rows" not in cache_inputs(cfg, tok)["sources"][0]  # the keys of caches built before stay valid
    cfg.data.max_rows = 40
    assert cache_inputs(cfg, tok)["sources"][0]["max_rows"] == 40
