"""Preprocessed data lives in a cache keyed by everything that changes its content.

Every rank of every node may ask for the same key at once; `trainer.build_once` makes one of them
build it while the others wait. On a shared filesystem that means one builder for the whole job; with
node-local cache directories, one per node.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

PREP_VERSION = 3  # bump when the preprocessing code changes what it produces


def default_cache_root() -> Path:
    return Path(os.environ.get("SHARDTUNE_CACHE", Path.home() / ".cache" / "shardtune" / "data"))


def cache_root(cache_dir: str | None) -> Path:
    """Where a run's data cache lives: data.cache_dir, else the default."""
    return Path(cache_dir) if cache_dir else default_cache_root()


def cache_key(parts: dict) -> str:
    """A short stable hash of the preprocessing inputs (JSON-serialisable)."""
    blob = json.dumps({"version": PREP_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]
