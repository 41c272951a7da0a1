"""The training loop, on one screen: batch -> forward -> backward -> step -> metrics -> maybe save.

The loss is the token-weighted mean over the whole global batch: each micro-batch contributes its
sum of token losses divided by the global batch's count of trained tokens (known in advance from
the packed data). That is what an unsharded run computes, for any world size and accumulation.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from launcher.contract.errors import UserError
from trainer.data.collate import Batch, Separation, collate
from trainer.data.packing import PackedSet
from trainer.data.sampler import DataPosition, GlobalBatchSampler, rank_micro_batches
from trainer.distributed import Dist, all_reduce_max, all_reduce_sum
from trainer.faults import FaultHooks
from trainer.loss import LossFn, full_logits_loss
from trainer.metrics import Window
from trainer.model import set_training
from trainer.moe import NoRouterAuxLoss
from trainer.nonfinite import SkipJudge
from trainer.sequence_parallel import SequenceParallel
from trainer.watchdog import NoHeartbeat


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
    def from_json(cls, d: dict) -> TrainState:
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


class TooManyBadSteps(UserError):
    """train.max_bad_steps consecutive steps had a non-finite loss or gradient norm."""


@dataclass(kw_only=True)
class Loop:
    """One optimizer step after another until max_steps or a stop; everything around a step is a hook."""

    engine: Any
    data: PackedSet
    sampler: GlobalBatchSampler
    dist: Dist
    micro_batch_size: int
    pad_id: int
    separation: Separation
    max_steps: int
    log_every: int
    max_bad_steps: int
    window: Window
    on_log: Callable[[int, dict], None]
    on_step_end: Callable[[TrainState], bool]
    """Called after every optimizer step (eval, checkpoints, stop requests); True stops the loop."""
    heartbeat: NoHeartbeat
    """The watchdog's evidence that this rank is making progress."""
    faults: FaultHooks
    skip_judge: SkipJudge
    router_aux: NoRouterAuxLoss = field(default_factory=NoRouterAuxLoss)
    """MoE models: the router load-balancing loss added to the backward pass (not to `loss`)."""
    loss: LossFn = full_logits_loss
    """(engine, batch) -> the batch's summed token loss: full logits or chunked (trainer/loss.py)."""
    sp: SequenceParallel = field(default_factory=SequenceParallel)
    """This rank's sequence-parallel group: which rows it takes, which slice of them, how its loss is scaled."""
    activation_offload: Callable[[], AbstractContextManager] = contextlib.nullcontext
    """Context around each micro-batch's forward and backward (checkpointed inputs offloaded to the host)."""
    width: Optional[int] = None
    """A compiled model's one batch width (data.seq_len); None: each micro-batch as wide as its longest row."""

    def run(self, state: TrainState) -> TrainState:
        while state.step < self.max_steps:
            step = state.step + 1
            self.faults.step_started(step)
            logs = step % self.log_every == 0 or step == self.max_steps
            indices, next_position = self.sampler.next_batch(state.position)
            lr, skipped_before = self.engine.get_lr()[0], self.engine.skipped_steps
            self.window.start_step()
            self.skip_judge.before_step()
            step_loss = self.train_step(step, indices, sync=logs)
            skipped = self.engine.skipped_steps != skipped_before  # DeepSpeed agreed on it across ranks
            outcome = self.skip_judge.judge(skipped, self.loss_finite_everywhere(step_loss, skipped))
            self.window.end_step(step_loss, self.data, indices, skipped)
            state.advance(next_position, int(self.data.n_targets[indices].sum()), len(indices), outcome)
            if outcome == "bad" or logs:
                self.on_log(step, self.step_metrics(state, lr))
            if state.bad_streak >= self.max_bad_steps:
                raise TooManyBadSteps(f"step {step}: {state.bad_streak} consecutive steps with a non-finite loss or "
                                      f"gradient norm (train.max_bad_steps={self.max_bad_steps})")
            if self.on_step_end(state):
                break
        return state

    def train_step(self, step: int, indices: np.ndarray, sync: bool) -> torch.Tensor:
        """Forward, backward and step over this rank's micro-batches of the global batch; its summed token loss."""
        targets = int(self.data.n_targets[indices].sum())
        micros = rank_micro_batches(indices, self.sp.replica(self.dist), self.sp.replicas(self.dist),
                                    self.micro_batch_size)
        # DeepSpeed averages gradients over ranks; scale so the sum is the global token mean.
        factor = self.sp.gradient_factor(self.engine.zero_optimization_stage(), self.dist.world)
        step_loss = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        for i, micro in enumerate(micros):
            batch = self.window.timed_batch(lambda micro=micro: self.batch(micro, step))
            self.heartbeat.beat("forward")
            with self.activation_offload():
                with self.router_aux.recording():
                    loss_sum = self.faults.loss(self.loss(self.engine, batch), step)
                aux = self.router_aux.loss_share(batch.token_mask, len(micros), factor)
                if i == len(micros) - 1:
                    self.window.local_work_done(sync=sync)
                self.heartbeat.beat("backward")
                objective = loss_sum * (factor / targets)
                self.engine.backward(objective if aux is None else objective + aux, scale_wrt_gas=False)
            self.heartbeat.beat("step")
            self.engine.step()
            step_loss += loss_sum.detach().double()
        return step_loss

    def batch(self, indices: np.ndarray, step: int) -> Batch:
        self.heartbeat.beat("data", step)
        self.faults.loading_batch(step)
        batch = collate(self.data, indices, self.pad_id, self.separation, multiple_of=self.sp.multiple_of,
                        width=self.width)
        return self.sp.shard(batch).to(self.dist.device)

    def loss_finite_everywhere(self, step_loss: torch.Tensor, skipped: bool) -> bool:
        """Only a skipped step asks every rank whether its loss was finite (all ranks skip together)."""
        if not skipped:
            return True
        return all_reduce_max([float(not torch.isfinite(step_loss).item())], self.dist.device)[0] == 0

    def step_metrics(self, state: TrainState, lr: float) -> dict:
        """The window's rates and memory, and the optimizer's view of this step."""
        scale = self.skip_judge.loss_scale
        row = {**self.window.metrics(), "lr": lr, "grad_norm": _float(self.engine.get_global_grad_norm()),
               "skipped_steps": state.skipped_steps, "trained_tokens": state.trained_tokens,
               "epoch": state.position.epoch}
        if scale is not None:
            row.update(loss_scale=scale, loss_scale_skips=state.loss_scale_skips)
        row.update(self.router_aux.metrics())
        self.window.reset()
        return row


