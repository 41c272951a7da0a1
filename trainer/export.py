"""A plain Hugging Face model directory, from a checkpoint on disk or from the ranks of a running job.

Both ways stream: one fp32 tensor at a time is cast to the export dtype and written straight into its planned
safetensors shard (trainer/hf_writer.py), so no process ever holds the whole model. At the end of a run all
ranks take part (each parameter gathered with DeepSpeed's `safe_get_full_fp32_param`, rank 0 writing), so no
rank waits idle at a barrier while one process reads a terabyte back. `shardtune export` reads a checkpoint
lazily instead (trainer/zero_reader.py): any ZeRO stage, any original world size, no GPU.

What is written is what `save_pretrained` writes: transformers' own tied-weight removal and (for models whose
layout on disk differs from their modules, e.g. fused MoE experts) its own reverse weight conversion decide
the tensor names; config (with the export dtype), generation config, tokenizer and chat template come from
the checkpoint's copy of them.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Optional

import torch

from launcher.contract.errors import UserError
from launcher.contract.run_dir import HF, MANIFEST, fsync_dir, sync_tree
from trainer.checkpoint import CheckpointError
from trainer.hf_writer import Entry, ShardedSafetensorsWriter
from trainer.zero_reader import ZeroCheckpoint

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXPORT_RECORD = "shardtune_export.json"
_NOT_COPIED = ("config.json",)  # written from the model config with the export dtype instead


def export_dtype(config, dtype: str) -> torch.dtype:
    """`auto`: the model's own dtype (its config's), else fp32; or fp32 / bf16 / fp16."""
    if dtype not in ("auto", *DTYPES):
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    if dtype != "auto":
        return DTYPES[dtype]
    target = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, target) if isinstance(target, str) else target


def model_config(hf_dir: Path, trust_remote_code: bool):
    """The model's config from a checkpoint's hf/ directory. A model with its own code (`auto_map`) that
    transformers does not implement needs that code run to be rebuilt: only with the user's say-so, since a
    checkpoint from elsewhere may carry any code. (Many hub models keep an `auto_map` that transformers now
    implements natively, e.g. Phi-3: without trust those load natively, as they trained.)"""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(hf_dir, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if trust_remote_code or "trust_remote_code" not in str(exc):
            raise
        code = sorted(p.name for p in hf_dir.glob("*.py"))
        raise UserError(f"the model in {hf_dir.parent} runs its own code ({', '.join(code) or 'from the hub'}) to "
                        f"be rebuilt; read it, then export with --trust_remote_code") from None


class Layout:
    """Which tensors a Hugging Face directory of this model holds, and under which names, decided by transformers."""

    def __init__(self, config, dtype: torch.dtype, trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                          trust_remote_code=trust_remote_code)
        self.dtype = dtype
        self.kept = set(remove_tied_weights_from_state_dict(self.model.state_dict(), self.model))
        self._joined: dict[str, tuple[str, ...]] = {}
        """Module tensors that are one tensor on disk (q, k and v of a fused query_key_value), by member."""
        self._waiting: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}

    def _revert(self, tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        from transformers.core_model_loading import revert_weight_conversion

        return list(revert_weight_conversion(self.model, tensors).items())

    def entries(self, source: Iterable[tuple[str, tuple[int, ...]]]) -> list[Entry]:
        """The planned files' contents, in the order the source will produce its tensors; call before `push`.

        Module tensors that transformers joins into one tensor on disk are found here, by reverting each one
        alone and seeing several land on the same name: they are reverted together when the last one arrives."""
        metas = [(name, torch.empty(shape, dtype=self.dtype, device="meta")) for name, shape in source
                 if name in self.kept]
        sources_of: dict[str, list[str]] = {}
        for name, meta in metas:
            for disk_name, _ in self._revert({name: meta}):
                sources_of.setdefault(disk_name, []).append(name)
        self._joined = {name: tuple(group) for group in sources_of.values() if len(group) > 1 for name in group}
        out = [Entry(n, tuple(t.shape), t.dtype) for name, meta in metas for n, t in self.push(name, meta)]
        if self._waiting:
            raise ValueError(f"module tensors written jointly never arrived together: {list(self._waiting)[:3]}")
        return out

    def push(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The tensor(s) on disk this module tensor completes: itself (renamed, or split for some models), or, where
        several module tensors are one on disk, nothing until the last of them arrives and then the joined one."""
        group = self._joined.get(name)
        if group is None:
            return self._revert({name: tensor})
        waiting = self._waiting.setdefault(group, {})
        waiting[name] = tensor
        if len(waiting) < len(group):
            return []
        del self._waiting[group]
        return self._revert(waiting)


def replace_problem(out: Path) -> Optional[str]:
    """Why an export must not replace `out` (None: it is missing, empty, or an earlier export). An export replaces
    its directory whole, so a path given by mistake (a home directory, the run itself) would be deleted."""
    if not out.exists() and not out.is_symlink():
        return None
    if not out.is_dir():
        return f"{out} exists and is not a directory"
    if (out / EXPORT_RECORD).is_file() or not any(out.iterdir()):
        return None
    return (f"{out} is a directory with other files in it (not an earlier export: no {EXPORT_RECORD}); an export "
            f"replaces its whole directory, so give a new or empty one")


