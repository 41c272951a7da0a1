"""Read -> validate -> render and mask -> mix -> pack -> cache, once per set of inputs.

This runs before any process group exists (in `shardtune prepare`, or at the start of every rank,
where all but one process per filesystem find the cache built or wait for it), so a bad row fails
the job before a single GPU is held.

The cache holds what the data *is*, not what the run does about it: bad rows are recorded in the
entry, and `data.on_bad_row=error` turns them into an error after the build or on a cache hit. So
switching that policy, or anything else that does not change the sequences, reuses the entry.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from launcher.contract.config import DataFields, RunConfig
from launcher.contract.errors import UserError
from launcher.planning.checkpoint_size import OUT_OF_ROOM, free_space, reserve_problem, size_text
from launcher.planning.model_files import absent_model, absent_weights
from trainer.build_once import build_once
from trainer.data.cache import cache_key, cache_root
from trainer.data.collate import pad_id_of
from trainer.data.encode import Encoded, encode_source
from trainer.data.formats import FORMAT_FIELDS
from trainer.data.packing import PackedSet, best_fit_decreasing, one_per_sequence, packing_stats, write_packed
from trainer.data.render import METHODS, Renderer, install_template
from trainer.data.sources import RawRow, fingerprint_files, read_rows, source_extent

MAX_LISTED_BAD_ROWS = 20
MAX_STORED_BAD_ROWS = 1000


class DataError(UserError):
    """Bad rows with data.on_bad_row=error, or data that cannot make a single training sequence."""


@dataclass
class Source:
    path: str
    format: str
    fields: DataFields
    weight: float
    split: str
    revision: Optional[str] = None
    """The hub dataset's commit (or branch, tag) for a hub id."""
    subset: Optional[str] = None
    """The hub dataset's subset (configuration), when it names one."""
    max_rows: Optional[int] = None
    """Only the first rows of the source are read."""


@dataclass
class Prepared:
    train: PackedSet
    eval: Optional[PackedSet]
    summary: dict
    cache_dir: Path


def sources_of(cfg: RunConfig) -> list[Source]:
    d = cfg.data
    kinds = [(d.format, d.fields, d.weight)] + [(s.format or d.format, s.fields or d.fields, s.weight) for s in d.mix]
    reads = [r for r in d.reads() if r.trained]
    limits = [d.max_rows] + [s.max_rows for s in d.mix]
    return [Source(r.path, *kind, r.split, r.revision, r.subset, limit) for r, kind, limit in zip(reads, kinds, limits)]


def eval_source_of(cfg: RunConfig) -> Optional[Source]:
    d = cfg.data
    read = d.reads()[-1]
    return Source(read.path, d.format, d.fields, 1.0, read.split, read.revision, read.subset) if d.eval_path else None


def load_tokenizer(cfg: RunConfig):
    """The run's tokenizer, the first thing a rank (or `prepare`) reads of the model. An absolute path is a local
    directory (the config makes local paths absolute): a model or tokenizer directory this host cannot see, such
    as a hub download on a filesystem another node does not mount, is named here, not passed to transformers,
    which would take it for a malformed hub id."""
    from transformers import AutoTokenizer

    for field, path in (("model.name_or_path", cfg.model.name_or_path), ("model.tokenizer", cfg.model.tokenizer)):
        if path and absent_model(path):
            raise UserError(f"{field}: {path}: no such directory on {socket.gethostname()}: every node must see it "
                            f"(a hub model or tokenizer is downloaded into HF_HOME, which must be on such a "
                            f"filesystem, by `shardtune launch` without --dry_run, or by `shardtune download`)")
    source, revision = cfg.model.tokenizer_source()
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        if not Path(source).is_dir():
            raise
        field = "model.tokenizer" if cfg.model.tokenizer else "model.name_or_path"
        hint = None if cfg.model.tokenizer else absent_weights(source)  # a dry run's snapshot: its config alone
        raise UserError(f"{field}: {source}: transformers cannot load a tokenizer from it ("
                        f"{' '.join(str(exc).split())[:300]})" + (f"; the directory {hint}" if hint else "")) from None
    install_template(tok, cfg.data.chat_template, _needs_template(cfg))
    return tok