def _float(value) -> Optional[float]:
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)


def held_out_loss(engine, data: PackedSet, dist: Dist, micro_batch_size: int, pad_id: int, separation: Separation,
                  loss: LossFn = full_logits_loss, sp: SequenceParallel = SequenceParallel(),
                  heartbeat: Optional[NoHeartbeat] = None, width: Optional[int] = None) -> dict:
    """Token-weighted loss and perplexity over the whole eval set, each data-parallel replica taking every
    replicas-th batch (the ranks of a sequence-parallel group each compute their slice of the same batch)."""
    set_training(engine, False)
    total = torch.zeros(2, dtype=torch.float64, device=dist.device)
    order = np.arange(len(data))
    batches = [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    replicas = sp.replicas(dist)
    mine = batches[sp.replica(dist)::replicas]
    # Under ZeRO-3 (and sequence parallelism) every forward is a collective: all ranks must run the same number.
    rounds = -(-len(batches) // replicas)
    with torch.no_grad():
        for r in range(rounds):
            if heartbeat is not None:
                heartbeat.beat("eval")  # progress: a long evaluation is not a stall
            indices = mine[r] if r < len(mine) else batches[0]
            batch = collate(data, indices, pad_id, separation, multiple_of=sp.multiple_of, width=width)
            batch = sp.shard(sp.fill_rows(batch, micro_batch_size)).to(dist.device)
            loss_sum = loss(engine, batch)
            if r < len(mine):
                total[0] += loss_sum.double()
                total[1] += (batch.targets != -100).sum()
    set_training(engine, True)
    loss_sum, count = all_reduce_sum(total.tolist(), dist.device)
    loss = loss_sum / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": float(np.exp(min(loss, 50.0))), "eval_tokens": int(count)}
