"""Render the final DeepSpeed config: a template (or the user's JSON) with every "auto" filled.

The run config is the single source of truth. Each value DeepSpeed needs is derived from it once,
here; a user JSON that hard-codes a different value is a contradiction and an error, so the batch
arithmetic DeepSpeed checks with a bare assert at start-up is checked here, with the numbers shown.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Optional

from launcher.contract.config import RunConfig
from launcher.contract.errors import ConfigError
from launcher.contract.resources import data_dir
from launcher.planning.devices import accumulates_in_fp32, precision_for

# DeepSpeed's own bucket default (reduce_bucket_size, allgather_bucket_size), in elements.
DEFAULT_BUCKET = 500_000_000
NO_CLIP = 1e30

# The bucket rule. One collective costs a fixed latency α plus bytes / B. A bucket spends at most
# LATENCY_SHARE of its time on α when its bytes take at least (1 - share) / share × α to move, i.e. it holds
# at least 9 × α × B bytes. The α × B product is largest within a GPU node: NCCL's ring/tree start-up of
# ~25 µs against NVLink's ~400 GB/s bus bandwidth (H100; A100 ~240 GB/s) is 10 MB; across nodes
# (~50 µs, ~50 GB/s per GPU on 400 Gb/s InfiniBand) it is 2.5 MB, and gloo on CPU (~0.5 ms per DeepSpeed
# bucket, ~2 GB/s) 1 MB. The floor, 9 × 10 MB = 90 MB, keeps every one of them under 10 % latency.
COLLECTIVE_LATENCY_S = 25e-6
BUS_BANDWIDTH_BYTES_PER_S = 400e9
LATENCY_SHARE = 0.10
BUCKET_FLOOR_BYTES = round(COLLECTIVE_LATENCY_S * BUS_BANDWIDTH_BYTES_PER_S * (1 - LATENCY_SHARE) / LATENCY_SHARE)
GRADIENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
BUCKET_ALIGNMENT = 1024  # elements; DeepSpeed needs an even count (NCCL's 4-byte alignment of 16-bit shards)


def template_name(stage: int, offload_optimizer: str, offload_params: str) -> str:
    """File in ds_configs/ for a stage and offload choice."""
    if offload_params == "cpu":
        return "zero3_offload_all.json"
    if offload_optimizer == "cpu":
        return "zero2_offload.json" if stage in (1, 2) else "zero3_offload.json"
    return f"zero{stage}.json"


def load_template(cfg: RunConfig) -> tuple[dict, str]:
    """The user's DeepSpeed JSON if given, else the shipped template; with its name for messages."""
    if cfg.zero.config:
        path = Path(cfg.zero.config)
        try:
            return json.loads(path.read_text()), str(path)
        except FileNotFoundError:
            raise ConfigError([f"zero.config: {str(path)!r} does not exist"]) from None
        except json.JSONDecodeError as exc:
            raise ConfigError([f"zero.config: {path} is not valid JSON: {exc}"]) from None
    name = template_name(cfg.zero.stage, cfg.zero.offload_optimizer, cfg.zero.offload_params)
    return json.loads((data_dir("ds_configs") / name).read_text()), f"ds_configs/{name}"