def _needs_template(cfg: RunConfig) -> bool:
    return any(s.format != "text" for s in sources_of(cfg))


def tokenizer_fingerprint(tok) -> str:
    """The tokenizer's vocabulary, rules and special tokens; the chat template is keyed separately."""
    h = hashlib.sha256(tok.backend_tokenizer.to_str().encode())
    h.update(json.dumps([tok.eos_token_id, tok.pad_token_id, tok.bos_token_id, tok.special_tokens_map],
                        default=str, sort_keys=True).encode())
    return h.hexdigest()[:20]


def _source_inputs(s: Source, share: Optional[float]) -> dict:
    files = fingerprint_files(s.path)
    hub = [s.path, s.split] + ([s.revision] if s.revision else []) + ([f"subset={s.subset}"] if s.subset else [])
    return {"files": files or hub, "format": s.format,
            "fields": {k: getattr(s.fields, k) for k in FORMAT_FIELDS[s.format]}, "share": share,
            **({"max_rows": s.max_rows} if s.max_rows else {})}  # absent when unset: earlier keys stay valid


def cache_inputs(cfg: RunConfig, tok) -> dict:
    """Everything the prepared sequences depend on, and nothing else (so the key changes exactly then)."""
    d = cfg.data
    sources = sources_of(cfg)
    mixing = len(sources) > 1
    total = sum(s.weight for s in sources)
    chat = _needs_template(cfg)
    eval_src = eval_source_of(cfg)
    return {
        "sources": [_source_inputs(s, round(s.weight / total, 12) if mixing else None) for s in sources],
        "eval_path": _source_inputs(eval_src, None) if eval_src else None,
        "eval_fraction": d.eval_fraction,
        "tokenizer": tokenizer_fingerprint(tok),
        "chat_template": tok.chat_template if chat else None,
        "train_on": d.train_on if chat else None,
        "multi_turn": d.multi_turn if chat else None,
        "train_on_reasoning": d.train_on_reasoning if chat else None,
        "seq_len": d.seq_len, "packing": d.packing, "truncation": d.truncation,
        # The seed only draws the eval holdout and the mixture's subsets.
        "seed": cfg.train.seed if (mixing or d.eval_fraction) else None,
    }


def bad_rows_message(bad: list[tuple[str, str, str]], total: int, counts: dict[str, int]) -> str:
    listed = "\n".join(f"  {w}: {r}: {d}" for w, r, d in bad[:MAX_LISTED_BAD_ROWS])
    more = f"\n  ... and {total - MAX_LISTED_BAD_ROWS} more" if total > MAX_LISTED_BAD_ROWS else ""
    per_reason = ", ".join(f"{r} {n}" for r, n in sorted(counts.items()))
    return (f"{total} bad row(s) (data.on_bad_row=error; fix them or set data.on_bad_row=skip to drop them):\n"
            f"{listed}{more}\nper reason: {per_reason}")


def _holdout(enc: Encoded, eval_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) sample indices of one source; whole rows are held out, so no turn of a held-out
    conversation is trained on."""
    rows = np.unique(enc.rows)
    order = rng.permutation(len(rows))
    held = np.isin(enc.rows, rows[order[:int(round(eval_fraction * len(rows)))]])
    return np.flatnonzero(~held), np.flatnonzero(held)


@dataclass
class Samples:
    """Samples drawn from several sources, as two arrays (a few bytes each, where Python tuples took ~100):
    sample k is sample index[k] of source source[k]."""

    source: np.ndarray
    index: np.ndarray

    @classmethod
    def of_source(cls, s: int, index: np.ndarray) -> Samples:
        return cls(np.full(len(index), s, dtype=np.int64), np.asarray(index, dtype=np.int64))

    @classmethod
    def joined(cls, parts: list[Samples]) -> Samples:
        return cls(np.concatenate([np.zeros(0, np.int64)] + [p.source for p in parts]),
                   np.concatenate([np.zeros(0, np.int64)] + [p.index for p in parts]))

    def __len__(self) -> int:
        return len(self.index)

    def gather(self, per_source: list[np.ndarray]) -> np.ndarray:
        """Each sample's value, from one array of values per source."""
        offsets = np.cumsum([0] + [len(values) for values in per_source])[:-1].astype(np.int64)
        return np.concatenate(per_source)[offsets[self.source] + self.index]


