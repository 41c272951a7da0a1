"""How checkpoint bytes reach the disk: hashed as they are written, durable before they count.

`write_hashed` serializes into a writer that feeds a sha256 as the bytes pass, to a temporary name, fsyncs
and renames: the manifest is built from those digests, so a save never reads back what it wrote (which
doubled its I/O on the shared filesystem every node writes to at once). `snapshot` copies a state that
training would otherwise change while it is written in the background. Torch only (no DeepSpeed), so the
offline tools use it too.
"""
from __future__ import annotations

import copy
import hashlib
import io
import os
import pickle
import re
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch

from launcher.contract.errors import UserError
from trainer.mapped_loads import MappedLoads, universal_states_in_place

Progress = Callable[[int], None]
"""Called with the number of bytes just written: heartbeats and fault injection hang off it."""

REPORT_EVERY = 1 << 20  # progress is reported every MB written: cheap, and fine-grained for the watchdog


class HashingWriter(io.RawIOBase):
    """A write-only file object that hashes and counts every byte on its way to the real file."""

    def __init__(self, fh, progress: Optional[Progress] = None):
        self._fh = fh
        self._progress = progress
        self.sha = hashlib.sha256()
        self.nbytes = 0
        self._unreported = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        written = self._fh.write(view)
        self.nbytes += view.nbytes
        self._unreported += view.nbytes
        if self._progress is not None and self._unreported >= REPORT_EVERY:
            self._progress(self._unreported)
            self._unreported = 0
        return written

    def flush(self) -> None:
        self._fh.flush()

    def report(self) -> None:
        """Report the bytes written since the last report (the end of a file is progress too)."""
        if self._progress is not None and self._unreported:
            self._progress(self._unreported)
        self._unreported = 0


