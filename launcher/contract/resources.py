"""Where the data files shipped with shardtune (DeepSpeed and SLURM templates) live.

In a source checkout or editable install they sit next to the packages; a wheel install puts them
under `<prefix>/share/shardtune/`.
"""
from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]


def data_dir(name: str) -> Path:
    """The directory of shipped data files called `name` (`ds_configs` or `slurm`)."""
    for base in (_REPO, Path(sys.prefix) / "share" / "shardtune"):
        candidate = base / name
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"shardtune data directory {name!r} not found next to {_REPO} "
                            f"or under {sys.prefix}/share/shardtune")


def repo_root() -> Path:
    return _REPO