def mix_and_split(per_source: list[Encoded], weights: list[float], eval_fraction: float,
                  seed: int) -> tuple[Samples, Samples, list[int]]:
    """Hold out eval_fraction of every source's rows, then mix the rest in proportion to the weights.

    Returns (training samples, held-out samples, training samples per source). The mixture has as many samples
    as the sources' training samples together; a source with more weight than samples is repeated, one with less
    is subsampled.
    """
    rng = np.random.default_rng([seed, 17])
    train, held = [], []
    for s, enc in enumerate(per_source):
        kept, out = _holdout(enc, eval_fraction, rng)
        held.append(Samples.of_source(s, out))
        train.append(kept)
    if len(train) == 1:
        return Samples.of_source(0, train[0]), held[0], [len(train[0])]
    total = sum(len(idx) for idx in train)
    share = np.array(weights, dtype=float) / sum(weights)
    picked, per_source_count = [], []
    for s, (idx, p) in enumerate(zip(train, share)):
        want = int(round(p * total)) if len(idx) else 0
        reps, rest = divmod(want, len(idx)) if len(idx) else (0, 0)
        chosen = np.concatenate([np.tile(idx, reps), np.sort(rng.choice(idx, size=rest, replace=False))])
        picked.append(Samples.of_source(s, chosen))
        per_source_count.append(int(want))
    return Samples.joined(picked), Samples.joined(held), per_source_count


def _pack(directory: Path, per_source: list[Encoded], samples: Samples, seq_len: int,
          packing: bool) -> tuple[PackedSet, int]:
    """The given samples packed into `directory`, and their largest token id."""
    lengths = samples.gather([e.store.lengths for e in per_source])
    groups = best_fit_decreasing(lengths, seq_len) if packing else one_per_sequence(lengths)

    def read(picked: np.ndarray, ids: np.ndarray, labels: np.ndarray) -> None:
        at = 0
        for s, i, n in zip(samples.source[picked].tolist(), samples.index[picked].tolist(), lengths[picked].tolist()):
            per_source[s].store.read_into(i, ids[at:at + n], labels[at:at + n])
            at += n

    return write_packed(directory, lengths, groups, read, samples.gather([e.methods for e in per_source]),
                        samples.gather([e.turns for e in per_source]))


def _encode(src: Source, renderer: Renderer, cfg: RunConfig, directory: Path) -> Encoded:
    rows = itertools.islice(read_rows(src.path, src.split, src.revision, src.subset), src.max_rows)
    extent = source_extent(src.path)
    forecast = _RoomForecast(src, cfg, directory, *extent) if extent else None
    return encode_source(forecast.measure(rows) if forecast else rows, renderer, cfg, src.format, src.fields,
                         directory, Path(src.path).name, on_progress=forecast)


FORECAST_AFTER_ROWS = 20_000
"""Rows of a source tokenized before its whole is projected from them."""


