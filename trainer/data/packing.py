"""Pack samples into fixed-length sequences and store them as flat memory-mapped arrays.

Best-fit decreasing fills sequences to ~99% on instruction data, so almost no compute goes to
padding. The packed set is stored as flat numpy arrays with offsets: random access to any sequence
is O(1) and costs no deserialization, which keeps the training step free of Python data work.
"""
from __future__ import annotations

import bisect
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np


def best_fit_decreasing(lengths: list[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Groups of sample indices whose lengths sum to at most capacity; deterministic for equal input."""
    sizes = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-sizes, kind="stable").tolist()  # longest first, ties in input order
    sizes = sizes.tolist()
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin id), sorted
    for i in order:
        need = sizes[i]
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            room, b = free.pop(at)
            bins[b].append(i)
            if room - need > 0:
                bisect.insort(free, (room - need, b))
        else:
            bins.append([i])
            if capacity - need > 0:
                bisect.insort(free, (capacity - need, len(bins) - 1))
    return bins


def one_per_sequence(lengths: list[int] | np.ndarray) -> list[list[int]]:
    return [[i] for i in range(len(lengths))]


ARRAYS = ("tokens", "labels", "seq_starts", "sample_lens", "sample_starts", "n_targets")
OPTIONAL_ARRAYS = ("sample_method", "sample_turn")


@dataclass
class PackedSet:
    """Packed sequences: sequence k holds tokens[seq_starts[k]:seq_starts[k+1]], made of samples whose
    lengths are sample_lens[sample_starts[k]:sample_starts[k+1]]."""

    tokens: np.ndarray
    labels: np.ndarray
    seq_starts: np.ndarray
    sample_lens: np.ndarray
    sample_starts: np.ndarray
    n_targets: np.ndarray
    sample_method: Optional[np.ndarray] = None
    """Per sample: how its trained spans were found (an index into trainer.data.render.METHODS), for --show."""
    sample_turn: Optional[np.ndarray] = None
    """Per sample: the assistant turn a per_turn sample trains (1-based), else 0."""

    def __len__(self) -> int:
        return len(self.seq_starts) - 1

    def sequence(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = self.seq_starts[k], self.seq_starts[k + 1]
        return self.tokens[a:b], self.labels[a:b], self.sample_lens[self.sample_starts[k]:self.sample_starts[k + 1]]

    @cached_property
    def packs_samples(self) -> bool:
        """Whether any sequence holds more than one sample (its batches may need a mask to keep them apart)."""
        return bool((np.diff(self.sample_starts) > 1).any())

    def sample_lengths(self, indices: np.ndarray) -> np.ndarray:
        """Lengths of every sample packed into the given sequences (for token, sample and FLOP counts)."""
        return np.concatenate([self.sample_lens[self.sample_starts[k]:self.sample_starts[k + 1]] for k in indices])

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for name in ARRAYS + OPTIONAL_ARRAYS:
            if getattr(self, name) is not None:
                np.save(directory / f"{name}.npy", getattr(self, name))

    @classmethod
    def load(cls, directory: Path) -> PackedSet:
        arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        arrays.update({name: np.load(directory / f"{name}.npy") for name in OPTIONAL_ARRAYS
                       if (directory / f"{name}.npy").is_file()})
        return cls(**arrays)


def build_packed(samples_ids: list[np.ndarray], samples_labels: list[np.ndarray], groups: list[list[int]],
                 sample_method: Optional[np.ndarray] = None, sample_turn: Optional[np.ndarray] = None) -> PackedSet:
    """Concatenate each group's samples into one sequence; count the targets of the shifted loss.

    sample_method / sample_turn (per input sample, optional) describe each sample for `prepare --show`.
    """
    layout = Layout.of(np.array([len(x) for x in samples_ids], dtype=np.int64), groups)
    if not len(layout.order):
        empty = np.zeros(0, np.int32)
        return PackedSet(empty, empty.copy(), np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(1, np.int64),
                         np.zeros(0, np.int64))
    tokens = np.concatenate([samples_ids[i] for i in layout.order]).astype(np.int32, copy=False)
    labels = np.concatenate([samples_labels[i] for i in layout.order]).astype(np.int32, copy=False)
    n_targets = count_targets(labels, layout.lens, layout.sample_starts)
    return PackedSet(tokens, labels, layout.seq_starts, layout.lens.astype(np.int32), layout.sample_starts, n_targets,
                     **layout.described(sample_method, sample_turn))


@dataclass
class Layout:
    """Where each sample goes: `order` lists input samples sequence by sequence, the rest is PackedSet's index."""

    order: np.ndarray
    lens: np.ndarray
    sample_starts: np.ndarray
    seq_starts: np.ndarray

    @classmethod
    def of(cls, lengths: np.ndarray, groups: list[list[int]]) -> Layout:
        order = np.array([i for g in groups for i in g], dtype=np.int64)
        lens = np.asarray(lengths, dtype=np.int64)[order]
        sample_starts = np.concatenate([[0], np.cumsum([len(g) for g in groups], dtype=np.int64)]).astype(np.int64)
        token_starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        return cls(order, lens, sample_starts, token_starts[sample_starts])

    def described(self, sample_method: Optional[np.ndarray], sample_turn: Optional[np.ndarray]) -> dict:
        return {name: np.asarray(values)[self.order] for name, values in
                (("sample_method", sample_method), ("sample_turn", sample_turn)) if values is not None}


def count_targets(labels: np.ndarray, lens: np.ndarray, sample_starts: np.ndarray) -> np.ndarray:
    """Per sequence, the positions the shifted loss trains: `labels` holds whole sequences, made of samples of
    `lens` (sequence k: samples sample_starts[k] - sample_starts[0] onwards). A sample's first label is never
    a target (nothing before it in its own sample predicts it)."""
    token_starts = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    is_target = labels != -100  # bool: no temporary the size of the data beyond it
    is_target[token_starts[:-1][lens > 0]] = False
    seq_starts = token_starts[sample_starts - sample_starts[0]]
    filled = seq_starts[1:] > seq_starts[:-1]
    out = np.zeros(len(filled), np.int64)
    if filled.any():
        out[filled] = np.add.reduceat(is_target, seq_starts[:-1][filled], dtype=np.int64)
    return out


def write_packed(directory: Path, lengths: np.ndarray, groups: list[list[int]],
                 read: Callable[[np.ndarray, np.ndarray, np.ndarray], None], sample_method: Optional[np.ndarray] = None,
                 sample_turn: Optional[np.ndarray] = None, chunk_tokens: int = 1 << 22) -> tuple[PackedSet, int]:
    """build_packed's set written to `directory` a chunk of sequences at a time, and its largest token id.

    read(samples, ids, labels) fills the int32 arrays with the given input samples' ids and labels, one after
    another. So memory holds one chunk (`chunk_tokens`, 32 MiB of ids and labels by default) and a few numbers per
    sample, not the dataset: packing a billion tokens this way needs what packing a million did.
    """
    layout = Layout.of(lengths, groups)
    directory.mkdir(parents=True, exist_ok=True)
    total = int(layout.seq_starts[-1])
    outputs = [_NpyAppender(directory / f"{name}.npy", total) for name in ("tokens", "labels")]
    n_targets, largest = np.zeros(len(groups), np.int64), -1
    seq = 0
    while seq < len(groups):
        end = max(seq + 1, int(np.searchsorted(layout.seq_starts, layout.seq_starts[seq] + chunk_tokens, "right")) - 1)
        end = min(end, len(groups))
        first, last = layout.sample_starts[seq], layout.sample_starts[end]
        size = int(layout.seq_starts[end] - layout.seq_starts[seq])
        ids, labels = np.empty(size, np.int32), np.empty(size, np.int32)
        read(layout.order[first:last], ids, labels)
        n_targets[seq:end] = count_targets(labels, layout.lens[first:last], layout.sample_starts[seq:end + 1])
        largest = max(largest, int(ids.max(initial=-1)))
        for out, values in zip(outputs, (ids, labels)):
            out.write(values)
        seq = end
    for out in outputs:
        out.close()
    arrays = {"seq_starts": layout.seq_starts, "sample_lens": layout.lens.astype(np.int32),
              "sample_starts": layout.sample_starts, "n_targets": n_targets,
              **layout.described(sample_method, sample_turn)}
    for name, values in arrays.items():
        np.save(directory / f"{name}.npy", values)
    return PackedSet.load(directory), largest


class _NpyAppender:
    """An int32 .npy file of known length, written front to back (numpy writes the header)."""

    def __init__(self, path: Path, length: int) -> None:
        header = np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=(length,))
        del header
        self._fh = open(path, "r+b")
        self._fh.seek(path.stat().st_size - 4 * length)

    def write(self, values: np.ndarray) -> None:
        self._fh.write(values.tobytes())

    def close(self) -> None:
        self._fh.close()


def packing_stats(packed: PackedSet, seq_len: int) -> dict:
    """Padding the packed set will carry: the share of every computed position that is a real token."""
    real = int(packed.seq_starts[-1])
    total = len(packed) * seq_len
    return {"sequences": len(packed), "tokens": real, "trained_tokens": int(packed.n_targets.sum()),
            "pad_tokens": total - real, "packing_efficiency": round(real / total, 6) if total else 0.0}


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
