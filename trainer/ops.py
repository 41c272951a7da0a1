"""DeepSpeed's compiled ops a run needs, checked at start-up and built once per node before the model loads.

`deepspeed.initialize` JIT-builds FusedAdam (CUDA) or DeepSpeedCPUAdam (optimizer offload) on first use,
which is after every rank has loaded the whole model: a missing compiler then fails every rank at once,
late, and ranks that build together queue on one build lock. Here local rank 0 of each node builds (or finds)
the op first while its peers wait, then they load the cached build.

Builds go to this environment's own directory for this kind of machine (launcher/planning/host.extensions_dir),
not to torch's default one, which every environment of the user and every node of a shared $HOME use. A killed
build's lock would make every later load wait forever: wait_for_builds clears those first.

Muon's kernels are the opposite case: compiled for every run, used by none of ours (skip_unused_muon).
"""
from __future__ import annotations

import os
import sys
import types
from collections.abc import Callable
from pathlib import Path

from launcher.planning.host import extensions_dir, fused_adam_status
from trainer import build_locks
from trainer.distributed import Dist, barrier


def ops_needed(ds_config: dict, device_type: str) -> list[str]:
    """The compiled ops the rendered DeepSpeed config will load on this device."""
    if device_type != "cuda":
        return []  # the launcher renders torch's AdamW on CPU
    params = (ds_config.get("optimizer") or {}).get("params") or {}
    offload = ((ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device") == "cpu"
    if offload:
        return ["cpu_adam"]
    return [] if params.get("torch_adam") else ["fused_adam"]


def unavailable(ds_config: dict, device_type: str) -> list[str]:
    """Why a needed op cannot be loaded on this node ([] when it can): preflight's check, before anything loads."""
    if "fused_adam" in ops_needed(ds_config, device_type):
        status = fused_adam_status()
        if not status.usable:
            return [f"fused_adam: {status.reason}; set train.optimizer: torch (torch's fused AdamW) or install "
                    f"a CUDA toolkit matching torch"]
    return []


def pin_build_dir() -> Path:
    """Point torch's op builds in this process and its children at this environment's directory for this kind of
    machine (every rank, as it joins the process group); returns it.

    A directory the user set in $TORCH_EXTENSIONS_DIR is kept (a team's shared, prebuilt cache, say).
    """
    path = extensions_dir()
    os.environ["TORCH_EXTENSIONS_DIR"] = str(path)
    return path


def wait_for_builds() -> None:
    """Before any op loads (DeepSpeed's CPU comm op loads as the process group forms): no build lock is left in
    this environment's build directory.

    Local rank 0 of each node removes killed builds' locks and says so; the node's other ranks wait with it.
    """
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    build_locks.wait_for_builds(first, (lambda msg: print(f"shardtune: {msg}", file=sys.stderr, flush=True))
                                if first else (lambda _msg: None))


def _builder(name: str):
    from deepspeed.ops.op_builder import CPUAdamBuilder, FusedAdamBuilder

    return {"fused_adam": FusedAdamBuilder, "cpu_adam": CPUAdamBuilder}[name]()


def build_once_per_node(ds_config: dict, dist: Dist, beat: Callable[[str], None], log: Callable[[str], None]) -> None:
    """Local rank 0 builds or loads each needed op first; the node's other ranks then load its cached build."""
    needed = ops_needed(ds_config, dist.device.type)
    if not needed:
        return
    beat("build ops")
    if dist.local_rank == 0:
        for name in needed:
            _builder(name).load(verbose=False)
        log(f"compiled ops ready on this node: {', '.join(needed)}")
    barrier()
    if dist.local_rank != 0:
        for name in needed:
            _builder(name).load(verbose=False)
    beat("build ops")


def build_ahead(builders: list[str]) -> None:
    """`make install` on a machine without GPUs: build DeepSpeed's named CPU op builders into this environment's
    directory now, so no test or first run pays the build."""
    pin_build_dir()
    from deepspeed.accelerator import get_accelerator

    for name in builders:
        get_accelerator().create_op_builder(name).load(verbose=False)


MUON_MODULES = ("deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.runtime.zero.muon.original_muon")


def _muon_update(*args, **kwargs):
    raise RuntimeError("DeepSpeed asked for Muon's update in a run whose optimizer is not Muon (trainer/ops.py)")


def skip_unused_muon(ds_config: dict) -> bool:
    """Spare a run that does not train with Muon the import of DeepSpeed's Muon optimizer; True if spared.

    DeepSpeed's ZeRO optimizers import `MuonWithAuxAdam` to ask whether the run's optimizer is one (`type(...) in`
    its supported list, `isinstance` in the bf16 and ZeRO optimizers), and ZeRO-1/2 import `muon_update` at every
    gradient reduction, to call it only for Muon's parameters. Importing either wraps Muon's update in
    torch.compile, which imports inductor: 1.7 s of CPU on every rank at every start on this project's 2-core VM,
    for a run that stays eager (a compiled run imports inductor anyway). Unless the DeepSpeed config names Muon,
    the type questions get a class nothing is an instance of (so the answers stay the true ones), and
    `muon_update` is a function that raises, saying why, if it is ever called. A config that names Muon gets the
    real modules.
    """
    optimizer = str((ds_config.get("optimizer") or {}).get("type", "")).lower()
    if "muon" in optimizer or any(name in sys.modules for name in MUON_MODULES):
        return False
    optimizer_module, update_module = (types.ModuleType(name, "This run's optimizer is not Muon (trainer/ops.py).")
                                       for name in MUON_MODULES)
    optimizer_module.MuonWithAuxAdam = type("MuonWithAuxAdam", (), {})
    update_module.muon_update = _muon_update
    sys.modules.update({m.__name__: m for m in (optimizer_module, update_module)})
    return True
