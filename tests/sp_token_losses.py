"""torchrun helper for tests/test_sequence_parallel.py: per-token losses of packed rows under sequence parallelism.

    torchrun --nproc_per_node=2 tests/sp_token_losses.py MODEL_DIR OUT.json

Builds the trainer's own pieces (plan, sequence-parallel group and attention, model, DeepSpeed engine) for
train.sequence_parallel 2 and runs one eval forward over two packed rows, each rank on its slice; rank 0
writes every position's cross-entropy (gathered over the group), the rows and their sample lengths.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WIDTH = 128
# Row 0: three samples and padding; the second (positions 20..79) crosses the slice boundary at 64.
# Row 1: two samples, the first crossing the boundary.
LENGTHS = [[20, 60, 30], [100, 28]]


def packed_rows(vocab: int):
    from trainer.data.packing import build_packed

    rng = np.random.default_rng(7)
    samples = [rng.integers(1, vocab, size=n).astype(np.int32) for row in LENGTHS for n in row]
    groups, k = [], 0
    for row in LENGTHS:
        groups.append(list(range(k, k + len(row))))
        k += len(row)
    return build_packed(samples, [s.copy() for s in samples], groups)


def main(model_dir: str, out: str) -> None:
    import deepspeed
    import torch.distributed as dist
    import torch.nn.functional as F

    from launcher.contract.config import validate_config
    from launcher.planning.plan import build_plan
    from trainer import sequence_parallel
    from trainer.data.collate import collate
    from trainer.distributed import exit_without_teardown, init_distributed
    from trainer.model import load_model

    torch.set_num_threads(1)
    raw = {"model": {"name_or_path": model_dir},
           "data": {"path": "unused.jsonl", "format": "text", "seq_len": WIDTH},
           "train": {"max_steps": 1, "micro_batch_size": 2, "grad_accum_steps": 1, "lr": 1e-3, "seed": 0,
                     "sequence_parallel": 2},
           "zero": {"stage": 2}, "launch": {"procs_per_node": 2, "device": "cpu"}, "wandb": {"mode": "disabled"},
           "output_dir": str(Path(out).parent / "unused-run")}
    plan = build_plan(validate_config(raw))
    cfg, ds = plan.config, plan.deepspeed
    rank = init_distributed(600)
    sp = sequence_parallel.setup(cfg, rank, flash_usable=False)
    model = load_model(cfg, ds, rank.device, sp.attention)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds, mpu=sp.mpu)
    data = packed_rows(model.config.vocab_size)
    full = collate(data, np.arange(len(LENGTHS)), pad_id=0, separation="none", multiple_of=sp.multiple_of)
    batch = sp.shard(full)
    engine.eval()
    with torch.no_grad():
        logits = engine(**batch.model_inputs()).logits
    losses = F.cross_entropy(logits.float().transpose(1, 2), batch.targets, ignore_index=-100, reduction="none")
    parts = [torch.empty_like(losses) for _ in range(sp.size)]
    dist.all_gather(parts, losses.contiguous(), group=sp.mpu.get_sequence_parallel_group())
    if rank.is_main:
        Path(out).write_text(json.dumps({
            "attention": sp.attention, "slice": batch.input_ids.shape[1], "lengths": LENGTHS,
            "input_ids": full.input_ids.tolist(), "targets": full.targets.tolist(),
            "token_losses": torch.cat(parts, dim=1).tolist()}))
    dist.destroy_process_group()
    exit_without_teardown(0)  # as the trainer's ranks end


if __name__ == "__main__":
    main(*sys.argv[1:])