class _RoomForecast:
    """Refuse, early, to tokenize a source the cache's filesystem cannot hold with its packed set.

    Tokenizing a large dataset takes hours, and the exact check (`_check_room`) can only come after it; a full
    filesystem found on the way is an ENOSPC just as late. So once the first `FORECAST_AFTER_ROWS` rows are
    written, their tokens per byte of text (JSON Lines, JSON) or per row (Parquet) project the whole source's, and a
    build that would need more than the filesystem has free, or than a quota leaves (reserve_problem), stops there.
    Sources whose size is not known from their files (a hub id, CSV) keep the exact check alone.
    """

    def __init__(self, src: Source, cfg: RunConfig, directory: Path, unit: str, extent: int) -> None:
        self.src, self.cfg, self.directory, self.unit, self.extent = src, cfg, directory, unit, extent
        self.sizes: list[int] = []
        self.checked = False

    def measure(self, rows: Iterator[RawRow]) -> Iterator[RawRow]:
        for row in rows:
            if not self.checked:
                self.sizes.append(len(row.text.encode()) + 1 if self.unit == "bytes" else 1)
            yield row

    def __call__(self, rows: int, tokens: int) -> None:
        if self.checked or rows < FORECAST_AFTER_ROWS:
            return
        self.checked = True
        measured = sum(self.sizes[:rows])
        self.sizes = []
        total = self.extent
        if self.src.max_rows:
            total = min(total, int(self.src.max_rows * measured / rows))
        projected = tokens / max(measured, 1) * total
        need = projected * 2 * PACKED_BYTES_PER_TOKEN - tokens * PACKED_BYTES_PER_TOKEN  # written already
        root = self.directory.parents[2]  # <root>/<key>.tmp-.../samples/<source>
        found = free_space(root)
        if found is None:
            return
        quota = None if need > found[1] else reserve_problem(root, int(need), f"preparing {self.src.path}")
        if need <= found[1] and quota is None:
            return
        what = f"{size_text(total)} of text" if self.unit == "bytes" else f"{total:,} rows"
        short = quota or (f"{root} has {found[1] / 1e9:,.2f} GB free, and preparing {self.src.path} would need "
                          f"~{need / 1e9:,.2f} GB more")
        raise DataError(f"{_cache_field(self.cfg)}: {short}: its first {rows:,} rows gave {tokens:,} tokens, so its "
                        f"{what} project to ~{projected:,.0f} tokens, at {PACKED_BYTES_PER_TOKEN} bytes per token "
                        f"tokenized and {PACKED_BYTES_PER_TOKEN} more packed beside them while it builds (stopped "
                        f"after {rows:,} rows, not hours into tokenizing): {CACHE_ROOM_ADVICE}")


def _counts(encoded: list[Encoded]) -> dict:
    skipped = sum((e.skipped for e in encoded), Counter())
    dropped = sum((e.turns_dropped for e in encoded), Counter())
    read = sum(e.rows_read for e in encoded)
    out = {"rows_read": read, "rows_kept": sum(len(np.unique(e.rows)) for e in encoded),
           "rows_skipped": dict(sorted(skipped.items())), "rows_truncated": sum(e.truncated for e in encoded)}
    if dropped:
        out["turns_dropped"] = dict(sorted(dropped.items()))
    return out


def _masks(encoded: list[Encoded], multi_turn: str) -> dict:
    """How many rows and samples each method of finding trained spans gave (a row has one method)."""
    rows: Counter = Counter()
    samples: Counter = Counter()
    for e in encoded:
        for code in np.unique(e.methods):
            of_method = e.methods == code
            rows[METHODS[code]] += len(np.unique(e.rows[of_method]))
            samples[METHODS[code]] += int(of_method.sum())
    return {"multi_turn": multi_turn, "rows": dict(sorted(rows.items())), "samples": dict(sorted(samples.items()))}


