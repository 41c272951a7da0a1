"""The memory planner inside `plan` and `launch`: fill every `auto` it owns, show per-device memory, refuse
what does not fit, all before anything is queued.

`apply_auto_choice` gives `zero.stage`, `zero.offload_optimizer`, `zero.offload_params`,
`train.micro_batch_size` (and with it `train.grad_accum_steps`) and `train.activation_checkpointing`
their values when they are `auto`, using autochoice's order: less communication and no offload first,
then no activation checkpointing, then the largest micro batch that divides each rank's share of
`train.global_batch_size`. Every decision comes back as a note that says why.

Offload is a choice only when the config says so: `zero.offload_optimizer: auto` (and
`zero.offload_params: auto`) let the planner offload when nothing fits without it; `none` always means
none, also under `zero.stage: auto`. Offloading moves the optimizer step to the CPU and typically costs
several times the step time, so it is opted into, not slipped in; when only offload would fit, the
refusal says so with the numbers.

`memory_summary` estimates the resolved run (for every plan, auto or not) and `check_fit` refuses a
run whose estimate exceeds `launch.gpu_memory_gb`. Nothing here imports torch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from textwrap import indent
from typing import Optional

from launcher.contract.config import RunConfig, batch_split_problems, replicas_words, sequence_parallel_problems
from launcher.contract.errors import ConfigError
from launcher.planning.deepspeed_config import zero_defaults
from launcher.planning.devices import accumulates_in_fp32, precision_for
from launcher.planning.fastest_fit import (
    DoesNotFit,
    LongContext,
    choose_configuration,
    component_table,
    longest_seq_len,
)
from launcher.planning.memory import (
    GB,
    TIGHT_WHY,
    Margins,
    MemoryEstimate,
    Setup,
    ZeroSettings,
    estimate_memory,
    offloaded_input_bytes,
)
from launcher.planning.model_size import ModelCounts, approximate_moe_reason, counts_from_config
from launcher.planning.sequence_parallel import candidates, sequence_parallel_size

# On CPU the "device" is the process's own RAM, measured by bench/memory.py: no CUDA context or NCCL, but
# 0.4 GB of process runtime (imports, gloo, tokenizer, data) in their place; and glibc's malloc keeps the
# freed forward/backward memory in its heap while the optimizer step maps its large buffers on top, so
# the transient counts about twice (fragmentation = 100% of it) instead of a GPU allocator's 10%.
# Tensors above glibc's largest mmap threshold (32 MiB: the full loss's logits, a loss chunk's) are mapped and
# unmapped on their own and do not count twice (bench/long_context.py: the full-logits loss at 4k tokens).
# Nothing is pinned: offloaded buffers take the bytes DeepSpeed asks for.
CPU_MARGINS = Margins(cuda_context_gb=0.4, nccl_gb=0.0, fragmentation=1.0, mapped_above=32 * 2 ** 20,
                      pinned_rounding=None)


def auto_fields(cfg: RunConfig) -> list[str]:
    """The config fields the memory planner is asked to choose, by dotted name."""
    fields = {"zero.stage": cfg.zero.stage, "zero.offload_optimizer": cfg.zero.offload_optimizer,
              "zero.offload_params": cfg.zero.offload_params, "train.micro_batch_size": cfg.train.micro_batch_size,
              "train.activation_checkpointing": cfg.train.activation_checkpointing,
              "train.sequence_parallel": cfg.train.sequence_parallel}
    return [name for name, value in fields.items() if value == "auto"]


def margins_for(cfg: RunConfig) -> Margins:
    return CPU_MARGINS if cfg.launch.device == "cpu" else Margins()


def optimizer_of(ds_config: dict) -> str:
    """memory.Setup's optimizer for a rendered DeepSpeed config: "torch" only for torch's unfused AdamW, whose
    update allocates temporaries; the launcher renders FusedAdam, CPUAdam or torch's fused AdamW, all in place."""
    params = (ds_config.get("optimizer") or {}).get("params") or {}
    return "torch" if params.get("torch_adam") is True and params.get("fused") is not True else "fused"


