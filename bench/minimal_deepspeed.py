r"""The floor: deepspeed.initialize, then forward, backward, step - nothing else.

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m bench.minimal_deepspeed \
        --model DIR --ds_config ds.json --batches DIR --out result.json

It trains on micro-batches that were built ahead of time (bench/_workloads.py writes them per rank,
with shardtune's own collate), so it sees exactly shardtune's tokens. The bench runs it with two
DeepSpeed configs: the one a person writes by hand (batch sizes, AdamW, the stage; everything else
DeepSpeed's default), which measures shardtune's choices, and the one shardtune rendered for the run,
which leaves only what shardtune does around the step. Rank 0 writes the wall time at the end of
every optimizer step.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--ds_config", required=True)
    parser.add_argument("--batches", required=True, help="directory with minimal_rank{R}.pt")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_steps", type=int, help="stop after this many optimizer steps (default: all batches)")
    args = parser.parse_args()

    import deepspeed
    from transformers import AutoModelForCausalLM

    ds_config = json.load(open(args.ds_config))
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(args.seed)
    if ds_config["zero_optimization"]["stage"] == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 - makes from_pretrained build under zero.Init
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    steps = torch.load(os.path.join(args.batches, f"minimal_rank{rank}.pt"), weights_only=True)

    ends = []
    for micros in steps[:args.max_steps]:
        for batch in micros:
            targets = batch.pop("targets")
            logits = engine(**batch).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
            engine.backward(loss)
            engine.step()
        ends.append(time.time())

    if rank == 0:
        with open(args.out, "w") as fh:
            json.dump({"step_end_times": ends, "optimizer": type(engine.optimizer).__name__,
                       "inner_optimizer": type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__},
                      fh)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
