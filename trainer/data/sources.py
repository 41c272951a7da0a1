"""Read rows from local files (jsonl, json arrays, parquet, csv; globs and directories) or the hub.

Every row keeps where it came from (`file:line`), because a bad row in a million-row file must be
findable. Rows are passed on as JSON text and parsed later, in parallel, so a line that is not valid
JSON is reported like any other bad row instead of crashing the reader.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from launcher.contract.errors import UserError
from launcher.planning.held_splits import held_split
from launcher.planning.hub_snapshot import config_name, dataset_snapshot, subset_files

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class RawRow:
    where: str
    """file:line (or file:row N for parquet, dataset:split:index for the hub)."""
    text: str
    """The row as JSON text (possibly invalid)."""
    error: str = ""
    """Set when the reader already knows the row is unreadable (e.g. a broken JSON array)."""


class SourceError(UserError):
    """A data path that names nothing readable."""


def resolve_files(path: str) -> list[Path]:
    """Local files a data path names, sorted for a stable order; [] when it is not local (a hub id)."""
    p = Path(path)
    if p.is_dir():
        files = [f for f in sorted(p.rglob("*")) if f.suffix in SUFFIXES and f.is_file()]
        if not files:
            raise SourceError(f"{path}: directory has no {'/'.join(SUFFIXES)} files")
        return files
    if any(ch in path for ch in "*?["):
        files = [Path(f) for f in sorted(glob.glob(path, recursive=True)) if Path(f).suffix in SUFFIXES]
        if not files:
            raise SourceError(f"{path}: the glob matches no {'/'.join(SUFFIXES)} files")
        return files
    if p.is_file():
        if p.suffix not in SUFFIXES:
            raise SourceError(f"{path}: unsupported file type {p.suffix!r}; use {', '.join(SUFFIXES)}")
        return [p]
    if path.endswith(SUFFIXES) or path.startswith(("/", ".", "~")):
        raise SourceError(f"{path}: no such file")
    return []


def _json_array_items(path: Path, chunk: int = 1 << 20) -> Iterator[RawRow]:
    """Items of a top-level JSON array with the line each starts on, read a chunk of text at a time: a JSON
    array of many GB is a common export, and read whole it would be in memory as text, then as rows."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as fh:
        text, pos, eof = "", 0, False
        first_line, first_column = 1, 0  # where text[0] is in the file, for the line of a syntax error
        line = 1  # of text[pos]
        opened = False
        while True:
            while pos < len(text) and text[pos] in " \t\r\n" + ("," if opened else ""):
                line += text[pos] == "\n"
                pos += 1
            if pos == len(text) and not eof:
                pass  # more text below
            elif not opened:
                if text[pos:pos + 1] != "[":
                    yield RawRow(f"{path}:1", "", "invalid_json: a .json file must hold a top-level array "
                                                  "(use .jsonl for one object per line)")
                    return
                opened, pos = True, pos + 1
                continue
            elif pos >= len(text) or text[pos] == "]":
                return
            else:
                try:
                    obj, end = decoder.raw_decode(text, pos)
                except json.JSONDecodeError as exc:
                    if eof:  # nothing after a syntax error can be trusted: the rest of the file is one bad row
                        column = exc.colno + (first_column if exc.lineno == 1 else 0)
                        yield RawRow(f"{path}:{first_line + exc.lineno - 1}", "", f"invalid_json: {exc.msg} at "
                                     f"column {column} (the rest of this .json array is not read)")
                        return
                    end = len(text)  # an item cut by the chunk's end: read on
                if end < len(text) or eof:  # a number at the chunk's end may go on
                    yield RawRow(f"{path}:{line}", json.dumps(obj, ensure_ascii=False))
                    line += text.count("\n", pos, end)
                    pos = end
                    continue
            newline = text.rfind("\n", 0, pos)
            first_line += text.count("\n", 0, pos)
            first_column = pos - newline - 1 if newline >= 0 else first_column + pos
            more = fh.read(max(chunk, len(text) - pos))  # an item longer than a chunk: twice as much each time
            text, pos, eof = text[pos:] + more, 0, not more


def _jsonl_rows(path: Path) -> Iterator[RawRow]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                yield RawRow(f"{path}:{number}", line.rstrip("\r\n"))


def _csv_rows(path: Path) -> Iterator[RawRow]:
    with open(path, encoding="utf-8-sig", newline="") as fh:  # -sig: spreadsheet exports start with a BOM
        reader = csv.DictReader(fh)
        start = 2
        for row in reader:
            yield RawRow(f"{path}:{start}", json.dumps(row, ensure_ascii=False))
            start = reader.line_num + 1