def _int_or_none(value) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def precision_of(cfg: RunConfig) -> str:
    """The resolved precision, also for a caller that did not resolve the config first."""
    return precision_for(cfg.launch.device, cfg.train.precision)


def zero_settings(cfg: RunConfig, hidden_size: Optional[int], params: Optional[int] = None) -> ZeroSettings:
    """The bucket settings render_deepspeed_config will write, known before the stage is: our defaults,
    or the numbers in the user's `zero.config` where it has them (and its communication_data_type)."""
    ours = zero_defaults(cfg, hidden_size, params)
    zero, top = dict(ours), {}
    if cfg.zero.config:
        try:
            top = json.loads(Path(cfg.zero.config).read_text())
            user = top.get("zero_optimization") or {}
        except (OSError, ValueError, AttributeError):
            top, user = {}, {}  # render_deepspeed_config reports an unreadable zero.config, naming the field
        zero = {key: ours.get(key) if value == "auto" else value for key, value in user.items()}
    return ZeroSettings.from_deepspeed({"zero_optimization": zero,
                                        "communication_data_type": top.get("communication_data_type")})


def long_context_of(cfg: RunConfig, counts: Optional[ModelCounts], sequence_parallel: Optional[int] = None,
                    model_config: Optional[dict] = None) -> LongContext:
    """The long-sequence settings of a config as the planner sees them (checkpoint offload only counts on GPUs:
    on CPU the host is the device), with the group sizes its remedies may try."""
    t = cfg.train
    return LongContext(sequence_parallel=sequence_parallel or sequence_parallel_size(cfg),
                       chunked_loss=t.chunked_loss is True, tiled_mlp=t.tiled_mlp,
                       offload_checkpoints=t.activation_checkpointing == "offload" and cfg.launch.device == "cuda",
                       allowed_sequence_parallel=tuple(allowed_groups(cfg, counts, model_config or {})))


def allowed_groups(cfg: RunConfig, counts: Optional[ModelCounts], model_config: dict) -> list[int]:
    """Every sequence-parallel group size the world, the sequence length, the model's attention and the global
    batch allow, smallest first."""
    t = cfg.train
    micro = None if t.micro_batch_size == "auto" else int(t.micro_batch_size)
    return [n for n in candidates(cfg, counts, model_config) if t.global_batch_size is None
            or not batch_split_problems(t.global_batch_size, micro, cfg.launch.world_size, n)]


def _sequence_parallel_options(cfg: RunConfig, counts: ModelCounts, model_config: dict) -> list[int]:
    """Group sizes to try, smallest first: the configured one, or for `auto` every allowed one."""
    t = cfg.train
    return [t.sequence_parallel] if t.sequence_parallel != "auto" else allowed_groups(cfg, counts, model_config)


def _counts(cfg: RunConfig, model_config: Optional[dict], why: str) -> ModelCounts:
    if model_config is None:
        name = cfg.model.name_or_path
        raise ConfigError([
            f"model.name_or_path: {name!r} has no config.json on this disk, and {why} needs the model's shape "
            f"from it. Download the model first (e.g. `huggingface-cli download {name} --local-dir DIR`) and "
            f"set model.name_or_path to DIR, or set the fields yourself (`shardtune estimate --params=N "
            f"--gpus=G --gpu_memory_gb=M` shows what fits for a parameter count)"], title="cannot plan memory")
    return counts_from_config(model_config, source=f"{cfg.model.name_or_path}/config.json")


def refuse_approximate_moe(cfg: RunConfig, counts: ModelCounts) -> None:
    """A mixture of experts sized only approximately could be off by a third: no fit verdict on it unless forced."""
    reason = approximate_moe_reason(counts)
    if reason and not cfg.launch.force_approximate_fit:
        raise ConfigError([f"launch.gpu_memory_gb: {cfg.launch.gpu_memory_gb:g} GB cannot be checked: {reason}. "
                           f"Set launch.force_approximate_fit: true to plan with this estimate anyway, or remove "
                           f"launch.gpu_memory_gb (and the `auto` settings that need it)"], title="cannot plan memory")


