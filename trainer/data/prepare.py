"""Read -> validate -> render and mask -> mix -> pack -> cache, once per set of inputs.

This runs before any process group exists (in `shardtune prepare`, in `shardtune launch`, or at the
start of every rank, where all but one process find the cache built or wait for it), so a bad row
fails the job before a single GPU is held.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from launcher.config import DataFields, RunConfig
from trainer.data.cache import build_once, cache_key, default_cache_root
from trainer.data.formats import BadRow, parse_json, to_sample
from trainer.data.packing import PackedSet, best_fit_decreasing, build_packed, one_per_sequence, packing_stats
from trainer.data.render import Renderer, fit_length, install_template
from trainer.data.sources import RawRow, fingerprint_files, read_rows

MAX_LISTED_BAD_ROWS = 20


class DataError(Exception):
    """Bad rows with data.on_bad_row=error, or data that cannot make a single training sequence."""


@dataclass
class Source:
    path: str
    format: str
    fields: DataFields
    weight: float
    split: str


@dataclass
class Prepared:
    train: PackedSet
    eval: Optional[PackedSet]
    summary: dict
    cache_dir: Path


def sources_of(cfg: RunConfig) -> list[Source]:
    d = cfg.data
    out = [Source(d.path, d.format, d.fields, d.weight, d.split)]
    out += [Source(s.path, s.format or d.format, s.fields or d.fields, s.weight, s.split) for s in d.mix]
    return out


def load_tokenizer(cfg: RunConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.name_or_path, revision=cfg.model.revision,
                                        trust_remote_code=cfg.model.trust_remote_code)
    needs_template = any(s.format != "text" for s in sources_of(cfg))
    install_template(tok, cfg.data.chat_template, needs_template)
    return tok


def tokenizer_fingerprint(tok) -> str:
    h = hashlib.sha256(tok.backend_tokenizer.to_str().encode())
    h.update(json.dumps([tok.chat_template, tok.eos_token_id, tok.pad_token_id], default=str).encode())
    return h.hexdigest()[:20]


def _source_fingerprint(s: Source) -> dict:
    files = fingerprint_files(s.path)
    return {"files": files or [s.path, s.split], "format": s.format, "fields": s.fields.model_dump(), "weight": s.weight}


def _encode_batch(batch: dict, fmt: str, fields: dict, renderer: Renderer, seq_len: int, truncation: str) -> dict:
    """datasets.map worker: rows -> token ids and labels, or a reason why the row is dropped."""
    out = {"input_ids": [], "labels": [], "n_targets": [], "reason": [], "detail": [], "truncated": []}
    f = DataFields(**fields)
    for text, error in zip(batch["text"], batch["error"]):
        ids, labels, truncated = [], [], False
        try:
            if error:
                raise BadRow(*error.split(": ", 1))
            ids, labels = renderer.encode(to_sample(parse_json(text), fmt, f))
            ids, labels, note = fit_length(ids, labels, seq_len, truncation)
            truncated = note == "truncated"
            if not any(x != -100 for x in labels[1:]):
                raise BadRow("no_trained_tokens", "no token carries loss" + (" after truncation" if truncated else ""))
            reason = detail = ""
        except BadRow as exc:
            ids, labels, reason, detail = [], [], exc.reason, str(exc).split(": ", 1)[-1]
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["n_targets"].append(sum(1 for x in labels[1:] if x != -100))
        out["reason"].append(reason)
        out["detail"].append(detail)
        out["truncated"].append(truncated)
    return out


def encode_source(src: Source, renderer: Renderer, cfg: RunConfig, work_dir: Path) -> tuple[dict, list[tuple[str, str, str]]]:
    """One source through datasets.map: (arrays of its good samples, [(where, reason, detail)] of bad rows)."""
    import datasets

    rows = list(read_rows(src.path, src.split))
    raw = datasets.Dataset.from_dict({"where": [r.where for r in rows], "text": [r.text for r in rows],
                                      "error": [r.error for r in rows]})
    del rows
    num_proc = cfg.data.num_proc or (min(8, os.cpu_count() or 1) if len(raw) >= 20_000 else None)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    encoded = raw.map(_encode_batch, batched=True, batch_size=1000, num_proc=num_proc, remove_columns=["text", "error"],
                      fn_kwargs={"fmt": src.format, "fields": src.fields.model_dump(), "renderer": renderer,
                                 "seq_len": cfg.data.seq_len, "truncation": cfg.data.truncation},
                      new_fingerprint=hashlib.sha256(f"{work_dir}{src.path}".encode()).hexdigest()[:16],
                      desc=f"tokenizing {Path(src.path).name}", keep_in_memory=True)
    table = encoded.data.table
    reasons = np.array(table.column("reason").to_pylist(), dtype=object)
    good = reasons == ""
    bad = [(w, r, d) for w, r, d, ok in zip(table.column("where").to_pylist(), reasons,
                                            table.column("detail").to_pylist(), good) if not ok]
    ids = table.column("input_ids").combine_chunks()
    labels = table.column("labels").combine_chunks()
    offsets = ids.offsets.to_numpy()
    flat_ids, flat_labels = ids.values.to_numpy(), labels.values.to_numpy()
    keep = np.flatnonzero(good)
    arrays = {"ids": [flat_ids[offsets[i]:offsets[i + 1]] for i in keep],
              "labels": [flat_labels[offsets[i]:offsets[i + 1]] for i in keep],
              "truncated": int(np.asarray(table.column("truncated").to_numpy(zero_copy_only=False))[keep].sum()),
              "rows_read": len(reasons)}
    return arrays, bad


def _report_bad_rows(bad: list[tuple[str, str, str]], policy: str) -> dict[str, int]:
    counts = dict(Counter(reason for _, reason, _ in bad))
    if bad and policy == "error":
        listed = "\n".join(f"  {w}: {r}: {d}" for w, r, d in bad[:MAX_LISTED_BAD_ROWS])
        more = f"\n  ... and {len(bad) - MAX_LISTED_BAD_ROWS} more" if len(bad) > MAX_LISTED_BAD_ROWS else ""
        raise DataError(f"{len(bad)} bad row(s) (data.on_bad_row=error; set data.on_bad_row=skip to drop them):\n"
                        f"{listed}{more}\ncounts: {counts}")
    return counts


def mix_and_split(per_source: list[dict], weights: list[float], eval_fraction: float, seed: int):
    """Hold out eval_fraction of every source, then mix the rest in proportion to the weights."""
    rng = np.random.default_rng([seed, 17])
    train, held = [], []
    for arrays in per_source:
        n = len(arrays["ids"])
        order = rng.permutation(n)
        n_eval = int(round(eval_fraction * n))
        held += [(arrays, i) for i in sorted(order[:n_eval])]
        train.append((arrays, np.sort(order[n_eval:])))
    total = sum(len(idx) for _, idx in train)
    share = np.array(weights) / sum(weights)
    picked = []
    for (arrays, idx), p in zip(train, share):
        want = int(round(p * total)) if len(train) > 1 else len(idx)
        if len(idx) == 0:
            continue
        reps, rest = divmod(want, len(idx))  # upsample by whole repeats, then a seeded subset
        chosen = np.concatenate([np.tile(idx, reps), np.sort(rng.choice(idx, size=rest, replace=False))])
        picked += [(arrays, int(i)) for i in chosen]
    return picked, held


def _pack(samples: list[tuple[dict, int]], seq_len: int, packing: bool) -> PackedSet:
    ids = [a["ids"][i] for a, i in samples]
    labels = [a["labels"][i] for a, i in samples]
    lengths = np.array([len(x) for x in ids])
    groups = best_fit_decreasing(lengths, seq_len) if packing else one_per_sequence(lengths)
    return build_packed(ids, labels, groups)


def prepare(cfg: RunConfig, tokenizer=None, log=print) -> Prepared:
    """The packed training (and eval) sets for a config, from the cache or built now."""
    tok = tokenizer or load_tokenizer(cfg)
    d = cfg.data
    sources = sources_of(cfg)
    eval_src = Source(d.eval_path, d.format, d.fields, 1.0, d.split) if d.eval_path else None
    key = cache_key({"sources": [_source_fingerprint(s) for s in sources],
                     "eval": _source_fingerprint(eval_src) if eval_src else None, "eval_fraction": d.eval_fraction,
                     "tokenizer": tokenizer_fingerprint(tok), "train_on": d.train_on, "seq_len": d.seq_len,
                     "packing": d.packing, "truncation": d.truncation, "on_bad_row": d.on_bad_row, "seed": cfg.train.seed})
    root = Path(d.cache_dir) if d.cache_dir else default_cache_root()

    def build(tmp: Path) -> None:
        renderer = Renderer(tok, d.train_on)
        encoded, bad = [], []
        for src in sources:
            arrays, src_bad = encode_source(src, renderer, cfg, tmp)
            encoded.append(arrays)
            bad += src_bad
        eval_arrays, eval_bad = encode_source(eval_src, renderer, cfg, tmp) if eval_src else (None, [])
        skipped = _report_bad_rows(bad + eval_bad, d.on_bad_row)
        picked, held = mix_and_split(encoded, [s.weight for s in sources], d.eval_fraction, cfg.train.seed)
        if not picked:
            raise DataError(f"no usable training rows in {d.path} (skipped: {skipped})")
        train = _pack(picked, d.seq_len, d.packing)
        train.save(tmp / "train")
        evaluation = None
        if eval_arrays is not None:
            evaluation = _pack([(eval_arrays, i) for i in range(len(eval_arrays["ids"]))], d.seq_len, d.packing)
        elif held:
            evaluation = _pack(held, d.seq_len, d.packing)
        if evaluation is not None:
            evaluation.save(tmp / "eval")
        rows_read = sum(a["rows_read"] for a in encoded)
        summary = {"rows_read": rows_read, "rows_kept": sum(len(a["ids"]) for a in encoded),
                   "rows_skipped": skipped, "rows_truncated": sum(a["truncated"] for a in encoded),
                   "samples_in_mixture": len(picked), **packing_stats(train, d.seq_len),
                   "eval": packing_stats(evaluation, d.seq_len) if evaluation is not None else None}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    path, built = build_once(root, key, build, on_wait=log)
    summary = json.loads((path / "summary.json").read_text())
    summary.update({"cache_dir": str(path), "cache_hit": not built})
    evaluation = PackedSet.load(path / "eval") if (path / "eval").is_dir() else None
    return Prepared(PackedSet.load(path / "train"), evaluation, summary, path)