def _build(tmp: Path, cfg: RunConfig, tok, log: Callable[[str], None]) -> None:
    """The cache entry in `tmp`. The tokenized samples go to `tmp/samples` (removed at the end, or with `tmp` when
    the build fails): the sequences are packed from there, so no step holds the dataset's tokens in memory."""
    d = cfg.data
    started = time.perf_counter()
    sources, eval_src = sources_of(cfg), eval_source_of(cfg)
    renderer = Renderer(tok, d.train_on, d.multi_turn, d.train_on_reasoning)
    scratch = tmp / "samples"
    encoded = [_encode(src, renderer, cfg, scratch / str(k)) for k, src in enumerate(sources)]
    eval_encoded = _encode(eval_src, renderer, cfg, scratch / "eval") if eval_src else None
    every = encoded + ([eval_encoded] if eval_encoded else [])
    picked, held, per_source = mix_and_split(encoded, [s.weight for s in sources], d.eval_fraction, cfg.train.seed)
    train, largest, eval_summary, held_from = None, [], None, encoded
    if eval_encoded is not None:
        eval_summary = {"from": "eval_path", **_counts([eval_encoded]), "samples": len(eval_encoded)}
        held_from, held = [eval_encoded], Samples.of_source(0, np.arange(len(eval_encoded)))
    elif len(held):
        eval_summary = {"from": "eval_fraction", "samples": len(held)}
    _check_room(tmp, cfg, every, [(encoded, picked), (held_from, held)])
    if len(picked):
        train, top = _pack(tmp / "train", encoded, picked, d.seq_len, d.packing)
        largest.append(top)
    if len(held):
        evaluation, top = _pack(tmp / "eval", held_from, held, d.seq_len, d.packing)
        largest.append(top)
        eval_summary.update(packing_stats(evaluation, d.seq_len))
    for e in every:
        e.store.close()
    shutil.rmtree(scratch)
    bad = [b for e in every for b in e.bad]
    with open(tmp / "bad_rows.jsonl", "w") as fh:
        for w, r, detail in bad[:MAX_STORED_BAD_ROWS]:
            fh.write(json.dumps({"where": w, "reason": r, "detail": detail}) + "\n")
    empty = {"sequences": 0, "tokens": 0, "trained_tokens": 0, "pad_tokens": 0, "packing_efficiency": 0.0}
    summary = {**_counts(encoded), "samples": len(picked), "seq_len": d.seq_len, "masks": _masks(encoded, d.multi_turn),
               **(packing_stats(train, d.seq_len) if train is not None else empty),
               "sources": [{"path": s.path, "format": s.format, "weight": s.weight, **_counts([e]), "samples": n}
                           for s, e, n in zip(sources, encoded, per_source)],
               "eval": eval_summary, "bad_rows": len(bad),
               "bad_rows_per_reason": dict(sorted(Counter(r for _, r, _ in bad).items())),
               "largest_token_id": max(largest, default=-1),
               "build_seconds": round(time.perf_counter() - started, 3)}
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"preprocessed {summary['rows_read']} rows into {summary['sequences']} sequences "
        f"in {summary['build_seconds']:.1f} s")


PACKED_BYTES_PER_TOKEN = 8
"""int32 ids and labels, in the packed set as in the tokenized samples."""


def _check_room(tmp: Path, cfg: RunConfig, encoded: list[Encoded], packs: list[tuple[list[Encoded], Samples]]) -> None:
    """Refuse before packing what the cache's filesystem has no room for: after tokenizing (hours, for a large
    dataset) the size is known, and a packed set cut off by a full disk would only fail later. `packs`: the
    samples of each set to pack, and the sources they are drawn from."""
    tokens = sum(int(chosen.gather([e.store.lengths for e in sources]).sum()) for sources, chosen in packs)
    need = tokens * PACKED_BYTES_PER_TOKEN + 64 * sum(len(chosen) for _, chosen in packs)
    found = free_space(tmp.parent)
    if found is None:
        return
    quota = None if need > found[1] else reserve_problem(tmp.parent, need, f"the packed set of {tokens:,} tokens")
    if need > found[1] or quota:
        samples = sum(int(e.store.starts[-1]) for e in encoded) * PACKED_BYTES_PER_TOKEN
        short = quota or (f"{tmp.parent} has {found[1] / 1e9:,.2f} GB free, and the packed set of {tokens:,} tokens "
                          f"needs {need / 1e9:,.2f} GB")
        raise DataError(f"{_cache_field(cfg)}: {short} (its tokenized samples, {samples / 1e9:,.2f} GB beside it "
                        f"while it builds, are deleted after): {CACHE_ROOM_ADVICE}")


CACHE_ROOM_ADVICE = ("free space there, or set data.cache_dir to a filesystem with room (one every node mounts "
                     "builds once per job, a node-local one once per node)")


def _cache_field(cfg: RunConfig) -> str:
    return "data.cache_dir" if cfg.data.cache_dir else (
        "SHARDTUNE_CACHE" if os.environ.get("SHARDTUNE_CACHE") else "the data cache (data.cache_dir unset)")


