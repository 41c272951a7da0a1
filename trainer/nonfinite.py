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
