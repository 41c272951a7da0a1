"""Steps with a NaN or inf loss or gradient norm are skipped by every rank together.

DeepSpeed's ZeRO optimizers already do this: the gradient norm is all-reduced, and when it is not
finite the step is dropped, gradients are cleared, and the LR schedule does not advance
(`engine.skipped_steps` counts it). A NaN loss on one rank makes that rank's gradients NaN, so the
all-reduced norm is NaN on every rank. Without ZeRO (stage 0) DeepSpeed would apply the NaN;
`install_guard` gives stage 0 the same behaviour. The norm check needs clipping to be on, which is
why the launcher renders `train.grad_clip: 0` as a bound that never clips.
"""
from __future__ import annotations

import math

import torch


def install_guard(engine) -> None:
    """Make a plain-optimizer (ZeRO-0) engine skip non-finite steps the way ZeRO engines do."""
    if engine.zero_optimization() or not isinstance(engine.optimizer, torch.optim.Optimizer):
        return
    from deepspeed.runtime.utils import clip_grad_norm_

    optimizer = engine.optimizer
    apply_step = optimizer.step

    def clip_and_remember_norm() -> None:
        # Gradients are already averaged over ranks here, so every rank sees the same norm.
        engine._global_grad_norm = clip_grad_norm_(engine.module.parameters(), max_norm=engine.gradient_clipping(),
                                                   mpu=engine.mpu)

    def guarded_step(*args, **kwargs):
        norm = engine._global_grad_norm
        optimizer.overflow = norm is not None and not math.isfinite(float(norm))  # read by DeepSpeed's step
        return None if optimizer.overflow else apply_step(*args, **kwargs)

    engine.clip_fp32_gradients = clip_and_remember_norm
    optimizer.step = guarded_step
    optimizer.overflow = False


def dynamic_loss_scaler(engine):
    """DeepSpeed's dynamic loss scaler (fp16 only), or None when no loss scaling can absorb an overflow."""
    scaler = getattr(getattr(engine, "optimizer", None), "loss_scaler", None)
    return scaler if getattr(scaler, "dynamic", False) else None


class SkipJudge:
    """Tells a step skipped for an fp16 loss-scale overflow (expected, absorbed) from a bad one.

    With fp16's dynamic loss scale (initial 2^16, hysteresis 2), overflows at start-up are how the scale
    finds its level: DeepSpeed skips the step and lowers the scale (or spends hysteresis). Such a skip is
    not a sign of divergence. A skip is bad when the loss itself was not finite on some rank (no scale
    makes a NaN forward finite), or when there is no loss scaling left to absorb it: no dynamic scaler
    (bf16, fp32), or the scale is already at its minimum.
    """

    def __init__(self, scaler=None):
        self.scaler = scaler
        self._before: tuple = ()

    def _state(self) -> tuple:
        s = self.scaler
        return (s.cur_scale, s.cur_hysteresis) if s is not None else ()

    def before_step(self) -> None:
        self._before = self._state()

    @property
    def loss_scale(self):
        return None if self.scaler is None else float(self.scaler.cur_scale)

    def judge(self, skipped: bool, loss_finite: bool) -> str:
        """"ok", "loss_scale" (an overflow the scaler absorbed) or "bad"; `loss_finite` must be agreed by all ranks."""
        if not skipped:
            return "ok"
        if self.scaler is None or not loss_finite:
            return "bad"
        scale, hysteresis = self._before
        absorbed = self.scaler.cur_scale < scale or self.scaler.cur_hysteresis < hysteresis
        return "loss_scale" if absorbed else "bad"
