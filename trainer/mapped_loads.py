"""How a resumed rank reads its checkpoint without holding a second copy of it in host memory.

DeepSpeed's load_checkpoint reads each file whole into host memory before copying it into place: the module
file at stages 0-2 (on every rank of a node at once, p bytes per parameter each), then the rank's optimizer
partition (12 bytes per parameter of its share, beside the offloaded optimizer's buffers). torch's
Optimizer.load_state_dict keeps a loaded moment as it is when its device and dtype already match the
parameter's (the offloaded optimizer, and every CPU run), so the moments become the loaded tensors themselves.

Here the files are mapped instead (torch.load(mmap=True)): their pages are the kernel's page cache, shared by
the ranks of a node that read the same file and reclaimable under memory pressure, so nothing is held twice.
What the optimizer kept of a mapped file is then copied into memory of its own (`take_states`), in chunks
whose pages are handed back as they are copied (madvise(MADV_DONTNEED) on the private mapping: an untouched
page is read again from the file if it is ever needed), so even the resident set peaks at one chunk above the
state the run keeps. Were the moments left mapped, each write of a step would copy a page into private
memory anyway, and the file would stay open: a checkpoint `train.keep_last` deletes would hold its disk space
until the run ends.

A resume on another world size reads DeepSpeed's universal format, which DeepSpeed loads with torch.load
directly (checkpoint_io.guarded_loads routes those loads here too): one file per parameter and state, of which
a rank copies its own slice, and at ZeRO-3 the converter's optimizer_state.pt, which holds the saving world's
rank 0 optimizer shard whole (12 bytes per parameter of that rank's share) and which every rank loads for
its step count and hyperparameters. Mapped, a rank holds only the pages it touches, and those only until the
next file is loaded. At ZeRO-1/2 DeepSpeed then clones each parameter's slice of each moment into memory of
its own and, once every parameter is read, copies the clones into a new flat buffer per moment: the clones of
every parameter (8 bytes per parameter of the rank's share, on the host even on a GPU) and one buffer more
(4 bytes, on the device) above the state it keeps. `universal_states_in_place` copies each parameter's slice of
each mapped file into the moments' flat buffers instead: no clone, and only the pages of the file being read.
"""
from __future__ import annotations

import bisect
import ctypes
import mmap
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

COPY_CHUNK = 8 << 20
"""Bytes copied out of a mapped file before its pages are dropped: the resident set's excess while copying."""

_MADV_DONTNEED = 4  # linux/mman.h
_libc = ctypes.CDLL(None, use_errno=True)


def drop_pages(start: int, nbytes: int) -> None:
    """Hand back the whole pages of [start, start + nbytes) of a read-only private file mapping (no partial
    page: its other part may belong to a tensor still in use)."""
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (start + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > first:
        _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(end - first), _MADV_DONTNEED)


class MappedLoads:
    """The storages of the checkpoint files loaded mapped, held until what the optimizer kept of them is copied out.

    Holding them keeps each mapping in place, so dropping its pages can only ever touch the file's pages: an
    address range whose mapping was gone could by then hold other memory, which MADV_DONTNEED would zero.
    """

    def __init__(self):
        self._storages: dict[int, torch.UntypedStorage] = {}
        """Start address -> every storage handed to DeepSpeed from a mapped file."""
        self._undropped: list[int] = []
        """Start addresses of those whose pages have not been dropped yet (a universal checkpoint: thousands)."""

    def add(self, state: Any) -> Any:
        """Remember the storages of a newly loaded state (dicts, lists, tuples of tensors) and return it. The pages
        of the files loaded before it are dropped first: DeepSpeed has copied what it needed from them (the
        weights of the module file), and anything it reads again comes back from the file."""
        self._drop_pages()
        files = [(start, end) for start, end, _ in _file_maps()]
        for t in _tensors(state):
            storage = t.untyped_storage()
            start = storage.data_ptr()
            # A file's pages only: dropping those of memory a tensor owns would zero it.
            if start not in self._storages and _within(files, start, storage.nbytes()):
                self._storages[start] = storage
                self._undropped.append(start)
        return state

    def take_states(self, optimizer: Any) -> int:
        """Copy every optimizer state still backed by a mapped file into memory of its own; returns how many.

        `optimizer` is the engine's: DeepSpeed's wrappers are followed through `.optimizer` to each torch
        optimizer inside. The pages DeepSpeed read (the fp32 master it copied) are dropped first; each state is
        then copied a chunk at a time, dropping the chunk's pages behind it. The mappings go with the last
        reference to them. (Nothing DeepSpeed 0.19 does writes into a loaded tensor, whose private copy of a page
        a drop would discard; the save-time fingerprint, checked after this, would stop a run where one did.)
        """
        self._drop_pages()
        taken = 0
        for opt in _torch_optimizers(optimizer):
            for state in opt.state.values():
                for key, value in state.items():
                    if torch.is_tensor(value) and value.untyped_storage().data_ptr() in self._storages:
                        state[key] = _copied_out(value)
                        taken += 1
        self._storages.clear()
        self._undropped.clear()
        return taken

    def _drop_pages(self) -> None:
        for start in self._undropped:
            drop_pages(start, self._storages[start].nbytes())
        self._undropped.clear()