def bucket_elements(precision: str, params: Optional[int]) -> int:
    """Elements of one reduce bucket (and ZeRO-3 prefetch bucket): the latency floor, capped by the model.

    The floor (BUCKET_FLOOR_BYTES of gradients in the training precision) keeps a collective's fixed
    latency under 10 % of its time on any interconnect we know; a larger bucket would buy at most that 10 %
    while costing memory (DeepSpeed allocates every reduce bucket whole, twice with overlap_comm) and
    leaving a longer reduction after the last layer's backward that nothing overlaps. A bucket larger
    than the model's parameter count would never fill, so the count caps it (rounded up to
    BUCKET_ALIGNMENT): a small model reduces all its gradients in one collective, as with DeepSpeed's 5e8.
    """
    floor = BUCKET_FLOOR_BYTES // GRADIENT_BYTES[precision]
    if params is None:
        return floor
    return min(floor, -(-params // BUCKET_ALIGNMENT) * BUCKET_ALIGNMENT)


def zero_defaults(cfg: RunConfig, hidden_size: Optional[int], params: Optional[int] = None) -> dict[str, Any]:
    """Our values for ZeRO's tuning knobs, by zero_optimization key; the memory planner sizes buffers by them.

    Reduce and prefetch buckets follow `bucket_elements`. The all-gather bucket stays DeepSpeed's 5e8: it
    is at or above the floor and costs no memory (DeepSpeed gathers into views of its flat parameter
    buffer; with all_gather_into_tensor, which NCCL and gloo have, it gathers each partition whole and
    does not read the number at all).
    """
    bucket = bucket_elements(precision_for(cfg.launch.device, cfg.train.precision), params)
    # On GPUs always; on CPU at ZeRO-3 (DeepSpeed's own default there), where overlapping the reduce-scatter
    # with backward measured 1.13 × the steps without it (bench/RESULTS.md, "A/B of the tuning defaults").
    overlap = (cfg.zero.overlap_comm if cfg.zero.overlap_comm is not None
               else cfg.launch.device == "cuda" or cfg.zero.stage == 3)
    return {"overlap_comm": overlap, "reduce_bucket_size": bucket, "allgather_bucket_size": DEFAULT_BUCKET,
            "stage3_prefetch_bucket_size": bucket,
            "stage3_param_persistence_threshold": 10 * (hidden_size or 1000)}


def derived_values(cfg: RunConfig, hidden_size: Optional[int],
                   params: Optional[int] = None) -> dict[str, tuple[Any, str]]:
    """Every DeepSpeed key shardtune decides, as dotted path -> (value, the run-config field behind it)."""
    t, z, device = cfg.train, cfg.zero, cfg.launch.device
    on_gpu = device == "cuda"
    world, sp = cfg.launch.world_size, t.sequence_parallel
    replicas = world // sp  # the ranks of a sequence-parallel group train the same rows
    replicas_name = "world" if sp == 1 else "data-parallel (world / train.sequence_parallel)"
    zd = zero_defaults(cfg, hidden_size, params)
    bucket_rule = "the bucket rule: 90 MB of gradients (9 × 25 µs × 400 GB/s), at most the model's parameters"
    values: dict[str, tuple[Any, str]] = {
        "train_batch_size": (t.micro_batch_size * t.grad_accum_steps * replicas,
                             f"train.micro_batch_size × train.grad_accum_steps × {replicas_name} = "
                             f"{t.micro_batch_size} × {t.grad_accum_steps} × {replicas}"),
        "train_micro_batch_size_per_gpu": (t.micro_batch_size, "train.micro_batch_size"),
        "gradient_accumulation_steps": (t.grad_accum_steps, "train.grad_accum_steps"),
        # DeepSpeed checks gradients for inf/NaN (and skips the step) only when clipping is on, so "no
        # clipping" becomes a bound no real gradient reaches.
        "gradient_clipping": (t.grad_clip or NO_CLIP, "train.grad_clip"),
        "optimizer.params.lr": (t.lr, "train.lr"),
        "optimizer.params.betas": (list(t.adam_betas), "train.adam_betas"),
        "optimizer.params.eps": (t.adam_eps, "train.adam_eps"),
        "optimizer.params.weight_decay": (t.weight_decay, "train.weight_decay"),
        # FusedAdam needs a compiled CUDA op (train.optimizer decides, from whether it can be built); with the
        # optimizer offloaded on GPUs DeepSpeedCPUAdam steps on the host instead.
        "optimizer.params.torch_adam": (t.optimizer == "torch" and not (on_gpu and z.offload_optimizer == "cpu"),
                                        "train.optimizer"),
        "bf16.enabled": (t.precision == "bf16", "train.precision"),
        "fp16.enabled": (t.precision == "fp16", "train.precision"),
        "zero_optimization.stage": (z.stage, "zero.stage"),
        "zero_optimization.overlap_comm": (zd["overlap_comm"], "zero.overlap_comm"),
        "zero_optimization.reduce_bucket_size": (zd["reduce_bucket_size"], bucket_rule),
        "zero_optimization.allgather_bucket_size": (zd["allgather_bucket_size"], "DeepSpeed default"),
        "zero_optimization.stage3_prefetch_bucket_size": (zd["stage3_prefetch_bucket_size"], bucket_rule),
        "zero_optimization.stage3_param_persistence_threshold": (zd["stage3_param_persistence_threshold"],
                                                                 "10 × model hidden size"),
        "zero_optimization.offload_optimizer.pin_memory": (on_gpu, "launch.device"),
        "zero_optimization.offload_param.pin_memory": (on_gpu, "launch.device"),
        # On CPU the "offloaded" optimizer is torch's AdamW; DeepSpeed insists on its CPUAdam unless told.
        "zero_force_ds_cpu_optimizer": (on_gpu, "launch.device"),
    }
    if sp > 1:
        # zero.Init reads it (it builds its DeepSpeed config without our mpu) to divide the world into replicas.
        values["sequence_parallel_size"] = (sp, "train.sequence_parallel")
    if values["optimizer.params.torch_adam"][0]:
        # One kernel over each tensor, in place: on CPU 5-10 x faster than the per-tensor update DeepSpeed would
        # otherwise get, and without its two fp32 temporaries (bench/RESULTS.md, "torch's AdamW on CPU").
        values["optimizer.params.fused"] = (True, "train.optimizer (torch's fused AdamW kernels)")
    if accumulates_in_fp32(t.precision, z.stage, t.grad_accum_steps):
        values["data_types.grad_accum_dtype"] = ("fp32", f"train.precision {t.precision} with accumulation "
                                                          f"{t.grad_accum_steps} (sums kept in fp32)")
    return values


def _get(tree: dict, dotted: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1)
    return a == b


def _remaining_autos(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _remaining_autos(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if tree == "auto" else []


# Tuning keys that only mean something when the template has them (no offload section => no pin_memory).
_FILL_ONLY_IF_PRESENT = ("zero_optimization.offload_optimizer.", "zero_optimization.offload_param.",
                         "zero_optimization.stage3_", "zero_optimization.reduce_bucket_size",
                         "zero_optimization.allgather_bucket_size", "zero_optimization.overlap_comm")


# Our defaults for tuning knobs, not facts of the run config: a number in the user's own JSON wins.
_TUNABLE = ("zero_optimization.reduce_bucket_size", "zero_optimization.allgather_bucket_size",
            "zero_optimization.stage3_prefetch_bucket_size", "zero_optimization.stage3_param_persistence_threshold",
            "zero_optimization.offload_optimizer.pin_memory", "zero_optimization.offload_param.pin_memory",
            "optimizer.params.torch_adam", "optimizer.params.fused", "data_types.grad_accum_dtype")


def _tunable(dotted: str, cfg: RunConfig) -> bool:
    if dotted == "zero_optimization.overlap_comm":
        return cfg.zero.overlap_comm is None  # set in the run config, it must agree
    return dotted in _TUNABLE


def sequence_parallel_reduction_problems(ds: dict, cfg: RunConfig, source: str) -> list[str]:
    """Settings that change how DeepSpeed reduces gradients under sequence parallelism, which the trainer's loss
    scaling (trainer/sequence_parallel.py) is derived for: DeepSpeed's defaults, and reduce-scatter at ZeRO-3."""
    if cfg.train.sequence_parallel == 1:
        return []
    problems = []
    z = ds.get("zero_optimization") or {}
    if z.get("stage") == 3 and z.get("reduce_scatter", True) is not True:
        problems.append(f"{source}: zero_optimization.reduce_scatter must stay true at ZeRO-3 with "
                        f"train.sequence_parallel {cfg.train.sequence_parallel} (without it, DeepSpeed reduces "
                        f"gradients larger than its bucket differently from smaller ones)")
    for key, default in (("prescale_gradients", False), ("gradient_predivide_factor", 1.0),
                         ("data_parallel_size", None)):
        if key in ds and ds[key] != default:
            problems.append(f"{source}: remove {key} ({ds[key]!r}) with train.sequence_parallel "
                            f"{cfg.train.sequence_parallel}: the loss scaling under sequence parallelism assumes "
                            f"DeepSpeed's default")
    return problems


def render_deepspeed_config(cfg: RunConfig, hidden_size: Optional[int] = None, params: Optional[int] = None) -> dict:
    """The final DeepSpeed dict for a resolved run config (no "auto" left), or every contradiction at once.

    hidden_size and params (the parameter count) come from the model's config.json when it is on disk.
    """
    template, source = load_template(cfg)
    ds = copy.deepcopy(template)
    ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    offloading = _get(ds, "zero_optimization.offload_optimizer.device")[1] not in (None, "none")
    problems = []
    for dotted, (value, origin) in derived_values(cfg, hidden_size, params).items():
        present, current = _get(ds, dotted)
        if not present:
            if dotted.startswith(_FILL_ONLY_IF_PRESENT):
                continue
            if dotted == "zero_force_ds_cpu_optimizer" and not offloading:
                continue
            adam = ds["optimizer"].get("type", "").lower() in ("adam", "adamw")
            if dotted.startswith("optimizer.params.") and not adam:
                continue
            _set(ds, dotted, value)
        elif current == "auto":
            _set(ds, dotted, value)
        elif not _same(current, value) and not (cfg.zero.config and _tunable(dotted, cfg)):
            # a user's JSON, or a shipped template that would silently win
            problems.append(f"{source}: {dotted} is {current!r} but {origin} gives {value!r}")
    if "scheduler" in ds:
        problems.append(f"{source}: remove 'scheduler'; shardtune drives the learning rate from "
                        "train.lr_schedule, train.warmup_steps and train.min_lr_ratio")
    offload = _get(ds, "zero_optimization.offload_optimizer.device")[1] or "none"
    if offload != cfg.zero.offload_optimizer:
        problems.append(f"{source}: zero_optimization.offload_optimizer.device is {offload!r} but "
                        f"zero.offload_optimizer is {cfg.zero.offload_optimizer!r}")
    problems += [f"{source}: {key} is still \"auto\" and shardtune has no value for it" for key in _remaining_autos(ds)]
    problems += sequence_parallel_reduction_problems(ds, cfg, source)
    if problems:
        raise ConfigError(problems, title="DeepSpeed config contradicts the run config")
    return ds
