"""`shardtune export`: a Hugging Face model directory from any complete checkpoint, offline."""
from __future__ import annotations

from pathlib import Path

from launcher.contract.run_dir import CHECKPOINTS, MANIFEST, RunDir, complete_checkpoints
from trainer.checkpoint import CheckpointError
from trainer.export import export_checkpoint


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint step directory from itself, a run directory or its checkpoints/ directory (newest complete)."""
    p = Path(path)
    if (p / MANIFEST).is_file():
        return p
    for root in (RunDir(p).checkpoints, p):
        found = complete_checkpoints(root)
        if found:
            return found[0]
    raise CheckpointError(f"{p}: no complete shardtune checkpoint here (a step_* directory with {MANIFEST}, "
                          f"or a run directory that has one under {CHECKPOINTS}/)")


def export_command(checkpoint: str | Path, out_dir: str | Path, dtype: str = "auto",
                   max_shard_size: str = "5GB") -> tuple[Path, Path]:
    """(the checkpoint used, the model directory written)."""
    ckpt = resolve_checkpoint(checkpoint)
    return ckpt, export_checkpoint(ckpt, out_dir, dtype, max_shard_size)