def apply_auto_choice(cfg: RunConfig, model_config: Optional[dict]) -> list[str]:
    """Replace every `auto` the memory planner owns in `cfg` (a copy, mutated in place); one note per decision.

    Raises ConfigError naming launch.gpu_memory_gb when it is missing, model.name_or_path when its
    config.json is not local, and, titled "does not fit", when nothing allowed fits: with the reasons,
    the component table of the most frugal allowed configuration and what would make it fit.
    """
    autos = auto_fields(cfg)
    if not autos:
        return []
    asked = ", ".join(f"{name}: auto" for name in autos)
    gpu_memory_gb = cfg.launch.gpu_memory_gb
    if gpu_memory_gb is None:
        raise ConfigError([f"launch.gpu_memory_gb: required when {asked}: the planner chooses what fits in one "
                           f"device's memory; set it in GB (1e9 bytes), e.g. 80 for an 80 GB A100/H100"],
                          title="cannot plan memory")
    counts = _counts(cfg, model_config, f"the memory planner ({asked})")
    refuse_approximate_moe(cfg, counts)
    t, z = cfg.train, cfg.zero
    offload_params = None if z.offload_params == "auto" else z.offload_params == "cpu"
    offload_optimizer = None if z.offload_optimizer == "auto" else z.offload_optimizer == "cpu"
    if offload_params and offload_optimizer is False:
        offload_optimizer = True  # the parameter-offload template offloads the optimizer too: plan what runs
    world = cfg.launch.world_size
    dtype = precision_of(cfg)
    options = _sequence_parallel_options(cfg, counts, model_config)
    if not options:
        raise ConfigError([f"train.sequence_parallel: 'auto' has no group size to choose from: none of the divisors "
                           f"of the world size {world} divides data.seq_len {cfg.data.seq_len}, the model's "
                           f"{counts.num_heads} attention heads and the global batch"], title="cannot plan memory")
    failures: list[tuple[int, DoesNotFit]] = []
    # The smallest group that fits: every larger one adds an all-to-all per layer for nothing. A larger group with
    # room wins over a tight fit (one the estimate's measured error could push over); tight only if nothing has room.
    for tight_ok in (False, True) if len(options) > 1 else (True,):
        failures = []
        for n in options:
            try:
                choice = choose_configuration(
                    counts, world, float(gpu_memory_gb), cfg.data.seq_len, t.global_batch_size, dtype,
                    stage=None if z.stage == "auto" else int(z.stage),
                    micro_batch_size=None if t.micro_batch_size == "auto" else int(t.micro_batch_size),
                    activation_checkpointing=None if t.activation_checkpointing == "auto" else t.recomputes,
                    offload_optimizer=offload_optimizer, offload_params=offload_params,
                    gpus_per_node=cfg.launch.procs_per_node, attention=cfg.model.attn_implementation,
                    zero=zero_settings(cfg, counts.hidden_size, counts.total), margins=margins_for(cfg),
                    whole_layers=gathers_whole_layers(cfg), grad_accum_steps=_int_or_none(t.grad_accum_steps),
                    long_context=long_context_of(cfg, counts, n, model_config), tight_ok=tight_ok)
            except DoesNotFit as exc:
                failures.append((n, exc))
                continue
            return _apply(cfg, choice, failures, with_room=not tight_ok)
    raise ConfigError(_does_not_fit(cfg, counts, failures[-1][1], asked), title="does not fit") from None


