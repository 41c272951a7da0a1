"""`python -m trainer.safe_convert ARGS`: DeepSpeed's ds_to_universal, with every load verified and code-free.

ds_to_universal reads the checkpoint with `torch.load(weights_only=False)` in several places, some in worker
processes. Run through here, every torch.load of the source checkpoint reads its bytes once, checks them
against the checkpoint's manifest and deserializes those bytes with weights_only=True and DeepSpeed's three
types allowed; every other load (its own intermediate files) is forced to weights_only=True as well.
`TORCH_FORCE_WEIGHTS_ONLY_LOAD=1` is set for any process started from here, so a worker that does not
inherit the patch (a spawn start method) fails closed instead of running a crafted pickle. The module is
called directly (not through runpy), so workers re-import it and get the patch again.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"


def _install() -> None:
    import json

    from launcher.contract.run_dir import MANIFEST
    from trainer.checkpoint_io import Manifests, allow_deepspeed_types, guarded_loads

    allow_deepspeed_types()
    source = Path(sys.argv[sys.argv.index("--input_folder") + 1]) if "--input_folder" in sys.argv else None
    manifests = Manifests()
    if source is not None and (source / MANIFEST).is_file():
        manifests.add(source, json.loads((source / MANIFEST).read_text())["files"])
    guarded_loads(manifests).__enter__()  # for the life of this process (and its forked workers)


_install()


def main() -> None:
    from deepspeed.checkpoint import ds_to_universal

    ds_to_universal.main(ds_to_universal.parse_arguments())


if __name__ == "__main__":
    main()