def _parquet_rows(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for row in batch.to_pylist():
            yield RawRow(f"{path}:row {index}", json.dumps(row, ensure_ascii=False, default=str))
            index += 1


def _hub_rows(name: str, split: str, revision: str | None, subset: str | None) -> Iterator[RawRow]:
    """A hub dataset's rows: from its commit's files in the Hugging Face cache, which `launch` and `prepare`
    download (nodes often have no network), else from the hub. The files are streamed: read into a Dataset,
    datasets first wrote an Arrow copy of every row into HF_HOME/datasets on each host that read them (the
    login node for `prepare`, rank 0's node for a job), uncompressed, so often larger than the parquet files
    themselves, and counted by no free-space check; the rows are read once, in file order, either way. A split
    fetched only in part, for a row limit (held_splits), is read from the files it has, and a read past them
    fails rather than ending as if the split had ended."""
    import datasets

    snapshot = dataset_snapshot(name, revision)
    held = held_split(snapshot, config_name(snapshot, subset), split) if snapshot is not None else None
    index = 0
    try:  # streamed: a file's problem shows while its rows are read
        if held is not None and not held.whole:  # the files a row limit fetched, named: the others are absent
            ds = datasets.load_dataset(str(snapshot), subset, split=split, streaming=True,
                                       data_files={split: held.present})
        elif snapshot is not None:
            ds = datasets.load_dataset(str(snapshot), subset, split=split, streaming=True,
                                       **subset_files(snapshot, subset, split))
        else:
            ds = datasets.load_dataset(name, subset, split=split, revision=revision)
        for index, row in enumerate(ds, 1):
            yield RawRow(f"{name}:{split}:{index - 1}", json.dumps(row, ensure_ascii=False, default=str))
    except (ConnectionError, FileNotFoundError, ValueError) as exc:
        where = f"its files in {snapshot}" if snapshot else f"it from the hub ({exc.__class__.__name__})"
        raise UserError(f"hub dataset {name}{f' subset {subset}' if subset else ''} at {revision or 'main'}, split "
                        f"{split}: cannot read {where} on "
                        f"{socket.gethostname()}: {str(exc).splitlines()[0] if str(exc) else exc!r}. `shardtune "
                        f"launch` and `shardtune prepare`, run where the hub can be reached, download it into the "
                        f"Hugging Face cache (HF_HOME), which every node must mount") from None
    if held is not None and not held.whole:  # asked for more rows than a row limit's fetch holds: not a short split
        raise UserError(f"hub dataset {name}{f' subset {subset}' if subset else ''} at {revision}, split {split}: "
                        f"the Hugging Face cache ({snapshot}) holds only {held.describe()}, fetched for a run that "
                        f"read fewer rows, and all {index:,} rows they hold were read on {socket.gethostname()}. "
                        f"`shardtune download` (or `shardtune launch`), run where the hub can be reached, fetches "
                        f"the rest")


READERS = {".jsonl": _jsonl_rows, ".json": _json_array_items, ".csv": _csv_rows, ".parquet": _parquet_rows}


def read_rows(path: str, split: str = "train", revision: str | None = None,
              subset: str | None = None) -> Iterator[RawRow]:
    """Every row a data path names, in a stable order (`split`, `revision`, `subset`: of a hub dataset)."""
    files = resolve_files(path)
    if not files:
        yield from _hub_rows(path, split, revision, subset)
        return
    for f in files:
        yield from READERS[f.suffix](f)


def source_extent(path: str) -> Optional[tuple[str, int]]:
    """How much a local data path holds, in a unit its rows can be measured in as they are read: ("bytes", n) for
    JSON Lines and JSON files (a row is its text), ("rows", n) for Parquet files (their footers count the rows).
    None for a hub id, CSV (its rows are re-encoded as JSON) or a mix of kinds."""
    files = resolve_files(path)
    if files and all(f.suffix in (".jsonl", ".json") for f in files):
        return "bytes", sum(f.stat().st_size for f in files)
    if files and all(f.suffix == ".parquet" for f in files):
        import pyarrow.parquet as pq

        return "rows", sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    return None


def fingerprint_files(path: str) -> list[tuple[str, int, int]]:
    """(file, size, mtime_ns) of every local file a data path names: part of the cache key."""
    out = []
    for f in resolve_files(path):
        st = os.stat(f)
        out.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
    return out