def _remove_abandoned(out: Path) -> None:
    """Delete this host's unfinished builds of `out` whose process is gone (a crash mid-export leaves one as big
    as the model). Another host's are left alone: their process may still be writing."""
    host = socket.gethostname()
    for tmp in out.parent.glob(f".{out.name}.tmp-{host}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_model_dir(out: Path, config, hf_dir: Optional[Path], layout: Layout, entries: list[Entry],
                    tensors: Iterator[tuple[str, torch.Tensor]], max_shard_size: str,
                    progress: Callable[[int], None] = lambda n: None, record: Optional[dict] = None) -> Path:
    """Stream tensors into `out` (which appears whole, or not at all: built next to it, then renamed)."""
    out = Path(out)
    problem = replace_problem(out)
    if problem:
        raise UserError(f"not exporting to {out}: {problem}")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out)
    tmp = out.with_name(f".{out.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    writer = ShardedSafetensorsWriter(tmp, entries, max_shard_size, progress)
    try:
        for name, tensor in tensors:
            if name in layout.kept:
                for out_name, part in layout.push(name, tensor.to(layout.dtype)):
                    writer.write(out_name, part)
        writer.close()
        config.architectures = [type(layout.model).__name__]
        config.dtype = layout.dtype
        config.save_pretrained(tmp)
        if hf_dir is not None:
            for item in sorted(Path(hf_dir).iterdir()):
                if item.name not in _NOT_COPIED and not (tmp / item.name).exists():
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        (tmp / EXPORT_RECORD).write_text(json.dumps({**(record or {}), "dtype": str(layout.dtype),
                                                     "max_shard_size": max_shard_size}) + "\n")
        problem = replace_problem(out)  # again: the export took a while, and something may have appeared there
        if problem:
            raise UserError(f"not exporting to {out}: {problem}")
        sync_tree(tmp)
    except BaseException:
        # A failed build (a full filesystem, most often) gives its space back at once: it may be as big as the model.
        writer.abandon()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    return out


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, dtype: str = "auto", max_shard_size: str = "5GB",
                      progress: Callable[[int], None] = lambda n: None, trust_remote_code: bool = False) -> Path:
    """A Hugging Face directory from a complete checkpoint, reading it lazily (about one tensor in memory)."""
    ckpt = Path(ckpt)
    if not (ckpt / MANIFEST).is_file():
        raise CheckpointError(f"{ckpt} is not a complete shardtune checkpoint (no {MANIFEST})")
    config = model_config(ckpt / HF, trust_remote_code)
    layout = Layout(config, export_dtype(config, dtype), trust_remote_code)
    source = ZeroCheckpoint(ckpt)
    return write_model_dir(Path(out_dir), config, ckpt / HF, layout, layout.entries(source.entries()),
                           source.tensors(), max_shard_size, progress, {"checkpoint": str(ckpt)})


def _full_fp32(param: torch.Tensor) -> torch.Tensor:
    """One parameter, whole and in fp32, on every rank: the optimizer's master copy where there is one."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(param)  # a collective at ZeRO-1/2/3: every rank calls it in the same order
    return (full if full is not None else param.detach()).float()


def export_engine(engine, hf_dir: Path, out_dir: Path, is_writer: bool, dtype: str = "auto",
                  max_shard_size: str = "5GB", progress: Callable[[int], None] = lambda n: None,
                  trust_remote_code: bool = False) -> Optional[Path]:
    """The running model as a Hugging Face directory. Collective: every rank calls it; `is_writer` writes.

    Parameters are gathered one at a time on every rank, so each holds about one parameter at a time; the
    writer casts it and streams it into its shard. trust_remote_code: the run's own (model.trust_remote_code);
    hf_dir is the checkpoint this run just wrote, holding the code it trained with.
    """
    config = model_config(hf_dir, trust_remote_code)
    layout = Layout(config, export_dtype(config, dtype), trust_remote_code)
    module = engine.module
    params = list(module.named_parameters())
    buffers = [(n, b) for n, b in module.named_buffers() if n in layout.kept]
    source = ([(n, tuple(getattr(p, "ds_shape", p.shape))) for n, p in params]
              + [(n, tuple(b.shape)) for n, b in buffers])

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, param in params:
            full = _full_fp32(param).cpu()
            progress(0)
            yield name, full
        for name, buf in buffers:
            yield name, buf.detach().cpu()

    if not is_writer:
        for _ in tensors():  # take part in every gather
            pass
        return None
    return write_model_dir(Path(out_dir), config, hf_dir, layout, layout.entries(source), tensors(), max_shard_size,
                           progress, {"exported_by": "the run's ranks"})


def fp32_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint in one dict (for tests and small models; exports stream instead)."""
    return dict(ZeroCheckpoint(ckpt).tensors())