def _apply(cfg: RunConfig, choice, smaller_groups: list[tuple[int, DoesNotFit]], with_room: bool = False
           ) -> list[str]:
    """Write the choice into the auto fields and say why, one note per field (the fit goes with the stage).
    `with_room`: the smaller groups were passed over for fitting without room for the estimate's error."""
    s, why, notes = choice.setup, choice.why, []
    decided = []
    if cfg.train.sequence_parallel == "auto":
        cfg.train.sequence_parallel = s.sequence_parallel
        room = " with room" if with_room else ""
        tried = "; ".join(f"{n} does not fit{room} ({exc.reasons[-1] if exc.reasons else 'nothing allowed fits'})"
                          for n, exc in smaller_groups)
        notes.append(f"train.sequence_parallel=auto -> {s.sequence_parallel}: the smallest group size that fits"
                     f"{room}" + (f" ({tried})" if tried else ""))
        if (problems := sequence_parallel_problems(cfg)):
            raise ConfigError(problems)
    if cfg.zero.stage == "auto":
        cfg.zero.stage = s.stage
        decided.append(f"zero.stage=auto -> {s.stage}")
    if cfg.zero.offload_optimizer == "auto":
        cfg.zero.offload_optimizer = "cpu" if s.offload_optimizer else "none"
        decided.append(f"zero.offload_optimizer=auto -> {cfg.zero.offload_optimizer}")
    if cfg.zero.offload_params == "auto":
        cfg.zero.offload_params = "cpu" if s.offload_params else "none"
        decided.append(f"zero.offload_params=auto -> {cfg.zero.offload_params}")
    fit = "; ".join([*choice.skipped, why["variant"]])
    notes.append(f"{', '.join(decided)}: {fit}" if decided else fit)
    if cfg.train.activation_checkpointing == "auto":
        cfg.train.activation_checkpointing = s.activation_checkpointing
        notes.append(f"train.activation_checkpointing=auto -> {str(s.activation_checkpointing).lower()}: "
                     f"{why['activation_checkpointing'].split(': ', 1)[1]}")
    if cfg.train.micro_batch_size == "auto":
        cfg.train.micro_batch_size = s.micro_batch_size
        reason = why.get("micro_batch_size", f"micro batch {s.micro_batch_size}: the only divisor").split(": ", 1)[1]
        notes.append(f"train.micro_batch_size=auto -> {s.micro_batch_size}: {reason}")
        cfg.train.grad_accum_steps = choice.grad_accum_steps
        replicas = replicas_words(cfg.launch.world_size, s.sequence_parallel)
        notes.append(f"train.grad_accum_steps = global {cfg.train.global_batch_size} / (micro {s.micro_batch_size} × "
                     f"{replicas}) = {choice.grad_accum_steps}")
    return notes


def _does_not_fit(cfg: RunConfig, counts: ModelCounts, exc: DoesNotFit, asked: str) -> list[str]:
    gb = cfg.launch.gpu_memory_gb
    problems = [f"launch.gpu_memory_gb: nothing the config allows ({asked}) fits in {gb:g} GB per device on "
                f"{cfg.launch.world_size} devices ({counts.total / 1e9:.2f}B parameters, "
                f"data.seq_len {cfg.data.seq_len}, {precision_of(cfg)})"]
    problems += [f"tried: {reason}" for reason in exc.reasons]
    if exc.estimate is not None:
        problems.append(f"the smallest allowed configuration, {exc.estimate.setup.label()} at micro batch "
                        f"{exc.estimate.setup.micro_batch_size}, component by component:\n"
                        + indent(component_table([exc.estimate], float(gb)), "  "))
    problems += [f"would fit: {s}" for s in exc.suggestions]
    return problems


# ---------------------------------------------------------------- every resolved run


def gathers_whole_layers(cfg: RunConfig) -> bool:
    """Whether ZeRO-3 will gather a whole decoder layer at once: a compiled model's layers are leaf modules
    (trainer/model.gather_layers_whole). `auto` may still be left to the trainer (a hub model): counted as
    compiled, the larger of the two. The stage choice and the resolved estimate both ask here, so a stage
    chosen as fitting is never refused by the estimate of what runs."""
    return cfg.train.compile is not False


