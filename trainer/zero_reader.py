"""The fp32 weights of a DeepSpeed checkpoint, one parameter at a time, from memory-mapped shards.

`zero_to_fp32` concatenates every rank's partition at ZeRO-1/2 (its lazy mode saves nothing there) and reads
the optimizer moments it then drops; a whole-model export needs the whole model in one process. Here every
shard is opened with `torch.load(mmap=True, weights_only=True)`, each parameter is copied out of the slices of
each rank's fp32 partition that hold it, and each shard's map is reopened after a window of reads from it so pages
already read leave the process's resident memory: peak memory is about one parameter plus the windows, whatever
the size.

Layout (DeepSpeed 0.19, read from its ZeRO code and checked tensor for tensor against zero_to_fp32):
  ZeRO-1/2  optim_states["optimizer_state_dict"]["single_partition_of_fp32_groups"][g]: this rank's slice
            flat_g[r·P_g:(r+1)·P_g] of group g's flat fp32 buffer (P_g = rank 0's slice length; the last
            rank's slice is saved without the tail padding); flat_g holds the params of param_shapes[g] in
            order, each followed by param_alignment_paddings[g][i] zeros.
  ZeRO-3    optim_states["optimizer_state_dict"]["fp32_flat_groups"][sg]: every param contributes
            ceil(numel / world) elements on every rank, in param_shapes order, across sub-groups.
  ZeRO-0    mp_rank_00_model_states.pt["module"]: the whole module in the training dtype.
model_states also hold buffer_names, param_shapes, frozen_param_shapes/fragments and shared_params (ties).
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from trainer.checkpoint_io import refused, safe_load

Shape = tuple[int, ...]


def _load(path: Path):
    """One shard, memory-mapped, weights only; a pickle that wants more is refused, naming the file and the type."""
    import pickle

    try:
        return safe_load(path, mmap=True)
    except pickle.UnpicklingError as exc:
        raise refused(str(path), exc) from None


def _config_stage(model_states: dict) -> int:
    """The ZeRO stage of the DeepSpeed config saved with the model states."""
    return int(((model_states.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))


def _natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


class _Partitions:
    """Every rank's fp32 partitions, memory-mapped; a rank's shard is reopened after `window` bytes read from it.

    Each shard is reopened on its own: reopening all of them whenever remap_bytes had been read in total cost a
    torch.load of every shard per window, (bytes / remap_bytes) × ranks loads, which for a 70B checkpoint of 512
    ranks is two million (at ZeRO-1/2, where a parameter lies in one or two shards, almost all of them of shards
    nobody read). The window is remap_bytes shared among the ranks, but at least an eighth of it: what stays
    mapped is at most ranks × window (4 GiB at 512 ranks; clean file pages the kernel can reclaim), against
    bytes / window loads in all.
    """

    def __init__(self, files: list[Path], key: str, remap_bytes: int):
        self.files, self.key = files, key
        self.window = max(remap_bytes // len(files), remap_bytes // 8) if remap_bytes else 0
        self.groups: list = [None] * len(files)
        self.meta: list = [None] * len(files)
        self.read = [0] * len(files)
        for r in range(len(files)):
            self._open(r)

    def _open(self, r: int) -> None:
        self.groups[r] = self.meta[r] = None  # drop the old map before making the new one
        state = _load(self.files[r])["optimizer_state_dict"]
        state.pop("optimizer_state_dict", None)  # ZeRO-3 moments: never needed, never touched
        state.pop("base_optimizer_state", None)  # ZeRO-1/2 moments
        self.groups[r] = state.pop(self.key)
        self.meta[r] = state
        self.read[r] = 0

    def count(self, r: int, nbytes: int) -> None:
        self.read[r] += nbytes
        if self.window and self.read[r] >= self.window:
            self._open(r)


def _span(flats: list[torch.Tensor], start: int, length: int) -> list[torch.Tensor]:
    """Views of [start, start+length) of the concatenation of flats (a span may cross sub-groups)."""
    out, base = [], 0
    for t in flats:
        n = t.numel()
        lo, hi = max(start, base), min(start + length, base + n)
        if lo < hi:
            out.append(t[lo - base:hi - base])
        base += n
        if base >= start + length:
            break
    return out


def _assemble(pieces: list[torch.Tensor], n: int, shape) -> torch.Tensor:
    """The first n elements of the pieces, copied into one new fp32 tensor (it owns its memory: no map stays)."""
    out = torch.empty(n, dtype=torch.float32)
    pos = 0
    for p in pieces:
        k = min(p.numel(), n - pos)
        if k <= 0:
            break
        out[pos:pos + k].copy_(p[:k])
        pos += k
    if pos != n:
        raise ValueError(f"the checkpoint's partitions hold {pos} of {n} elements of a {tuple(shape)} parameter")
    return out.view(shape)


class ZeroCheckpoint:
    """A checkpoint directory written by DeepSpeed (any ZeRO stage, any world size)."""

    def __init__(self, ckpt: Path, remap_bytes: int = 64 << 20):
        self.ckpt, self.remap_bytes = Path(ckpt), remap_bytes
        self.optim_files = sorted(self.ckpt.glob("*_optim_states.pt"), key=_natural)
        self.model_files = sorted(self.ckpt.glob("*_model_states.pt"), key=_natural)
        if not self.model_files:
            raise FileNotFoundError(f"{self.ckpt}: no DeepSpeed model states (*_model_states.pt)")
        states = _load(self.model_files[0])
        self.buffer_names = list(states.get("buffer_names") or [])
        self.shared = dict(states.get("shared_params") or {})
        self.frozen_shapes = dict(states.get("frozen_param_shapes") or {})
        self.stage = 0
        if self.optim_files:
            first = _load(self.optim_files[0])["optimizer_state_dict"]
            # DeepSpeed's BF16_Optimizer (ZeRO-1 in bf16 with fp32 gradient accumulation) records no stage; its
            # partitions are laid out as ZeRO-1's, without per-parameter alignment padding.
            self.stage = int(first["zero_stage"] if "zero_stage" in first else _config_stage(states))
            count = first["partition_count"]
            self.world = max(count) if isinstance(count, list) else int(count)
            if self.world != len(self.optim_files):
                raise ValueError(f"{self.ckpt}: written by {self.world} ranks but {len(self.optim_files)} "
                                 f"optimizer shards are here")
            self.param_shapes = [{k: tuple(v) for k, v in group.items()} for group in states["param_shapes"]]
        else:
            stage = _config_stage(states)
            if stage:
                raise FileNotFoundError(f"{self.ckpt}: a ZeRO-{stage} checkpoint without its optimizer shards "
                                        f"(*_optim_states.pt), which hold the fp32 weights")
            module = states["module"]
            self.param_shapes = [{k: tuple(v.shape) for k, v in module.items()
                                  if k not in self.buffer_names and k not in self.shared}]

    def entries(self) -> list[tuple[str, Shape]]:
        """(name, shape) of everything `tensors()` yields, in that order."""
        states = _load(self.model_files[0])
        out = [(n, tuple(states["module"][n].shape)) for n in self.buffer_names]
        out += list(self.frozen_shapes.items()) if self.stage else []
        out += [(n, s) for group in self.param_shapes for n, s in group.items()]
        return out + [(alias, dict(out)[target]) for alias, target in self.shared.items() if target in dict(out)]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every buffer and parameter: fp32 masters for trained parameters; frozen ones and
        buffers in their saved dtype (there is no fp32 master of them); tied aliases last."""
        states = _load(self.model_files[0])
        for name in self.buffer_names:
            yield name, states["module"][name].clone()
        kept: dict[str, torch.Tensor] = {}
        targets = set(self.shared.values())
        if self.stage == 0:
            source = ((n, states["module"][n].float().clone()) for group in self.param_shapes for n in group)
        else:
            yield from self._frozen(states)
            source = self._trained()
        for name, tensor in source:
            yield name, tensor
            if name in targets:
                kept[name] = tensor
        del states
        for alias, target in self.shared.items():
            if target in kept:
                yield alias, kept[target]

    def _frozen(self, states: dict) -> Iterator[tuple[str, torch.Tensor]]:
        if not self.frozen_shapes:
            return
        if self.stage <= 2:
            for name in self.frozen_shapes:
                yield name, states["frozen_param_fragments"][name].clone()
            return
        fragments = [_load(f)["frozen_param_fragments"] for f in self.model_files]
        for name, shape in self.frozen_shapes.items():
            n = math.prod(shape)
            yield name, torch.cat([fr[name].reshape(-1) for fr in fragments])[:n].view(shape).clone()

    def _trained(self) -> Iterator[tuple[str, torch.Tensor]]:
        key = "single_partition_of_fp32_groups" if self.stage <= 2 else "fp32_flat_groups"
        parts = _Partitions(self.optim_files, key, self.remap_bytes)
        if self.stage <= 2:
            paddings = parts.meta[0].get("param_alignment_paddings")
            for g, shapes in enumerate(self.param_shapes):
                size = parts.groups[0][g].numel()  # P_g: rank 0's slice is never trimmed
                offset = 0
                for i, (name, shape) in enumerate(shapes.items()):
                    n = math.prod(shape)
                    ranks = range(offset // size, (offset + n - 1) // size + 1)
                    pieces = [parts.groups[r][g][max(offset, r * size) - r * size:min(offset + n, (r + 1) * size)
                                                 - r * size] for r in ranks]
                    yield name, _assemble(pieces, n, shape)
                    for r, piece in zip(ranks, pieces):
                        parts.count(r, piece.numel() * 4)
                    offset += n + (paddings[g][i] if paddings else 0)
            return
        offset = 0
        for name, shape in ((n, s) for group in self.param_shapes for n, s in group.items()):
            n = math.prod(shape)
            per_rank = math.ceil(n / self.world)
            pieces = [p for r in range(self.world) for p in _span(parts.groups[r], offset, per_rank)]
            yield name, _assemble(pieces, n, shape)  # the last rank's padding is cut off here
            for r in range(self.world):
                parts.count(r, per_rank * 4)
            offset += per_rank
        total = sum(x.numel() for x in parts.groups[0])
        if offset != total:
            raise ValueError(f"{self.ckpt}: read {offset} of {total} fp32 elements per rank")
