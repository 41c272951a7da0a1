"""The training loop, on one screen: batch -> forward -> backward -> step -> metrics -> maybe save.

The loss is the token-weighted mean over the whole global batch: each micro-batch contributes its
sum of token losses divided by the global batch's count of trained tokens (known in advance from
the packed data). That is what an unsharded run computes, for any world size and accumulation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from trainer.data.collate import collate
from trainer.data.packing import PackedSet
from trainer.data.sampler import DataPosition, GlobalBatchSampler, rank_micro_batches
from trainer.distributed import Dist, all_reduce_sum
from trainer.model import token_loss_sum


@dataclass
class TrainState:
    """Everything besides model and optimizer that a resumed run needs; saved as JSON."""

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    trained_tokens: int = 0
    samples: int = 0
    skipped_steps: int = 0
    wandb_run_id: Optional[str] = None

    def to_json(self) -> dict:
        return {"step": self.step, "position": self.position.to_json(), "trained_tokens": self.trained_tokens,
                "samples": self.samples, "skipped_steps": self.skipped_steps, "wandb_run_id": self.wandb_run_id}

    @classmethod
    def from_json(cls, d: dict) -> "TrainState":
        return cls(d["step"], DataPosition(**d["position"]), d["trained_tokens"], d["samples"], d["skipped_steps"],
                   d.get("wandb_run_id"))


@dataclass
class Loop:
    engine: object
    data: PackedSet
    sampler: GlobalBatchSampler
    dist: Dist
    micro_batch_size: int
    pad_id: int
    block_mask: bool
    max_steps: int
    log_every: int
    on_log: Callable[[int, dict], None]
    on_step_end: Callable[[TrainState], bool]
    """Called after every optimizer step (eval, checkpoints, stop requests); True stops the loop."""

    def forward_loss(self, indices: np.ndarray) -> tuple[torch.Tensor, int]:
        batch = collate(self.data, indices, self.pad_id, self.block_mask).to(self.dist.device)
        logits = self.engine(**batch.model_inputs()).logits
        return token_loss_sum(logits, batch.targets), batch.real_tokens

    def run(self, state: TrainState) -> TrainState:
        window_loss = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        window_targets = window_tokens = 0
        window_start = time.perf_counter()
        while state.step < self.max_steps:
            indices, next_position = self.sampler.next_batch(state.position)
            targets = int(self.data.n_targets[indices].sum())
            lr = self.engine.get_lr()[0]
            for micro in rank_micro_batches(indices, self.dist.rank, self.dist.world, self.micro_batch_size):
                loss_sum, real = self.forward_loss(micro)
                # DeepSpeed averages gradients over ranks; scale so the sum is the global token mean.
                self.engine.backward(loss_sum * (self.dist.world / targets), scale_wrt_gas=False)
                self.engine.step()
                window_loss += loss_sum.detach().double()
                window_tokens += real
            window_targets += targets
            state.step += 1
            state.position = next_position
            state.trained_tokens += targets
            state.samples += len(indices)
            if state.step % self.log_every == 0 or state.step == self.max_steps:
                loss, tokens = all_reduce_sum([window_loss.item(), float(window_tokens)], self.dist.device)
                elapsed = time.perf_counter() - window_start
                self.on_log(state.step, {
                    "loss": loss / window_targets, "lr": lr, "grad_norm": _float(self.engine.get_global_grad_norm()),
                    "tokens_per_sec": window_targets / elapsed, "total_tokens_per_sec": tokens / elapsed,
                    "trained_tokens": state.trained_tokens, "epoch": state.position.epoch})
                window_loss.zero_()
                window_targets = window_tokens = 0
                window_start = time.perf_counter()
            if self.on_step_end(state):
                break
        return state


def _float(value) -> Optional[float]:
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)


def evaluate(engine, data: PackedSet, dist: Dist, micro_batch_size: int, pad_id: int, block_mask: bool) -> dict:
    """Token-weighted loss and perplexity over the whole eval set, each rank taking every world-th batch."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=dist.device)
    order = np.arange(len(data))
    batches = [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    mine = batches[dist.rank::dist.world]
    # Under ZeRO-3 every forward is a collective: all ranks must run the same number of them.
    rounds = -(-len(batches) // dist.world)
    with torch.no_grad():
        for r in range(rounds):
            indices = mine[r] if r < len(mine) else batches[0]
            batch = collate(data, indices, pad_id, block_mask).to(dist.device)
            logits = engine(**batch.model_inputs()).logits
            if r < len(mine):
                total[0] += token_loss_sum(logits, batch.targets).double()
                total[1] += (batch.targets != -100).sum()
    engine.train()
    loss_sum, count = all_reduce_sum(total.tolist(), dist.device)
    loss = loss_sum / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": float(np.exp(min(loss, 50.0))), "eval_tokens": int(count)}