def write_hashed(path: Path, write: Callable[[HashingWriter], None], progress: Optional[Progress] = None
                 ) -> tuple[int, str]:
    """Write a file through `write(writer)`: temporary name, fsync, rename. Returns (size, sha256) of its bytes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as fh:
            writer = HashingWriter(fh, progress)
            write(writer)
            fh.flush()
            os.fsync(fh.fileno())
            writer.report()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return writer.nbytes, writer.sha.hexdigest()


def copy_hashed(src: Path, dst: Path, progress: Optional[Progress] = None) -> tuple[int, str]:
    """Copy a file into a checkpoint, hashing the bytes as they are written there."""
    def write(writer: HashingWriter) -> None:
        with open(src, "rb") as fh:
            for block in iter(lambda: fh.read(8 << 20), b""):
                writer.write(block)

    return write_hashed(dst, write, progress)


def snapshot(obj: Any, reuse: Optional[list[torch.Tensor]] = None) -> tuple[Any, list[torch.Tensor]]:
    """A copy of a state (dicts, lists, tensors, small objects) that later training steps cannot change, and the
    host tensors it copied into.

    `reuse`: the tensors of the previous snapshot of the same file (no longer being written): copying into
    them skips the allocation, and the page faults of first touching fresh memory cost more than the copy
    itself (measured on CPU: about 2 s of a 2.9 s snapshot of a 1.6 GB shard). Accelerator copies are issued
    asynchronously and waited for once.

    A tensor the state holds twice (tied input and output embeddings are one parameter under two names) is
    copied once and stays one tensor in the copy, as torch.save would store it from the live state: copied
    twice it would cost its bytes twice in host memory and in the file.
    """
    from deepspeed.accelerator import get_accelerator

    copied_from_device = False
    buffers: list[torch.Tensor] = []
    previous = list(reuse or [])
    copies: dict[tuple, torch.Tensor] = {}

    def host_copy(x: torch.Tensor) -> torch.Tensor:
        nonlocal copied_from_device
        same = (x.device, x.untyped_storage().data_ptr(), x.storage_offset(), x.dtype, x.shape, x.stride())
        if x.numel() and same in copies:
            return copies[same]
        i = len(buffers)
        old = previous[i] if i < len(previous) else None
        if old is not None and old.shape == x.shape and old.dtype == x.dtype:
            out = old
        else:
            out = torch.empty(x.shape, dtype=x.dtype, device="cpu")
            if x.device.type != "cpu":  # page-locked on any accelerator, so the copy below can be asynchronous
                out = get_accelerator().pin_memory(out)
        copied_from_device |= x.device.type != "cpu"
        out.copy_(x.detach(), non_blocking=x.device.type != "cpu")
        buffers.append(out)
        copies[same] = out
        return out

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return host_copy(x)
        if isinstance(x, dict):
            return type(x)((k, walk(v)) for k, v in x.items())
        if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
            return type(x)(walk(v) for v in x)
        return copy.deepcopy(x)

    out = walk(obj)
    if copied_from_device:
        get_accelerator().synchronize()
    return out, buffers


def deepspeed_allowlist() -> list[type]:
    """The only types outside torch's own weights_only set that DeepSpeed's checkpoints hold (0.19, stages 0-3,
    fp32/bf16, with and without offload; found by scanning every pickle's globals): optimizer shards keep
    the loss scaler, the ZeRO stage and, at stages 1-2, fragment addresses. fp16 (GPU only) pickles its dynamic
    loss scaler instead (zero/stage_1_and_2.py and stage3.py build it with CreateLossScaler)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


_ALLOWED = False


def allow_deepspeed_types() -> None:
    """Register the allowlist for this process (once; torch's safe_globals context would drop it on exit)."""
    global _ALLOWED
    if not _ALLOWED:
        torch.serialization.add_safe_globals(deepspeed_allowlist())
        _ALLOWED = True


_TORCH_LOAD = torch.load  # torch's own, also while guarded_loads routes every other caller through the manifests


def safe_load(source, mmap: bool = False, map_location="cpu"):
    """torch.load that runs no code: weights_only, with DeepSpeed's few types (deepspeed_allowlist) and nothing else."""
    allow_deepspeed_types()
    return _TORCH_LOAD(source, map_location=map_location, mmap=mmap, weights_only=True)


class VerificationError(UserError):
    """A checkpoint file does not match its manifest, is not listed in it, or holds types we refuse to load."""


def _listed(path: Path, expected: Optional[tuple[int, str]]) -> tuple[int, str]:
    if expected is None:
        raise VerificationError(f"{path}: not listed in its checkpoint's manifest; refusing to load it")
    return expected


def _differs(path: Path) -> VerificationError:
    return VerificationError(f"{path}: its bytes differ from the checkpoint's manifest (damaged or replaced after "
                             f"the checkpoint was committed); refusing to load it")


Identity = tuple[int, int, int, int]


def identity(st: os.stat_result) -> Identity:
    """What changes whenever a file's bytes may have: its inode (a file replaced by rename), its size, and its
    modification and change times. Nobody but the clock sets the change time, so even a write that puts the
    modification time back (touch -d, rsync -t) shows."""
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def read_verified(path: Path, expected: Optional[tuple[int, str]]) -> bytes:
    """A file's bytes, once, checked against (size, sha256): what is hashed is exactly what will be parsed."""
    size, sha = _listed(path, expected)
    data = Path(path).read_bytes()
    if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
        raise _differs(path)
    return data


def load_verified(path: Path, expected: Optional[tuple[int, str]], map_location="cpu", mmap: bool = False,
                  verified_as: Optional[Identity] = None):
    """A checkpoint file checked against (size, sha256) and deserialized without running code, holding it once.

    Reading the whole file into memory and parsing those bytes held it twice (the bytes and the tensors built
    from them): at ZeRO 0-2 every rank loads the whole model file, 2 x 16 GB per rank for an 8B model. The file
    is hashed as a stream through one open descriptor and loaded through that same descriptor (/proc/self/fd:
    the same file even if its path is replaced meanwhile); a change to its size or mtime while it was being
    read voids the load.

    `mmap`: the tensors are the file's pages, mapped privately (trainer.mapped_loads), not read into memory; the
    pickle, all that could run code, is parsed here as always. Their bytes are read when used, so what the hash
    vouches for is the file as it was: committed checkpoints are never written in place (a save writes a new
    directory and renames), and a file replaced by rename stays the one mapped. Files of torch's legacy format
    cannot be mapped and are read.

    `verified_as`: the file's identity when this job hashed it (checkpoint.verify). A file that is still that file
    is not read whole again just to hash it: a resume on another world size loads every file of the universal copy
    on every rank, a slice of each, and hashing them read the whole optimizer state per rank (840 GB at 70B).
    """
    size, sha = _listed(path, expected)
    with open(path, "rb") as fh:
        before = os.fstat(fh.fileno())
        unchanged = verified_as is not None and identity(before) == tuple(verified_as)
        if before.st_size != size or not (unchanged or hashlib.file_digest(fh, "sha256").hexdigest() == sha):
            raise _differs(path)
        same_file = f"/proc/self/fd/{fh.fileno()}"
        try:
            mapped = mmap and os.pread(fh.fileno(), 4, 0) == b"PK\x03\x04"  # torch.save's zip format (since 1.6)
            state = safe_load(same_file if os.path.exists(same_file) else path, mmap=mapped, map_location=map_location)
        except pickle.UnpicklingError as exc:
            raise refused(str(path), exc) from None
        after = os.fstat(fh.fileno())
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise VerificationError(f"{path}: changed while it was being loaded; refusing to use it")
    return state


def refused(where: str, exc: pickle.UnpicklingError) -> VerificationError:
    """The error for a pickle weights_only refused: the file and the type it wanted, not torch's advice to
    turn the protection off."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    wanted = found.group(1) if found else str(exc).split("\n")[-1][:200]
    return VerificationError(f"{where}: refused to load: it needs {wanted}, which is not among the tensors and the "
                             f"{len(deepspeed_allowlist())} DeepSpeed types a checkpoint holds (loading it could run "
                             f"code)")


class Manifests:
    """Expected (size, sha256) of every file of the checkpoint directories registered here, and the identity of
    each file this job has already hashed."""

    def __init__(self):
        self._dirs: dict[Path, dict[str, tuple[int, str]]] = {}
        self._verified: dict[Path, dict[str, Identity]] = {}

    def add(self, ckpt: Path, files: dict[str, dict], verified: Optional[dict[str, Identity]] = None) -> None:
        self._dirs[Path(ckpt).resolve()] = {rel: (meta["size"], meta["sha256"]) for rel, meta in files.items()}
        self._verified[Path(ckpt).resolve()] = dict(verified or {})

    def covering(self, path: Path) -> Optional[tuple[Path, dict]]:
        path = Path(path).resolve()
        for ckpt, files in self._dirs.items():
            if ckpt in path.parents:
                return ckpt, files
        return None

    def _entry(self, path: Path) -> Optional[tuple[Path, str]]:
        """(the registered checkpoint holding `path`, its name there)."""
        found = self.covering(path)
        return None if found is None else (found[0], str(Path(path).resolve().relative_to(found[0])))

    def expected(self, path: Path) -> Optional[tuple[int, str]]:
        entry = self._entry(path)
        return None if entry is None else self._dirs[entry[0]].get(entry[1])

    def load(self, path: Path, map_location=None):
        """A registered file's state, checked against its manifest and mapped (load_verified)."""
        entry = self._entry(path)
        expected, verified = (None, None) if entry is None else (self._dirs[entry[0]].get(entry[1]),
                                                                 self._verified[entry[0]].get(entry[1]))
        return load_verified(Path(path), expected, map_location, mmap=True, verified_as=verified)


@contextmanager
def engine_loads(manifests: Manifests, mapped: MappedLoads, optimizer: Any):
    """How a rank loads a checkpoint into its engine (Session.resume, and bench.resume_memory's shardtune reader):
    every file verified, code-free and mapped (guarded_loads), and on another world size at ZeRO-1/2 the
    optimizer's flat states filled in place (mapped_loads.universal_states_in_place)."""
    with guarded_loads(manifests, mapped), universal_states_in_place(optimizer):
        yield


@contextmanager
def guarded_loads(manifests: Manifests, mapped: Optional[MappedLoads] = None):
    """While loading a checkpoint: every torch.load in this process (DeepSpeed calls it directly on some paths,
    e.g. universal checkpoints and their conversion) reads a registered checkpoint's files verified, and nothing
    loads with weights_only=False.

    A registered file's tensors are mapped, not read (load_verified's mmap): a rank resuming on another world size
    touches only its own slice of each file, and a conversion worker's shard is page cache the kernel can reclaim
    instead of memory of its own. A private mapping never writes back to the file. `mapped` remembers them, so
    that `mapped.take_states` copies out what the optimizer keeps."""
    original = torch.load

    def load(f, map_location=None, *args, mmap=None, weights_only=None, **kwargs):
        if isinstance(f, (str, os.PathLike)) and manifests.covering(Path(f)) is not None:
            state = manifests.load(Path(f), map_location)
            return state if mapped is None else mapped.add(state)
        allow_deepspeed_types()
        return original(f, map_location, *args, mmap=mmap, weights_only=True, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original