def resolved_setup(cfg: RunConfig, ds_config: Optional[dict]) -> Setup:
    """The Setup of a resolved config; the rendered DeepSpeed config wins, because that is what will run (also what
    bench.memory compares its measurements with)."""
    left = auto_fields(cfg)
    if left:
        raise ValueError(f"memory_summary needs a resolved config, {', '.join(left)} still auto (call plan.resolve)")
    stage, opt, par = int(cfg.zero.stage), cfg.zero.offload_optimizer == "cpu", cfg.zero.offload_params == "cpu"
    optimizer = "fused"  # what render_deepspeed_config writes, unless a zero.config turns fusion off
    fp32_sums = accumulates_in_fp32(precision_of(cfg), stage, int(cfg.train.grad_accum_steps))
    if ds_config:
        z = ds_config.get("zero_optimization") or {}
        stage = int(z.get("stage", stage))
        opt = (z.get("offload_optimizer") or {}).get("device") == "cpu"
        par = (z.get("offload_param") or {}).get("device") == "cpu"
        optimizer = optimizer_of(ds_config)
        fp32_sums = (ds_config.get("data_types") or {}).get("grad_accum_dtype") == "fp32"
    return Setup(stage=stage, world_size=cfg.launch.world_size,
                 gpus_per_node=cfg.launch.procs_per_node, micro_batch_size=int(cfg.train.micro_batch_size),
                 seq_len=cfg.data.seq_len, dtype=precision_of(cfg), offload_optimizer=opt, offload_params=par,
                 activation_checkpointing=cfg.train.recomputes,
                 attention=cfg.model.attn_implementation, optimizer=optimizer,
                 whole_layers=gathers_whole_layers(cfg), async_save=cfg.train.async_save, fp32_accumulation=fp32_sums,
                 **long_context_of(cfg, None).setup_fields(cfg.train.recomputes))


def recurring_pinned_bytes(cfg: RunConfig, model_config: Optional[dict], ds_config: dict) -> int:
    """The largest pinned allocation the resolved run makes again every micro-batch (an offloaded layer input), which
    its ranks' pinned-memory limit must keep cached (pinned_memory.limit_mb); 0 when there is none or the model's
    shape is unknown."""
    if model_config is None:
        return 0
    try:
        counts = counts_from_config(model_config)
    except ConfigError:
        return 0
    return offloaded_input_bytes(counts, resolved_setup(cfg, ds_config))


def resolved_estimate(cfg: RunConfig, model_config: Optional[dict],
                      ds_config: Optional[dict]) -> Optional[tuple[ModelCounts, MemoryEstimate]]:
    """The estimate of what will run; None when the model's config.json is not on local disk."""
    if model_config is None:
        return None
    counts = counts_from_config(model_config, source=f"{cfg.model.name_or_path}/config.json")
    return counts, estimate_memory(counts, resolved_setup(cfg, ds_config), est_zero(cfg, counts, ds_config),
                                   margins_for(cfg))


HOST_PARTS = {"offloaded_optimizer": "offloaded optimizer", "offloaded_params": "parameters",
              "checkpoint_loading": "checkpoint loading",
              "offloaded_checkpoints": "offloaded checkpoints", "async_save_snapshots": "background-save copies"}


@dataclass(frozen=True)
class HostNeed:
    """A node's host RAM at the run's planned peak beyond its ranks' processes, which preflight sees running."""

    more: int
    parts: str
    """The components, as the plan's host line names them."""

    def warning(self, host: str, available_gb: float) -> str:
        """What to say when `host` has less host RAM available than the run needs; "" when it has enough."""
        if available_gb * GB >= self.more:
            return ""
        return (f"{host} has {available_gb:,.1f} GB of host RAM available, but the plan puts this run's peak at "
                f"{self.more / GB:,.1f} GB more per node ({self.parts}): a node that runs out loses all its ranks "
                f"(the kernel's OOM killer, or SLURM's limit). Offload less, use more nodes, or free memory there")


def host_need(cfg: RunConfig, model_config: Optional[dict], ds_config: dict) -> Optional[HostNeed]:
    """The resolved run's HostNeed; None when the model's config.json is not on local disk or cannot be sized."""
    try:
        found = resolved_estimate(cfg, model_config, ds_config)
    except ConfigError:
        return None
    if found is None:
        return None
    host = found[1].host
    parts = ", ".join(f"{name} {host[key] / GB:,.1f} GB" for key, name in HOST_PARTS.items() if host[key])
    return HostNeed(found[1].host_total - host["process_runtime"], parts)


