"""The training loop, on one screen: batch -> forward -> backward -> step -> metrics -> maybe save.

The loss is the token-weighted mean over the whole global batch: each micro-batch contributes its
sum of token losses divided by the global batch's count of trained tokens (known in advance from
the packed data). That is what an unsharded run computes, for any world size and accumulation.
"""
from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
import psutil
import torch

from trainer import faults
from trainer.data.collate import collate
from trainer.data.packing import PackedSet
from trainer.data.sampler import DataPosition, GlobalBatchSampler, rank_micro_batches
from trainer.distributed import Dist, all_reduce_max, all_reduce_sum
from trainer.model import token_loss_sum


@dataclass
class TrainState:
    """Everything besides model and optimizer that a resumed run needs; saved as JSON."""

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    trained_tokens: int = 0
    samples: int = 0
    skipped_steps: int = 0
    bad_streak: int = 0
    wandb_run_id: Optional[str] = None

    def to_json(self) -> dict:
        return {**asdict(self), "position": self.position.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> "TrainState":
        return cls(**{**d, "position": DataPosition(**d["position"])})


class TooManyBadSteps(Exception):
    """train.max_bad_steps consecutive steps had a non-finite loss or gradient norm."""


class _Window:
    """Sums over the steps since the last log; one all-reduce and one host sync when logging."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.reset()

    def reset(self) -> None:
        self.loss.zero_()
        self.targets = self.tokens = self.steps = self.skipped = 0
        self.start = time.perf_counter()

    def metrics(self, dist: Dist) -> dict:
        loss, tokens = all_reduce_sum([self.loss.item(), float(self.tokens)], dist.device)
        elapsed = time.perf_counter() - self.start
        kept = self.targets if self.steps > self.skipped else 0
        return {"loss": loss / kept if kept else None, "tokens_per_sec": self.targets / elapsed,
                "total_tokens_per_sec": tokens / elapsed, "step_time": elapsed / max(self.steps, 1),
                **memory_metrics(dist)}


def memory_metrics(dist: Dist) -> dict:
    """Peaks over all ranks (the rank closest to running out is the one that matters), in GB (1e9 bytes)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    rss = psutil.Process().memory_info().rss
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the kernel's own high-water mark
    values = all_reduce_max([acc.max_memory_allocated(), acc.max_memory_reserved(), rss, peak_rss], dist.device)
    names = ("mem_device_allocated_peak_gb", "mem_device_reserved_peak_gb", "mem_host_rss_gb", "mem_host_peak_rss_gb")
    return {name: round(v / 1e9, 4) for name, v in zip(names, values)}


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
    max_bad_steps: int
    on_log: Callable[[int, dict], None]
    on_step_end: Callable[[TrainState], bool]
    """Called after every optimizer step (eval, checkpoints, stop requests); True stops the loop."""

    def forward_loss(self, indices: np.ndarray, step: int) -> tuple[torch.Tensor, int]:
        batch = collate(self.data, indices, self.pad_id, self.block_mask).to(self.dist.device)
        logits = self.engine(**batch.model_inputs()).logits
        return faults.corrupt_loss(token_loss_sum(logits, batch.targets), step, self.dist.rank), batch.real_tokens

    def run(self, state: TrainState) -> TrainState:
        window = _Window(self.dist.device)
        while state.step < self.max_steps:
            step = state.step + 1
            faults.maybe_kill("crash", step, self.dist.rank)
            indices, next_position = self.sampler.next_batch(state.position)
            targets = int(self.data.n_targets[indices].sum())
            lr, skipped_before = self.engine.get_lr()[0], self.engine.skipped_steps
            step_loss, step_tokens = torch.zeros_like(window.loss), 0
            for micro in rank_micro_batches(indices, self.dist.rank, self.dist.world, self.micro_batch_size):
                loss_sum, real = self.forward_loss(micro, step)
                # DeepSpeed averages gradients over ranks; scale so the sum is the global token mean.
                self.engine.backward(loss_sum * (self.dist.world / targets), scale_wrt_gas=False)
                self.engine.step()
                step_loss += loss_sum.detach().double()
                step_tokens += real
            skipped = self.engine.skipped_steps != skipped_before  # DeepSpeed agreed on it across ranks
            state.step, state.position = step, next_position
            state.trained_tokens += 0 if skipped else targets
            state.samples += len(indices)
            state.skipped_steps += skipped
            state.bad_streak = state.bad_streak + 1 if skipped else 0
            window.steps, window.skipped, window.tokens = window.steps + 1, window.skipped + skipped, window.tokens + step_tokens
            if not skipped:
                window.loss += step_loss
                window.targets += targets
            if skipped or step % self.log_every == 0 or step == self.max_steps:
                self.on_log(step, {**window.metrics(self.dist), "lr": lr, "grad_norm": _float(self.engine.get_global_grad_norm()),
                                   "skipped_steps": state.skipped_steps, "trained_tokens": state.trained_tokens,
                                   "epoch": state.position.epoch})
                window.reset()
            if state.bad_streak >= self.max_bad_steps:
                raise TooManyBadSteps(f"step {step}: {state.bad_streak} consecutive steps with a non-finite loss or "
                                      f"gradient norm (train.max_bad_steps={self.max_bad_steps})")
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