def _out_of_room(cfg: RunConfig, root: Path, exc: OSError) -> DataError:
    return DataError(f"{_cache_field(cfg)}: {root}: preparing the data ran out of room ({exc.strerror}; a full "
                     f"filesystem or a quota): the tokenized samples take {PACKED_BYTES_PER_TOKEN} bytes per token "
                     f"while the packed set, {PACKED_BYTES_PER_TOKEN} more, is written: {CACHE_ROOM_ADVICE}")


def _largest_token_id(sets: list[Optional[PackedSet]]) -> int:
    return max([int(s.tokens.max()) for s in sets if s is not None and len(s.tokens)], default=-1)


def check_vocabulary(cfg: RunConfig, tokenizer, prepared: Prepared) -> None:
    """Fail before the model loads when a token id of the data, or the padding id, has no row in the model's
    embedding: a tokenizer that is not the model's (model.tokenizer), or one with tokens added.

    On a GPU the first forward would otherwise stop on a device-side assert that names nothing, after the
    model has loaded (minutes at 70B), and a rank that dies there can leave its peers waiting in a collective.
    Caches built before the largest id was recorded are scanned for it at every start (memory-mapped).
    """
    from transformers import AutoConfig

    model = AutoConfig.from_pretrained(cfg.model.name_or_path, revision=cfg.model.revision,
                                       trust_remote_code=cfg.model.trust_remote_code).get_text_config()
    vocab = getattr(model, "vocab_size", None)
    if not vocab:
        return
    largest = prepared.summary.get("largest_token_id")
    if largest is None:
        largest = _largest_token_id([prepared.train, prepared.eval])
    pad = pad_id_of(tokenizer)
    source = f"tokenizer {cfg.model.tokenizer or cfg.model.name_or_path} ({len(tokenizer):,} tokens)"
    problems = []
    if largest >= vocab:
        problems.append(f"the data holds token id {largest:,}")
    if pad is not None and pad >= vocab:
        kind = "pad" if tokenizer.pad_token_id is not None else "EOS"
        problems.append(f"rows are padded with id {pad:,} (the tokenizer's {kind} token)")
    if problems:
        raise DataError(f"{' and '.join(problems)}, but {cfg.model.name_or_path} embeds ids 0..{vocab - 1:,} "
                        f"(vocab_size {vocab:,}): the {source} is not this model's, or has tokens added. Set "
                        "model.tokenizer to the model's own tokenizer (or resize the model's embeddings first)")


def prepare(cfg: RunConfig, tokenizer=None, log: Callable[[str], None] = print) -> Prepared:
    """The packed training (and eval) sets for a config, from the cache or built now.

    Raises DataError for bad rows under data.on_bad_row=error (listing file:line), or when no
    training sequence remains.
    """
    tok = tokenizer or load_tokenizer(cfg)
    install_template(tok, cfg.data.chat_template, _needs_template(cfg))
    d = cfg.data
    inputs = cache_inputs(cfg, tok)
    key = cache_key(inputs)
    root = cache_root(d.cache_dir)

    def build(tmp: Path) -> None:
        log(f"preprocessing {d.path} into {root / key}")
        try:
            _build(tmp, cfg, tok, log)
            (tmp / "inputs.json").write_text(json.dumps(inputs, indent=2, default=str) + "\n")
        except OSError as exc:
            if exc.errno in OUT_OF_ROOM:
                raise _out_of_room(cfg, root, exc) from None
            raise

    path, built = build_once(root, key, build, on_wait=log, what="preprocess")
    summary = json.loads((path / "summary.json").read_text())
    summary.update({"cache_dir": str(path), "cache_hit": not built})
    if summary["bad_rows"] and d.on_bad_row == "error":
        bad = [tuple(json.loads(line).values()) for line in (path / "bad_rows.jsonl").read_text().splitlines()]
        raise DataError(bad_rows_message(bad, summary["bad_rows"], summary["bad_rows_per_reason"]))
    if not summary["sequences"]:
        raise DataError(f"no usable training rows in {d.path} (rows read: {summary['rows_read']}, "
                        f"skipped: {summary['rows_skipped']})")
    evaluation = PackedSet.load(path / "eval") if (path / "eval").is_dir() else None
    return Prepared(PackedSet.load(path / "train"), evaluation, summary, path)