def memory_summary(cfg: RunConfig, model_config: Optional[dict], ds_config: Optional[dict]) -> Optional[dict]:
    """Per-device memory of the resolved run, for the plan text and `--json` (GB = 1e9 bytes).

    None when the model's config.json is not on local disk (a hub model `plan` could not fetch): no shape, no
    estimate.
    """
    try:
        found = resolved_estimate(cfg, model_config, ds_config)
    except ConfigError:
        return None  # a config.json we cannot size (no hidden size ...): the trainer will say more
    if found is None:
        return None
    counts, est = found
    gb = cfg.launch.gpu_memory_gb
    longest = None if gb is None else longest_seq_len(counts, est.setup, gb, est_zero(cfg, counts, ds_config),
                                                      margins_for(cfg))
    return {"label": est.setup.label(), "params": counts.total, "params_exact": counts.exact,
            "params_active": counts.active,
            "device": cfg.launch.device, **est.to_dict(), "gpu_memory_gb": gb,
            "fits": None if gb is None else est.fits(gb),
            "spare_gb": None if gb is None else round(gb - est.device_total / GB, 3),
            "tight": gb is not None and est.tight(gb),
            "longest_seq_len": longest}


def est_zero(cfg: RunConfig, counts: ModelCounts, ds_config: Optional[dict]) -> ZeroSettings:
    """The bucket settings the estimate uses: the rendered DeepSpeed config's, else what it will render."""
    return (ZeroSettings.from_deepspeed(ds_config) if ds_config
            else zero_settings(cfg, counts.hidden_size, counts.total))


def format_memory(summary: Optional[dict]) -> str:
    """A few lines for the plan text, aligned with its other sections."""
    pad = " " * 11
    if summary is None:
        return ("memory     not estimated: the model's config.json is not on local disk "
                "(`shardtune estimate --params=N` sizes a model by its parameter count)")
    s, d = summary["setup"], summary["device_gb"]
    where = "per process (CPU RAM)" if summary.get("device") == "cpu" else "per device"
    if summary["gpu_memory_gb"] is None:
        verdict = "launch.gpu_memory_gb not set: fit not checked"
    elif summary.get("tight"):
        verdict = (f"fits {summary['gpu_memory_gb']:g} GB, only {summary['spare_gb']:.1f} GB to spare: "
                   f"TIGHT ({TIGHT_WHY})")
    elif summary["fits"]:
        verdict = f"fits {summary['gpu_memory_gb']:g} GB, {summary['spare_gb']:.1f} GB to spare"
    else:
        verdict = f"DOES NOT FIT {summary['gpu_memory_gb']:g} GB"
    buffers = d["gradient_in_flight"] + d["reduce_buckets"] + d["zero3_live_params"]
    forward_backward = d["activations"] + d["logits"] + buffers
    runtime = "process runtime" if summary.get("device") == "cpu" else "CUDA/NCCL"
    staging = f" + offload staging {d['offload_staging']:.1f}" if d["offload_staging"] else ""
    lines = [
        f"memory     {summary['total_gb']:.1f} GB {where} ({summary['label']}, micro batch {s['micro_batch_size']}, "
        f"seq_len {s['seq_len']}, {s['dtype']}, "
        f"activation checkpointing {'on' if s['activation_checkpointing'] else 'off'}): "
        f"{verdict}",
        f"{pad}= model states {summary['model_states_gb']:.1f} (params {d['params']:.1f}, "
        f"gradients {d['gradients']:.1f}, "
        f"optimizer {d['optimizer_states']:.1f}){staging}",
        f"{pad}+ max(forward/backward {forward_backward:.1f} (activations {d['activations']:.1f}, "
        f"{'chunked loss' if s.get('chunked_loss') else 'logits'} {d['logits']:.1f}, "
        f"buffers {buffers:.1f}), optimizer step {d['optimizer_step_buffers']:.1f})"
        f" + fragmentation {d['fragmentation']:.1f} + {runtime} {d['cuda_runtime']:.1f}",
    ]
    h = summary["host_per_node_gb"]
    if summary.get("device") != "cpu":
        lines.append(f"{pad}host RAM per node {summary['host_total_gb']:.1f} GB (offloaded optimizer "
                     f"{h['offloaded_optimizer']:.1f}, params {h['offloaded_params']:.1f}, checkpoint loading "
                     f"{h['checkpoint_loading']:.1f}, processes "
                     f"{h['process_runtime']:.1f}"
                     + (f", offloaded checkpoints {h['offloaded_checkpoints']:.1f}"
                        if h["offloaded_checkpoints"] else "")
                     + (f", background-save copies {h['async_save_snapshots']:.1f}"
                        if h["async_save_snapshots"] else "")
                     + ")")
    elif h["async_save_snapshots"]:
        lines.append(f"{pad}+ background-save copies {h['async_save_snapshots']:.1f} GB on the node of rank 0 "
                     f"(train.async_save), in the same RAM")
    if summary.get("longest_seq_len") is not None:
        lines.append(f"{pad}longest data.seq_len that fits {summary['gpu_memory_gb']:g} GB with these settings: "
                     f"{summary['longest_seq_len']:,}")
    elif summary["gpu_memory_gb"] is not None:
        lines.append(f"{pad}no data.seq_len fits {summary['gpu_memory_gb']:g} GB with these settings")
    lines += [f"{pad}note: {note}" for note in summary.get("notes", [])]
    return "\n".join(lines)


