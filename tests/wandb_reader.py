"""Read wandb offline runs (``run-<id>.wandb``) back into Python, without network or wandb-core.

Why: compute nodes log with ``WANDB_MODE=offline`` and wandb 0.31 has no Python reader for its log
(the Go ``wandb-core`` writes it), yet tests must check what the trainer logged. Format, per wandb's
``core/pkg/leveldb/record.go`` + ``core/internal/transactionlog/writer.go``: header ``:W&B`` + u16 LE
0xBEE1 + u8 version (0.31.0 writes 0) at the start of the first 32 KiB block; chunks never cross
blocks (a tail < 7 bytes is zero-padded); chunk header u32 crc, u16 len, u8 type (1 full, 2 first,
3 middle, 4 last), all LE; crc = IEEE ``zlib.crc32`` of type byte + payload (``CRCAlgoIEEE``).

Resume offline (measured, wandb 0.31.0): each ``wandb.init(id=X)``, with or without ``resume=``,
writes a NEW dir ``offline-run-<YYYYmmdd_HHMMSS>-X[-N]`` (``-N`` if that second is taken); its
RunRecord has ``resume=True`` if requested, ``resumed=False``, and ``_step`` restarts at 0 unless
``log(step=...)`` is used. So one logical run is several dirs: see :func:`read_history_for_id`.
wandb-core buffers the file (flush every ``x_transaction_log_flush_interval``, 15 s): a killed run
keeps only what was flushed, and ``finish()`` can return before the file is complete, so call
``wandb.teardown()`` (or let the process exit) before reading.
"""
from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK = 32 * 1024
_CHUNK = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_VERSIONS = {0}  # the only layout verified here; refuse others instead of misreading them
_DIR_RE = re.compile(r"offline-run-(\d{8}_\d{6})-(.+)")


class CorruptRunError(ValueError):
    """The .wandb file is not a valid (or complete) wandb transaction log."""


@dataclass
class OfflineRun:
    """What one offline run directory recorded. Keys of nested values are joined with ``.``."""

    path: Path
    run_id: str = ""
    project: str = ""
    name: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    resume_requested: bool = False  # RunRecord.resume: init() was given resume=...
    resumed: bool = False  # RunRecord.resumed: server-confirmed resume; always False offline
    starting_step: int = 0
    start_time: float = 0.0  # seconds since epoch, from the RunRecord
    exit_code: int | None = None  # None: no exit record (killed before finish(), data may be lost)


def _payloads(data: bytes, path: Path) -> Iterator[bytes]:
    """Yield each record's bytes, checking every chunk, so silent corruption cannot pass a test."""
    if len(data) < 7 or data[:4] != b":W&B":
        raise CorruptRunError(f"{path}: not a wandb log (bad header {data[:7]!r})")
    magic, version = struct.unpack_from("<HB", data, 4)
    if magic != 0xBEE1 or version not in _VERSIONS:
        raise CorruptRunError(f"{path}: unsupported magic {magic:#x} / version {version}")
    pos, parts = 7, None
    while pos < len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK.size or (parts is None and data[pos:pos + 7] == bytes(7)):
            if data[pos:pos + left].strip(b"\0"):  # writer zero-pads short block tails
                raise CorruptRunError(f"{path}: non-zero block padding at offset {pos}")
            pos += left
            continue
        if pos + _CHUNK.size > len(data):
            raise CorruptRunError(f"{path}: truncated chunk header at offset {pos}")
        crc, length, kind = _CHUNK.unpack_from(data, pos)
        end = pos + _CHUNK.size + length
        if length > left - _CHUNK.size or end > len(data):
            raise CorruptRunError(f"{path}: chunk at offset {pos} overruns its block or the file")
        payload = data[pos + _CHUNK.size:end]
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            raise CorruptRunError(f"{path}: CRC mismatch in chunk at offset {pos}")
        if kind not in (_FULL, _FIRST, _MIDDLE, _LAST) or (kind in (_FULL, _FIRST)) != (parts is None):
            raise CorruptRunError(f"{path}: unexpected chunk type {kind} at offset {pos}")
        parts = [] if kind in (_FULL, _FIRST) else parts
        parts.append(payload)
        if kind in (_FULL, _LAST):
            yield b"".join(parts)
            parts = None
        pos = end
    if parts is not None:
        raise CorruptRunError(f"{path}: file ends inside a multi-chunk record")


