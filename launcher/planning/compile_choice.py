"""Whether the model trains compiled: what `train.compile: auto` resolves to, decided once at plan time.

Measured on CPU (bench/RESULTS.md, Throughput): a compiled step is 8% faster on fixed-length rows and 15% on
packed chat rows, and the first step comes 13-15 s later. Compiling repays itself within COMPILE_MIN_STEPS
steps on both workloads (15 s / (8% of a 0.8 s step) = 230 steps on fixed rows, ~120 on chat rows), and
inductor caches its kernels on disk, so a relaunch pays less. `auto` therefore compiles every run that is long
enough and leaves eager what compiling cannot help or has not been verified for (at ZeRO-3 the trainer
compiles one decoder layer at a time, each a ZeRO-3 leaf module: trainer/model.compile_model):
- sequence parallelism (DeepSpeed's all-to-all autograd functions under torch.compile are unverified);
- mixture-of-experts models (data-dependent token counts per expert; the router-loss recorder);
- a host with no compiler for the device (inductor needs a C++ compiler on CPU, triton on GPUs).
A model without a readable config.json here (a hub model `plan` could not fetch: hub_snapshot) cannot be
checked for experts: `auto` stays `auto` and the trainer decides on the loaded model (eager when it has experts).
"""
from __future__ import annotations

from typing import Any, Optional, Union

from launcher.contract.config import RunConfig
from launcher.planning.host import HostFacts
from launcher.planning.moe_size import has_experts

COMPILE_MIN_STEPS = 200
EXPERTS_NOT_VERIFIED = "a mixture-of-experts model is not verified compiled"


def compile_blockers(cfg: RunConfig, model_config: Optional[dict[str, Any]], host: HostFacts) -> list[str]:
    """Why `train.compile: auto` leaves this run eager (empty: it compiles)."""
    t = cfg.train
    reasons = []
    if t.max_steps < COMPILE_MIN_STEPS:
        reasons.append(f"train.max_steps {t.max_steps} < {COMPILE_MIN_STEPS}: too short to repay compiling")
    if t.sequence_parallel != 1:
        reasons.append(f"train.sequence_parallel {t.sequence_parallel} is not verified compiled")
    if model_config is not None and has_experts(model_config):
        reasons.append(EXPERTS_NOT_VERIFIED)
    if (problem := host.compile_problem(cfg.launch.device)) is not None:
        reasons.append(problem)
    return reasons


def resolve_compile(cfg: RunConfig, model_config: Optional[dict[str, Any]],
                    host: HostFacts) -> tuple[Union[bool, str], Optional[str]]:
    """The value `train.compile` resolves to (after the ZeRO stage is chosen) and the note that says why."""
    if cfg.train.compile != "auto":
        return cfg.train.compile, None
    blockers = compile_blockers(cfg, model_config, host)
    if blockers:
        return False, f"train.compile=auto -> false: {'; '.join(blockers)}"
    if model_config is None:
        return "auto", ("train.compile=auto: decided at start-up, on the loaded model (compiled unless it has "
                        "experts)")
    return True, (f"train.compile=auto -> true ({cfg.train.max_steps} steps at ZeRO-{cfg.zero.stage}: compiling "
                  f"costs the first steps ~15 s on CPU and repays itself within {COMPILE_MIN_STEPS} steps)")