@contextmanager
def universal_states_in_place(optimizer: Any) -> Iterator[None]:
    """While the engine loads a universal checkpoint at ZeRO-1/2 (inside guarded_loads, which maps its files):
    each parameter's slice of every optimizer state goes from its mapped file straight into that state's flat
    buffer (allocated once, the size of the rank's fp32 partition), and DeepSpeed's regrouping
    (map_to_flat_opt_states), finding the states already flat, copies nothing.

    DeepSpeed's own load (deepspeed.checkpoint.universal_checkpoint.load_hp_checkpoint_state, then
    deepspeed.utils.tensor_fragment.map_to_flat_opt_states) clones every parameter's slices and holds them until
    all are read, then allocates each flat state beside them. Here nothing is cloned for a parameter saved whole
    (what shardtune saves). A parameter laid out otherwise (AutoTP, expert parallelism) goes through DeepSpeed's
    load, and then its regrouping, finding a state not flat, rebuilds them all as it always does. The states are
    the same bytes either way (tests/test_mapped_loads.py compares them with DeepSpeed's load).

    `optimizer` is the engine's. ZeRO-3 loads universal checkpoints its own way; there this does nothing.
    """
    try:
        import deepspeed.runtime.base_optimizer as base  # 0.19's home of the ZeRO-1/2 universal load
    except ImportError:
        base = None
    lp_groups = getattr(optimizer, "bit16_groups", None) or getattr(optimizer, "bf16_groups", None)
    inner = getattr(optimizer, "optimizer", None)
    if not (lp_groups and isinstance(inner, torch.optim.Optimizer) and hasattr(base, "map_to_flat_opt_states")):
        yield
        return
    replaced = []
    for group, lps in zip(inner.param_groups, lp_groups):
        flat = group["params"][0]
        for lp in lps:
            if getattr(lp, "_hp_mapping", None) is not None and hasattr(lp, "load_hp_checkpoint_state"):
                replaced.append((lp, lp.load_hp_checkpoint_state))
                lp.load_hp_checkpoint_state = _into_flat_states(lp, lp.load_hp_checkpoint_state, flat, inner.state)
    regroup = base.map_to_flat_opt_states

    def regroup_unless_flat(flat, lps, state, keys):
        if not all(_is_flat_state(state.get(flat, {}).get(key), flat, lps, key) for key in keys):
            regroup(flat, lps, state, keys)

    base.map_to_flat_opt_states = regroup_unless_flat
    try:
        yield
    finally:
        base.map_to_flat_opt_states = regroup
        for lp, method in replaced:
            lp.load_hp_checkpoint_state = method


def _into_flat_states(lp: torch.Tensor, load: Any, flat: torch.Tensor, states: dict) -> Any:
    """`lp`'s load_hp_checkpoint_state, filling the flat states in place where the files hold `lp` whole (what
    shardtune saves); otherwise DeepSpeed's own (`load`), and its regrouping then rebuilds the flat states."""
    def load_into_flat(folder, *args, **kwargs):
        done, step = _slices_in_place(lp, folder, flat, states[flat])  # the torch optimizer's state: a defaultdict
        return step if done else load(folder, *args, **kwargs)
    return load_into_flat


