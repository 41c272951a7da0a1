"""A Hugging Face model's weights written one tensor at a time: sharded safetensors, as save_pretrained lays them out.

`save_pretrained` needs the whole state dict in memory (and safetensors' `save_file` serializes a whole shard
into one buffer first). Here the names, shapes and dtypes are planned up front, so every shard's header is
known before its first byte is written, and each tensor goes to disk as it arrives: peak memory is one
tensor, whatever the model's size. Files: `model.safetensors`, or `model-0000i-of-0000n.safetensors` plus
`model.safetensors.index.json` (weight map and total size) when the model needs more than one shard. A tensor
larger than the shard size gets a shard of its own, as in transformers.
"""
from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_size(size: int | str) -> int:
    """'5GB' = 5e9 bytes, '500MiB' = 500·2^20, as transformers and DeepSpeed read shard sizes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", size.upper())
    if not match:
        raise ValueError(f"{size!r} is not a size such as 5GB, 200MB or 500MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(entries: list[Entry], max_shard_size: int) -> list[list[Entry]]:
    """Consecutive entries per shard, each shard at most max_shard_size unless one tensor alone is larger."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards if shards[0] else []


def _header(entries: list[Entry], metadata: dict[str, str]) -> bytes:
    table: dict = {"__metadata__": metadata}
    offset = 0
    for e in entries:
        table[e.name] = {"dtype": SAFETENSORS_DTYPES[e.dtype], "shape": list(e.shape),
                         "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(table, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


class ShardedSafetensorsWriter:
    """Write planned tensors in order; `close()` finishes the last shard and writes the index."""

    def __init__(self, out_dir: Path, entries: list[Entry], max_shard_size: int | str,
                 progress: Optional[Callable[[int], None]] = None):
        self.out_dir = Path(out_dir)
        names = [e.name for e in entries]
        if len(set(names)) != len(names):  # a safetensors header keeps the last of them: the file would be corrupt
            raise ValueError(f"tensor names planned twice: {sorted({n for n in names if names.count(n) > 1})[:5]}")
        self.shards = plan_shards(entries, parse_size(max_shard_size))
        n = len(self.shards)
        self.files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.order = [(i, e) for i, shard in enumerate(self.shards) for e in shard]
        self.progress = progress
        self._next = 0
        self._shard = -1
        self._fh = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, entry = self.order[self._next]
        if name != entry.name or tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise ValueError(f"expected {entry} next, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        if shard != self._shard:
            self._finish_shard()
            self._shard = shard
            self._fh = open(self.out_dir / self.files[shard], "wb")
            self._fh.write(_header(self.shards[shard], {"format": "pt"}))
        data = tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy()
        self._fh.write(memoryview(data))
        self._next += 1
        if self.progress is not None:
            self.progress(entry.nbytes)

    def _finish_shard(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def abandon(self) -> None:
        """Close the open shard without finishing it: the build failed and its directory goes."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def close(self) -> list[Path]:
        """The files written; every planned tensor must have been written."""
        if self._next != len(self.order):
            missing = [e.name for _, e in self.order[self._next:self._next + 5]]
            raise ValueError(f"{len(self.order) - self._next} planned tensors were never written, e.g. {missing}")
        self._finish_shard()
        if len(self.files) > 1:
            weight_map = {e.name: self.files[i] for i, e in self.order}
            index = {"metadata": {"total_size": sum(e.nbytes for _, e in self.order),
                                  "total_parameters": sum(e.nbytes // e.dtype.itemsize for _, e in self.order)},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return [self.out_dir / f for f in self.files]
