"""DeepSpeed's checkpoint engine, replaced: every shard DeepSpeed writes goes through `write_hashed`.

Installed after `deepspeed.initialize` (`engine.checkpoint_engine = ShardWriter(engine._config, ...)`; DeepSpeed
0.19 looks the attribute up at every save and load). In the background mode (`train.async_save`) `save()`
first takes a snapshot of the state it is given (the only part training waits for), then a writer thread
serializes and writes it while training continues. DeepSpeed's own decoupled engine was not used: it works
only at ZeRO-3, takes no snapshot (later in-place updates of the weights end up in the file), switches the
whole process to the spawn start method, and drops saves silently when its writer dies (measured with 0.19.8).
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from trainer.checkpoint_io import (
    HashingWriter,
    Manifests,
    Progress,
    VerificationError,
    snapshot,
    write_hashed,
)
from trainer.mapped_loads import MappedLoads


class ShardWriter(TorchCheckpointEngine):
    """DeepSpeed's checkpoint engine, writing through write_hashed on a writer thread.

    Writes always happen on the thread, so `engine.save_checkpoint` returns (and passes DeepSpeed's own
    barrier) at once, and the ranks then wait for each other through PeerProgress, which tells a slow write
    from a stuck one. `snapshot_first` (train.async_save) copies each state before queueing it, so training
    may go on while it is written; without it, the caller waits (`wait()`) before the next step.
    `written` maps every path this rank wrote (DeepSpeed's shards and our own files) to (size, sha256).
    Errors of a write surface in `wait()`.
    """

    def __init__(self, config_params=None, snapshot_first: bool = False):
        super().__init__(config_params)
        self.name = "ShardWriter"
        self.snapshot_first = snapshot_first
        self._snapshots: dict[str, list[torch.Tensor]] = {}
        """Host buffers of each file's last snapshot (by file name, the same at every step), reused by the next."""
        self.written: dict[str, tuple[int, str]] = {}
        self.progress: Optional[Progress] = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardtune-ckpt")
        self._futures: list[Future] = []
        self.manifests: Optional[Manifests] = None
        """The manifests of the checkpoint being loaded (set by the resume)."""
        self.mapped = MappedLoads()

    def begin(self, progress: Optional[Progress] = None, snapshot_first: Optional[bool] = None) -> None:
        """A new checkpoint: forget what the previous one wrote. snapshot_first: copy states before queueing
        them (saves training goes on from); a save the caller waits for needs no copy."""
        self.wait()
        self.written, self.progress, self._futures = {}, progress, []
        if snapshot_first is not None:
            self.snapshot_first = snapshot_first

    def save(self, state_dict, path: str) -> None:
        if self.snapshot_first:
            name = Path(path).name
            state, self._snapshots[name] = snapshot(state_dict, self._snapshots.get(name))
        else:
            state = state_dict
        self._futures.append(self._pool.submit(self._write, state, path))

    def snapshot_bytes(self) -> int:
        """Host memory this rank's snapshot buffers hold (kept between saves, so for the whole run)."""
        return sum(t.nbytes for buffers in self._snapshots.values() for t in buffers)

    def write_file(self, path: Path, write: Callable[[HashingWriter], None]) -> None:
        """One of our own files (RNG state, counters, model metadata), queued like DeepSpeed's shards."""
        self._futures.append(self._pool.submit(self._record, path, write))

    def _record(self, path: Path, write: Callable[[HashingWriter], None]) -> None:
        self.written[str(path)] = write_hashed(path, write, self.progress)

    def _write(self, state: Any, path: str) -> None:
        def serialize(writer: HashingWriter) -> None:
            torch.save(state, writer, _use_new_zipfile_serialization=self.zipfile_serialization)

        self.written[path] = write_hashed(Path(path), serialize, self.progress)

    def done(self) -> bool:
        """Every write handed to the background has finished (successfully or not)."""
        return all(f.done() for f in self._futures)

    def wait(self) -> None:
        """Block until every pending write is durable; re-raise the first failure."""
        futures, self._futures = self._futures, []
        for f in futures:
            f.result()

    def load(self, path: str, map_location=None):
        """DeepSpeed's reads: each file checked against the manifest and parsed with weights_only (a crafted pickle
        is refused, naming the file and the type it wanted), its tensors mapped from the file, not read into
        memory (checkpoint_io.load_verified; `mapped.take_states` copies out what the optimizer keeps)."""
        if self.manifests is None:
            raise VerificationError(f"{path}: loaded before its checkpoint's manifest was registered")
        return self.mapped.add(self.manifests.load(Path(path), map_location))

    def commit(self, info) -> bool:
        return True  # the checkpoint's commit (manifest, pointers) is shardtune's, after every rank is durable

    def close(self) -> None:
        self._pool.shutdown(wait=True)