def _slices_in_place(lp: torch.Tensor, folder: str, flat: torch.Tensor, state: dict) -> tuple[bool, Any]:
    """What DeepSpeed's load_hp_checkpoint_state does for a parameter saved whole (its file's tensor has `lp`'s
    shape; no AutoTP or expert-parallel layout): this rank's slice of every file, `fp32` into the master and the
    rest into `state`'s flat buffers. (False, None) when the parameter is laid out otherwise, or when this
    DeepSpeed does not name those layouts as 0.19 does (its own load then decides, as without shardtune)."""
    try:
        from deepspeed.checkpoint.constants import EP_IS_EXPERT_PARAM, FP32_WEIGHT_KEY, PARAM
        from deepspeed.checkpoint.universal_checkpoint import _get_param_uc_restore_meta
    except ImportError:
        return False, None
    if _get_param_uc_restore_meta(lp) is not None:
        return False, None
    mapping = lp._hp_mapping
    lp_at, hp_at = mapping.lp_fragment_address, mapping.get_hp_fragment_address()
    step, moments = None, {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".pt"):
            continue
        key, loaded = name[:-3], torch.load(os.path.join(folder, name))  # mapped and verified: guarded_loads
        if key == "step":
            step = loaded
            continue
        whole = loaded[PARAM]
        if whole.shape != lp.shape or loaded.get(EP_IS_EXPERT_PARAM, False):
            return False, None
        mine = whole.reshape(-1).narrow(0, lp_at.start, lp_at.numel)
        into = (mapping.get_hp_fragment() if key == FP32_WEIGHT_KEY
                else _flat(state, key, flat).narrow(0, hp_at.start, hp_at.numel))
        with torch.no_grad():  # the master is a parameter
            into.copy_(mine)
        if key != FP32_WEIGHT_KEY:
            moments[key] = into
    mapping.optim_fragment = moments
    return True, step


def _flat(state: dict, key: str, flat: torch.Tensor) -> torch.Tensor:
    """`flat`'s optimizer state `key`, allocated the first time (zeroed pages are not resident until written)."""
    if key not in state:
        state[key] = torch.zeros_like(flat)
    return state[key]


def _is_flat_state(value: Any, flat: torch.Tensor, lps: list, key: str) -> bool:
    """Whether `value` is `flat`'s state `key`, holding every parameter's slice in place (what the regrouping makes)."""
    if not torch.is_tensor(value) or value.shape != flat.shape or value.device != flat.device:
        return False
    storage = value.untyped_storage().data_ptr()
    return all(lp._hp_mapping.optim_fragment.get(key) is not None
               and lp._hp_mapping.optim_fragment[key].untyped_storage().data_ptr() == storage
               for lp in lps if getattr(lp, "_hp_mapping", None) is not None)


def mapped_files(under: Path) -> list[str]:
    """Files below `under` that this process still maps (Linux /proc/self/maps), each once."""
    prefix = str(Path(under).resolve()) + "/"
    return sorted({path for _, _, path in _file_maps() if path.startswith(prefix)})


def _file_maps() -> Iterator[tuple[int, int, str]]:
    """(start, end, path) of this process's mappings of files, in address order."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[5].startswith("/"):
                start, end = fields[0].split("-")
                yield int(start, 16), int(end, 16), fields[5].strip()


def _within(spans: list[tuple[int, int]], start: int, nbytes: int) -> bool:
    i = bisect.bisect_right(spans, (start, float("inf"))) - 1
    return i >= 0 and spans[i][0] <= start and start + nbytes <= spans[i][1]


def _copied_out(mapped: torch.Tensor) -> torch.Tensor:
    if not mapped.is_contiguous():
        return mapped.clone()
    own = torch.empty_like(mapped)
    src, dst, size = mapped.view(-1), own.view(-1), mapped.element_size()
    step = max(1, COPY_CHUNK // size)
    for i in range(0, src.numel(), step):
        piece = src[i:i + step]
        dst[i:i + step].copy_(piece)
        drop_pages(piece.data_ptr(), piece.numel() * size)
    return own


def _torch_optimizers(optimizer: Any) -> Iterator[torch.optim.Optimizer]:
    seen: list[Any] = []
    while optimizer is not None and all(optimizer is not s for s in seen):
        seen.append(optimizer)
        if isinstance(optimizer, torch.optim.Optimizer):
            yield optimizer
        optimizer = getattr(optimizer, "optimizer", None)


def _tensors(x: Any) -> Iterable[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
