"""`python -m trainer.safe_convert ARGS`: DeepSpeed's ds_to_universal, with every load verified and code-free.

ds_to_universal reads the checkpoint with `torch.load(weights_only=False)` in several places, some in worker
processes. Run through here, every torch.load of the source checkpoint checks the file against the checkpoint's
manifest and deserializes it with weights_only=True and DeepSpeed's types allowed, its tensors mapped from the
file (checkpoint_io.guarded_loads): an extract worker's optimizer shard (12 bytes per parameter of a saving
rank's share) is page cache, not memory of its own. Every other load (its own intermediate files) is forced
to weights_only=True as well.
`TORCH_FORCE_WEIGHTS_ONLY_LOAD=1` is set for any process started from here, so a worker that does not
inherit the patch (a spawn start method) fails closed instead of running a crafted pickle. The module is
called directly (not through runpy), so workers re-import it and get the patch again.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"


def _die_with_parent() -> None:
    """End this conversion and its workers when the process that started it dies, however it dies.

    A SIGKILLed rank (the watchdog, OOM, scancel) used to leave the conversion running: at 70B that is 16 workers
    each holding an optimizer shard, writing into a directory nobody will rename, while the requeued job starts
    another. The starter puts this process at the head of a process group of its own (its workers inherit it)
    and names itself with `--parent PID`; this asks the kernel to signal it when that parent goes
    (PR_SET_PDEATHSIG), and the signal takes the whole group down.
    """
    import ctypes
    import signal

    if "--parent" not in sys.argv:  # run by hand
        return
    at = sys.argv.index("--parent")
    parent = int(sys.argv[at + 1])
    del sys.argv[at:at + 2]
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG (Linux)
    except (AttributeError, OSError):
        pass  # not Linux: the starter still kills the group when it fails
    if os.getppid() != parent:  # it died before the request
        os.killpg(0, signal.SIGKILL)


if __name__ == "__main__":
    _die_with_parent()


_GUARD = None
"""The entered guarded_loads. An entered context manager nobody refers to is collected at once, and closing its
generator runs its `finally`, which puts torch's own torch.load back: the conversion then loaded every file
unverified (TORCH_FORCE_WEIGHTS_ONLY_LOAD still kept code out)."""


def _install() -> None:
    import json

    from launcher.contract.run_dir import MANIFEST
    from trainer.checkpoint_io import Manifests, allow_deepspeed_types, guarded_loads

    allow_deepspeed_types()
    source = Path(sys.argv[sys.argv.index("--input_folder") + 1]) if "--input_folder" in sys.argv else None
    manifests = Manifests()
    if source is not None and (source / MANIFEST).is_file():
        manifests.add(source, json.loads((source / MANIFEST).read_text())["files"])
    global _GUARD
    _GUARD = guarded_loads(manifests)
    _GUARD.__enter__()  # for the life of this process (and its forked workers)


_install()


def _scalars_only(state):
    """`state` with every tensor of more than one element emptied (its dtype kept); numbers, steps and the rest
    as they were."""
    import torch

    if torch.is_tensor(state):
        return state if state.numel() <= 1 else torch.empty(0, dtype=state.dtype)
    if isinstance(state, dict):
        return {key: _scalars_only(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_scalars_only(value) for value in state)
    return state


def _without_the_saving_ranks_shard(ds_to_universal) -> None:
    """At ZeRO-3 DeepSpeed writes the saving world's rank 0 optimizer state, whole, into zero/optimizer_state.pt
    (12 bytes per parameter of that rank's share: 106 GB for a 70B model saved by 8 GPUs), and its universal loader
    reads from it only the step, the hyperparameters and the loss scaler (stage3.py's
    load_hp_checkpoint_state_from_checkpoint_dir_stage3): every state it loads comes from the per-parameter files.
    Written without the shard's tensors, the copy is that much smaller, and so are the conversion's writes and
    the verification of the copy by the resuming ranks, whose largest file it was."""
    write_stage3, save = ds_to_universal._save_optimizer_state_stage3, ds_to_universal._save_checkpoint

    def stage3(args, optim_files) -> None:
        ds_to_universal._save_checkpoint = lambda path, state: save(path, _scalars_only(state))
        try:
            write_stage3(args, optim_files)
        finally:
            ds_to_universal._save_checkpoint = save

    ds_to_universal._save_optimizer_state_stage3 = stage3


def main() -> None:
    from deepspeed.checkpoint import ds_to_universal

    _without_the_saving_ranks_shard(ds_to_universal)
    ds_to_universal.main(ds_to_universal.parse_arguments())


if __name__ == "__main__":
    main()
