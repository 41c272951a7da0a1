"""Pack samples into fixed-length sequences and store them as flat memory-mapped arrays.

Best-fit decreasing fills sequences to ~99% on instruction data, so almost no compute goes to
padding. The packed set is stored as flat numpy arrays with offsets: random access to any sequence
is O(1) and costs no deserialization, which keeps the training step free of Python data work.
"""
from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np


def best_fit_decreasing(lengths: list[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Groups of sample indices whose lengths sum to at most capacity; deterministic for equal input."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin id), sorted
    for i in order:
        need = int(lengths[i])
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
    order = [i for g in groups for i in g]
    lens = np.array([len(samples_ids[i]) for i in order], dtype=np.int64)
    if not order:
        empty = np.zeros(0, np.int32)
        return PackedSet(empty, empty.copy(), np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(1, np.int64),
                         np.zeros(0, np.int64))
    # No temporaries the size of the data beyond the outputs: a dataset's tokens are all in memory here.
    tokens = np.concatenate([samples_ids[i] for i in order]).astype(np.int32, copy=False)
    labels = np.concatenate([samples_labels[i] for i in order]).astype(np.int32, copy=False)
    group_sizes = np.array([len(g) for g in groups], dtype=np.int64)
    sample_starts = np.concatenate([[0], np.cumsum(group_sizes)])
    token_starts = np.concatenate([[0], np.cumsum(lens)])
    seq_starts = token_starts[sample_starts]
    # A sample's first label is never a target (nothing before it in its own sample predicts it).
    is_target = labels != -100
    is_target[token_starts[:-1][lens > 0]] = False
    n_targets = np.add.reduceat(is_target, seq_starts[:-1], dtype=np.int64)
    described = {name: np.asarray(values)[order] for name, values in
                 (("sample_method", sample_method), ("sample_turn", sample_turn)) if values is not None}
    return PackedSet(tokens, labels, seq_starts.astype(np.int64), lens.astype(np.int32), sample_starts.astype(np.int64),
                     n_targets.astype(np.int64), **described)


def packing_stats(packed: PackedSet, seq_len: int) -> dict:
    """Padding the packed set will carry: the share of every computed position that is a real token."""
    real = int(packed.seq_starts[-1])
    total = len(packed) * seq_len
    return {"sequences": len(packed), "tokens": real, "trained_tokens": int(packed.n_targets.sum()),
            "pad_tokens": total - real, "packing_efficiency": round(real / total, 6) if total else 0.0}


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