def check_fit(cfg: RunConfig, model_config: Optional[dict], ds_config: Optional[dict]) -> None:
    """Refuse, before anything is queued, a run whose estimate exceeds launch.gpu_memory_gb.

    The same estimate the planner chooses by, so an `auto` choice always passes. Without
    launch.gpu_memory_gb, or without a local config.json, there is nothing to check against.
    """
    gb = cfg.launch.gpu_memory_gb
    if gb is None:
        return
    try:
        found = resolved_estimate(cfg, model_config, ds_config)
    except ConfigError:
        return
    if found is None:
        return
    counts, est = found
    refuse_approximate_moe(cfg, counts)
    if est.fits(gb):
        return
    s = est.setup
    problems = [f"launch.gpu_memory_gb: {s.label()} at micro batch {s.micro_batch_size}, data.seq_len {s.seq_len}, "
                f"{s.dtype}, activation checkpointing {'on' if s.activation_checkpointing else 'off'} needs "
                f"{est.device_total / GB:.1f} GB per device > {gb:g} GB",
                "component by component:\n" + indent(component_table([est], float(gb)), "  ")]
    problems += _what_would_fit(cfg, counts, model_config)
    problems.append("to launch anyway, remove launch.gpu_memory_gb (the check runs only when it is set)")
    raise ConfigError(problems, title="does not fit")


def _what_would_fit(cfg: RunConfig, counts: ModelCounts, model_config: Optional[dict]) -> list[str]:
    """Ask the planner with the stage, micro batch and checkpointing free: the fastest configuration that fits
    without offload, else its remedies. Those come first from every long-context setting as well (sequence
    parallelism, the tiled MLP), tried before offload, which moves the optimizer step to the CPU."""
    t = cfg.train
    free_micro = t.global_batch_size is not None
    try:
        choice = choose_configuration(
            counts, cfg.launch.world_size, float(cfg.launch.gpu_memory_gb), cfg.data.seq_len,
            t.global_batch_size, precision_of(cfg), micro_batch_size=None if free_micro else int(t.micro_batch_size),
            offload_optimizer=False, offload_params=False,
            gpus_per_node=cfg.launch.procs_per_node, attention=cfg.model.attn_implementation,
            zero=zero_settings(cfg, counts.hidden_size, counts.total), margins=margins_for(cfg),
            whole_layers=gathers_whole_layers(cfg), grad_accum_steps=_int_or_none(t.grad_accum_steps),
            long_context=long_context_of(cfg, counts, model_config=model_config))
    except DoesNotFit as exc:
        return [f"would fit: {s}" for s in exc.suggestions]
    except ConfigError:
        return []
    s = choice.setup
    fields = [f"zero.stage: {s.stage}", "zero.offload_optimizer: none", "zero.offload_params: none"]
    if free_micro:
        fields.append(f"train.micro_batch_size: {s.micro_batch_size}")
    fields.append(f"train.activation_checkpointing: {str(s.activation_checkpointing).lower()}")
    return [f"would fit: {', '.join(fields)} ({choice.why['variant']}); `auto` in these fields lets the "
            f"planner choose within launch.gpu_memory_gb"]
