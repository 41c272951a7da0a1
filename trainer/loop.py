"""The training loop, on one screen: batch -> forward -> backward -> step -> metrics -> maybe save.

The loss is the token-weighted mean over the whole global batch: each micro-batch contributes its
sum of token losses divided by the global batch's count of trained tokens (known in advance from
the packed data). That is what an unsharded run computes, for any world size and accumulation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from trainer import faults
from trainer.data.collate import Separation, collate
from trainer.data.packing import PackedSet
from trainer.data.sampler import DataPosition, GlobalBatchSampler, rank_micro_batches
from trainer.distributed import Dist, all_reduce_max, all_reduce_sum
from trainer.flops import ModelFlops
from trainer.metrics import Window
from trainer.model import token_loss_sum
from trainer.nonfinite import SkipJudge


@dataclass
class TrainState:
    """Everything besides model and optimizer that a resumed run needs; saved as JSON."""

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    trained_tokens: int = 0
    samples: int = 0
    skipped_steps: int = 0
    """Steps skipped for a non-finite loss or gradient that no loss scaling absorbed."""
    loss_scale_skips: int = 0
    """fp16 steps skipped while the dynamic loss scale found its level (normal, not counted as bad)."""
    bad_streak: int = 0
    wandb_run_id: Optional[str] = None

    def to_json(self) -> dict:
        return {**asdict(self), "position": self.position.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> "TrainState":
        return cls(**{**d, "position": DataPosition(**d["position"])})

    def advance(self, position: DataPosition, targets: int, sequences: int, outcome: str = "ok") -> None:
        """One optimizer step done; outcome is SkipJudge's: "ok", "loss_scale" or "bad"."""
        self.step += 1
        self.position = position
        self.trained_tokens += targets if outcome == "ok" else 0
        self.samples += sequences
        self.skipped_steps += outcome == "bad"
        self.loss_scale_skips += outcome == "loss_scale"
        self.bad_streak = self.bad_streak + 1 if outcome == "bad" else 0


class TooManyBadSteps(Exception):
    """train.max_bad_steps consecutive steps had a non-finite loss or gradient norm."""


@dataclass
class Loop:
    engine: object
    data: PackedSet
    sampler: GlobalBatchSampler
    dist: Dist
    micro_batch_size: int
    pad_id: int
    separation: Separation
    max_steps: int
    log_every: int
    max_bad_steps: int
    on_log: Callable[[int, dict], None]
    on_step_end: Callable[[TrainState], bool]
    """Called after every optimizer step (eval, checkpoints, stop requests); True stops the loop."""
    flops: Optional[ModelFlops] = None
    peak_tflops: Optional[float] = None
    recompute: bool = False
    beat: Callable[..., None] = lambda phase, step=None: None
    """Heartbeat: the watchdog's evidence that this rank is making progress."""
    skip_judge: SkipJudge = field(default_factory=SkipJudge)

    def batch(self, indices: np.ndarray, step: int):
        self.beat("data", step)
        faults.maybe_hang("hang_in_data", step, self.dist.rank)
        return collate(self.data, indices, self.pad_id, self.separation).to(self.dist.device)

    def run(self, state: TrainState) -> TrainState:
        window = Window(self.dist, self.flops, self.peak_tflops, self.recompute)
        rank, world = self.dist.rank, self.dist.world
        while state.step < self.max_steps:
            step = state.step + 1
            faults.maybe_kill("crash", step, rank)
            logs = step % self.log_every == 0 or step == self.max_steps
            indices, next_position = self.sampler.next_batch(state.position)
            targets, lengths = int(self.data.n_targets[indices].sum()), self.data.sample_lengths(indices)
            lr, skipped_before = self.engine.get_lr()[0], self.engine.skipped_steps
            step_loss = torch.zeros_like(window.loss)
            window.start_step()
            self.skip_judge.before_step()
            micros = rank_micro_batches(indices, rank, world, self.micro_batch_size)
            for i, micro in enumerate(micros):
                batch = window.timed_batch(lambda: self.batch(micro, step))
                self.beat("forward")
                loss_sum = faults.corrupt_loss(token_loss_sum(self.engine(**batch.model_inputs()).logits, batch.targets),
                                               step, rank)
                if i == len(micros) - 1:
                    window.local_work_done(sync=logs)
                self.beat("backward")
                # DeepSpeed averages gradients over ranks; scale so the sum is the global token mean.
                self.engine.backward(loss_sum * (world / targets), scale_wrt_gas=False)
                self.beat("step")
                self.engine.step()
                step_loss += loss_sum.detach().double()
            skipped = self.engine.skipped_steps != skipped_before  # DeepSpeed agreed on it across ranks
            # Only a skipped step asks every rank whether its loss was finite (all ranks skip together).
            loss_finite = not skipped or all_reduce_max([float(not torch.isfinite(step_loss).item())],
                                                        self.dist.device)[0] == 0
            outcome = self.skip_judge.judge(skipped, loss_finite)
            window.end_step(step_loss, targets, int(lengths.sum()), len(lengths), int((lengths.astype(np.int64) ** 2).sum()),
                            skipped)
            state.advance(next_position, targets, len(indices), outcome)
            if outcome == "bad" or logs:
                scale = self.skip_judge.loss_scale
                self.on_log(step, {**window.metrics(), "lr": lr, "grad_norm": _float(self.engine.get_global_grad_norm()),
                                   "skipped_steps": state.skipped_steps, "trained_tokens": state.trained_tokens,
                                   "epoch": state.position.epoch,
                                   **({"loss_scale": scale, "loss_scale_skips": state.loss_scale_skips}
                                      if scale is not None else {})})
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


def evaluate(engine, data: PackedSet, dist: Dist, micro_batch_size: int, pad_id: int, separation: Separation) -> dict:
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
            batch = collate(data, indices, pad_id, separation).to(dist.device)
            logits = engine(**batch.model_inputs()).logits
            if r < len(mine):
                total[0] += token_loss_sum(logits, batch.targets).double()
                total[1] += (batch.targets != -100).sum()
    engine.train()
    loss_sum, count = all_reduce_sum(total.tolist(), dist.device)
    loss = loss_sum / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": float(np.exp(min(loss, 50.0))), "eval_tokens": int(count)}
