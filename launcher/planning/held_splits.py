"""Which files of a hub dataset's split the Hugging Face cache holds, and whether they are the whole split.

A run with `max_rows` reads only a source's first rows, so `launch` fetches a hub split's files in the order datasets
reads them and stops once they hold that many rows: a smoke test of a thousand rows of a multi-terabyte corpus used to
download all of it, or be refused for want of room. The snapshot then holds a prefix of the split, and nothing in it
says so: datasets, pointed at it, reads the prefix as if it were the split, and a later run without the limit (on a
node, or launched where the hub cannot be reached) would train on part of the data without knowing. So every fetch
records in the snapshot each split's files, all of them in reading order, and the rows its prefix holds;
readers compare that with the files present.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

RECORD = ".shardtune-splits.json"
"""In the snapshot directory; a hidden name, so datasets never takes it for a data file."""


@dataclass(frozen=True)
class HeldSplit:
    files: list[str]
    """Every file of the split at the snapshot's commit, relative to it, in the order datasets reads them."""
    present: list[str]
    """Those the snapshot holds: a prefix of `files`."""
    rows: Optional[int]
    """Rows the held prefix holds, counted when it was fetched for a row limit; None for the whole split."""

    @property
    def whole(self) -> bool:
        return len(self.present) == len(self.files)

    def describe(self) -> str:
        """What the cache holds, for messages: 'the first 2 of its 5 files (1,000 rows)'."""
        rows = f" ({self.rows:,} rows)" if self.rows is not None else ""
        return f"the first {len(self.present)} of its {len(self.files)} files{rows}"


def _key(config_name: str, split: str) -> str:
    return f"{config_name}/{split}"


def record_split(directory: Path, config_name: str, split: str, files: list[str], rows: Optional[int]) -> None:
    """Record a split's files and, for a prefix fetched for a row limit, the rows it holds (None: all fetched).
    Written whole under a temporary name and renamed, so a reader never sees half a record."""
    path = directory / RECORD
    held = json.loads(path.read_text()) if path.is_file() else {}
    held[_key(config_name, split)] = {"files": files, "rows": rows}
    partial = path.with_name(f"{RECORD}.{os.getpid()}")
    partial.write_text(json.dumps(held, indent=1))
    os.replace(partial, path)


def held_split(directory: Path, config_name: str, split: str) -> Optional[HeldSplit]:
    """The split as the snapshot holds it, or None when no fetch recorded it (a snapshot fetched whole by an earlier
    version of shardtune, or by hand: read as it is)."""
    path = directory / RECORD
    entry = json.loads(path.read_text()).get(_key(config_name, split)) if path.is_file() else None
    if entry is None:
        return None
    files = entry["files"]
    present = []
    for name in files:  # a prefix: the files are fetched in order
        if not (directory / name).is_file():
            break
        present.append(name)
    return HeldSplit(files, present, None if len(present) == len(files) else entry["rows"])
