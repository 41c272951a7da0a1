"""Rows -> token ids and labels on disk, and in memory only what each sample is (its row, length, method).

A dataset's tokens do not fit in a login node's memory at the scale runs train on (1 B tokens are 8 GB of
ids and labels alone), so the rows are read as a stream, tokenized a batch at a time (in worker processes
for large sources) and each batch's samples appended to two flat int32 files. Packing later reads them back
sequence by sequence (`SampleStore.read_into`): what stays in memory is a few numbers per sample.
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from launcher.contract.config import DataFields, RunConfig
from trainer.data.formats import BadRow, parse_json, to_chat
from trainer.data.render import METHODS, Rendered, Renderer, fit_length, num_targets
from trainer.data.sources import RawRow

POLICY_DROPS = ("too_long", "no_trained_tokens")
"""Reasons that follow a data setting (data.truncation), not malformed input: counted, never an error."""
BATCH_ROWS = 500
WORKERS_FROM_ROWS = 20_000
"""Sources with fewer rows are tokenized in this process: forking workers costs more than they save."""


class SampleStore:
    """Samples' token ids and labels as two flat int32 files; sample k is [starts[k], starts[k + 1])."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True)
        self.directory = directory
        self.starts = np.zeros(1, np.int64)
        self.lengths = np.zeros(0, np.int64)
        self._lengths: list[np.ndarray] = []
        self._files = [open(directory / name, "wb") for name in ("ids.bin", "labels.bin")]

    def append(self, ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray) -> None:
        for fh, values in zip(self._files, (ids, labels)):
            fh.write(np.ascontiguousarray(values, dtype=np.int32).tobytes())
        self._lengths.append(lengths)

    def finish(self) -> None:
        """Once written: the offsets known, the files open for reading."""
        self.close()
        self.lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self._lengths = []
        self._files = [open(self.directory / name, "rb") for name in ("ids.bin", "labels.bin")]

    def close(self) -> None:
        for fh in self._files:
            fh.close()

    def read_into(self, k: int, ids: np.ndarray, labels: np.ndarray) -> None:
        """Sample k into the given int32 views (its length each), with one read per file: the pages go through
        the page cache, and none of them stay in this process's memory."""
        offset = int(self.starts[k]) * 4
        for fh, out in zip(self._files, (ids, labels)):
            if len(out) and os.preadv(fh.fileno(), [memoryview(out).cast("B")], offset) != out.nbytes:
                raise OSError(f"{self.directory}: short read of sample {k}")


@dataclass
class Encoded:
    """One source after tokenization: its usable samples and what happened to the other rows.

    A row gives one sample, or one per assistant turn where it is rendered per_turn.
    """

    store: SampleStore
    """The kept samples' ids and labels, in row order."""
    rows: np.ndarray
    """The row each sample comes from (an eval holdout takes whole rows, never some turns of one)."""
    methods: np.ndarray
    """Per sample: index into render.METHODS of how its trained spans were found."""
    turns: np.ndarray
    """Per sample: the assistant turn a per_turn sample trains (1-based), else 0."""
    rows_read: int
    skipped: Counter
    """Rows left without any sample, per reason."""
    truncated: int
    bad: list[tuple[str, str, str]]
    """(file:line, reason, detail) of malformed rows, in file order (policy drops are only counted)."""
    turns_dropped: Counter
    """per_turn samples dropped (too long, nothing trained) from rows whose other samples were kept."""

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class _Batch:
    """What a worker sends back for a batch of rows: the kept samples flat, and every dropped output."""

    ids: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray
    rows: np.ndarray
    methods: np.ndarray
    turns: np.ndarray
    truncated: np.ndarray
    dropped: list[tuple[int, str, str, str]]
    """(row, reason, file:line, detail) of each output without a sample (a row, or one per_turn sample)."""


def _render_rows(rows: list[RawRow], fmt: str, f: DataFields, renderer: Renderer) -> list[BadRow | list[Rendered]]:
    out: list[BadRow | list[Rendered]] = []
    for row in rows:
        try:
            if row.error:
                raise BadRow(*row.error.split(": ", 1))
            out.append(renderer.render_samples(to_chat(parse_json(row.text), fmt, f)))
        except BadRow as exc:
            out.append(exc)
    return out


@dataclass
class _Job:
    fmt: str
    fields: DataFields
    renderer: Renderer
    seq_len: int
    truncation: str


_JOB: Optional[_Job] = None
"""The job of a worker process, set by the fork that starts it."""