def iter_records(path: str | Path) -> Iterator[pb.Record]:
    """Yield every protobuf Record of one .wandb file, in write order."""
    path = Path(path)
    yield from (pb.Record.FromString(raw) for raw in _payloads(path.read_bytes(), path))


def _value(item: Any) -> Any:
    """Decode ``value_json``; history items may instead use the typed ``value`` oneof."""
    if item.value_json:
        return json.loads(item.value_json)
    kind = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if kind == "json":
        return json.loads(item.json)
    return None if kind in (None, "none") else getattr(item, kind)


def _key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


def _apply(target: dict[str, Any], rec: Any) -> None:
    """Apply a Config/SummaryRecord: both are incremental updates plus removals."""
    for item in rec.update:
        target[_key(item)] = _value(item)
    for item in rec.remove:
        target.pop(_key(item), None)


def _wandb_file(run_dir_or_file: str | Path) -> Path:
    p = Path(run_dir_or_file)
    files = [p] if p.is_file() else sorted(p.glob("run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"{p}: expected exactly one run-*.wandb file, found {len(files)}")
    return files[0]


def read_run(run_dir_or_file: str | Path) -> OfflineRun:
    """Parse an offline run dir or its .wandb file into an :class:`OfflineRun`."""
    path = _wandb_file(run_dir_or_file)
    run = OfflineRun(path=path, run_id=path.stem[len("run-"):])  # filename id: set even if killed
    for rec in iter_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run.run_id, run.project, run.name = r.run_id, r.project, r.display_name
            run.resume_requested, run.resumed, run.starting_step = r.resume, r.resumed, r.starting_step
            run.start_time = r.start_time.seconds + r.start_time.nanos / 1e9
            _apply(run.config, r.config)
            _apply(run.summary, r.summary)
        elif kind == "config":
            _apply(run.config, rec.config)
        elif kind == "summary":
            _apply(run.summary, rec.summary)
        elif kind == "history":
            run.history.append({_key(i): _value(i) for i in rec.history.item})
        elif kind == "exit":
            run.exit_code = rec.exit.exit_code
    run.config.pop("_wandb", None)  # wandb's internal bookkeeping, not a user config value
    return run


def find_runs(wandb_dir: str | Path) -> list[Path]:
    """All offline run dirs in ``wandb_dir`` (the ``wandb/`` dir or the WANDB_DIR above it)."""
    d = Path(wandb_dir)
    if d.name != "wandb" and (d / "wandb").is_dir():
        d = d / "wandb"
    return sorted(p for p in d.glob("offline-run-*") if p.is_dir() and not p.is_symlink()
                  and _DIR_RE.fullmatch(p.name))


def runs_for_id(wandb_dir: str | Path, run_id: str) -> list[OfflineRun]:
    """Every segment (one per init, i.e. per restart) of run ``run_id``, oldest first.

    Ordered by the second in the dir name, then wandb's same-second suffix ``-N``.
    """
    def order(d: Path) -> tuple[str, int]:
        stamp, rest = _DIR_RE.fullmatch(d.name).groups()  # type: ignore[union-attr]
        suffix = rest[len(run_id) + 1:]
        return stamp, int(suffix) if suffix.isdigit() else 0

    dirs = [d for d in find_runs(wandb_dir) if (d / f"run-{run_id}.wandb").is_file()]
    return [read_run(d) for d in sorted(dirs, key=order)]


def read_history_for_id(wandb_dir: str | Path, run_id: str) -> list[dict[str, Any]]:
    """All history rows of ``run_id`` across restarts, concatenated in creation order.

    ``_step`` restarts at 0 in each segment unless the trainer logged with ``step=``.
    """
    return [row for run in runs_for_id(wandb_dir, run_id) for row in run.history]
