"""`shardtune export`: a Hugging Face model directory from any complete checkpoint, offline."""
from __future__ import annotations

import shutil
from pathlib import Path

from launcher.contract.run_dir import CHECKPOINTS, MANIFEST, RunDir, complete_checkpoints
from trainer.checkpoint import CheckpointError, verify
from trainer.checkpoint_io import Identity, identity
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
                   max_shard_size: str = "5GB", trust_remote_code: bool = False) -> tuple[Path, Path]:
    """(the checkpoint used, the model directory written)."""
    ckpt = resolve_checkpoint(checkpoint)
    problems = verify(ckpt, None)
    if problems:
        raise CheckpointError(f"{ckpt} fails verification, nothing exported: " + "; ".join(problems[:5]))
    before = _identities(ckpt)
    out = export_checkpoint(ckpt, out_dir, dtype, max_shard_size, trust_remote_code=trust_remote_code)
    # The shards are read memory-mapped (a whole file in memory would defeat the streaming export), so what was
    # verified is checked again afterwards: a file changed in between makes the export void.
    if _identities(ckpt) != before:
        shutil.rmtree(out, ignore_errors=True)
        raise CheckpointError(f"{ckpt} changed while it was being exported; the export was removed")
    return ckpt, out


def _identities(ckpt: Path) -> dict[str, Identity]:
    return {str(p): identity(p.stat()) for p in ckpt.rglob("*") if p.is_file()}