def _encode_batch(rows: list[RawRow], first: int, job: Optional[_Job] = None) -> _Batch:
    """Rows first, first + 1, ... -> their samples (token ids and labels), or per row why it gave none."""
    job = job or _JOB
    rendered = _render_rows(rows, job.fmt, job.fields, job.renderer)
    encoded = iter(job.renderer.encode_many([s for r in rendered if isinstance(r, list) for s in r]))
    ids, labels, kept, dropped = [], [], [], []
    for i, samples in enumerate(rendered):
        if isinstance(samples, BadRow):
            dropped.append((first + i, samples.reason, rows[i].where, samples.detail))
            continue
        for sample in samples:
            sample_ids, sample_labels = next(encoded)
            try:
                sample_ids, sample_labels, cut = fit_length(sample_ids, sample_labels, job.seq_len, job.truncation)
                if num_targets(sample_labels) == 0:
                    raise BadRow("no_trained_tokens", "no token carries loss" + (" after truncation" if cut else ""))
            except BadRow as exc:
                dropped.append((first + i, exc.reason, rows[i].where, exc.detail))
                continue
            ids.append(sample_ids)
            labels.append(sample_labels)
            kept.append((first + i, METHODS.index(sample.method), sample.turn, cut))
    meta = np.array(kept, dtype=np.int64).reshape(-1, 4)
    empty = np.zeros(0, np.int32)
    return _Batch(np.concatenate(ids).astype(np.int32, copy=False) if ids else empty,
                  np.concatenate(labels).astype(np.int32, copy=False) if labels else empty,
                  np.array([len(x) for x in ids], dtype=np.int64), meta[:, 0], meta[:, 1].astype(np.int8),
                  meta[:, 2].astype(np.int16), meta[:, 3].astype(bool), dropped)


def _workers(cfg: RunConfig, enough_rows: bool) -> Optional[int]:
    if cfg.data.num_proc:
        return cfg.data.num_proc if cfg.data.num_proc > 1 else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, cores) if enough_rows and cores > 1 else None


def _batches(rows: Iterable[RawRow]) -> Iterator[tuple[list[RawRow], int]]:
    it, first = iter(rows), 0
    while batch := list(itertools.islice(it, BATCH_ROWS)):
        yield batch, first
        first += len(batch)


def _encoded_batches(batches: Iterator[tuple[list[RawRow], int]], job: _Job,
                     workers: Optional[int]) -> Iterator[tuple[int, _Batch]]:
    """(rows read, result) of each batch in row order. With workers, a bounded number of batches go ahead of the
    writer (Pool.imap would read the whole source into its task queue)."""
    global _JOB
    if not workers:
        for batch, first in batches:
            yield len(batch), _encode_batch(batch, first, job)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are the parallelism
    _JOB = job  # the forked workers inherit it; nothing is pickled but rows and results
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            pending: deque = deque()
            for batch, first in batches:
                pending.append((len(batch), pool.apply_async(_encode_batch, (batch, first))))
                if len(pending) >= 2 * workers:
                    n, result = pending.popleft()
                    yield n, result.get()
            while pending:
                n, result = pending.popleft()
                yield n, result.get()
    finally:
        _JOB = None


def encode_source(rows: Iterator[RawRow], renderer: Renderer, cfg: RunConfig, fmt: str, fields: DataFields,
                  directory: Path, desc: str, on_progress: Optional[Callable[[int, int], None]] = None) -> Encoded:
    """One source's rows -> its samples in `directory` and what became of every row. on_progress(rows, tokens):
    after each batch is written, the rows read and tokens written so far (it may raise to stop the build)."""
    from tqdm.auto import tqdm

    job = _Job(fmt, fields, renderer, cfg.data.seq_len, cfg.data.truncation)
    head = list(itertools.islice(rows, WORKERS_FROM_ROWS))
    workers = _workers(cfg, len(head) == WORKERS_FROM_ROWS)
    store = SampleStore(directory)
    columns: dict[str, list[np.ndarray]] = {"rows": [np.zeros(0, np.int64)], "methods": [np.zeros(0, np.int8)],
                                            "turns": [np.zeros(0, np.int16)], "truncated": [np.zeros(0, bool)]}
    dropped: list[tuple[int, str, str, str]] = []
    tokens = 0
    with tqdm(desc=f"tokenizing {desc}" + (f" with {workers} workers" if workers else ""), unit=" rows",
              mininterval=2) as progress:
        for n, batch in _encoded_batches(_batches(itertools.chain(head, rows)), job, workers):
            store.append(batch.ids, batch.labels, batch.lengths)
            for name, values in columns.items():
                values.append(getattr(batch, name))
            dropped += batch.dropped
            progress.update(n)
            tokens += int(batch.lengths.sum())
            if on_progress is not None:
                on_progress(progress.n, tokens)
        read = progress.n
    store.finish()
    return _outcome(store, *(np.concatenate(values) for values in columns.values()), dropped, read)


def _outcome(store: SampleStore, rows: np.ndarray, methods: np.ndarray, turns: np.ndarray, truncated: np.ndarray,
             dropped: list[tuple[int, str, str, str]], rows_read: int) -> Encoded:
    """Per row what became of it: a row counts as kept when any of its samples is, and a row without one is
    reported by its first output's reason."""
    of_kept_row = np.isin(np.array([d[0] for d in dropped], dtype=np.int64), rows)
    lost, last = [], -1
    for (row, reason, where, detail), partly in zip(dropped, of_kept_row):
        if not partly and row != last:  # outputs come in row order
            lost.append((reason, where, detail))
        last = row
    return Encoded(store=store, rows=rows, methods=methods, turns=turns, rows_read=rows_read,
                   skipped=Counter(reason for reason, _, _ in lost), truncated=len(np.unique(rows[truncated])),
                   bad=[(where, reason, detail) for reason, where, detail in lost if reason not in POLICY_DROPS],
                   turns_dropped=Counter(d[1] for d, partly in zip(dropped, of_kept_row) if partly))
