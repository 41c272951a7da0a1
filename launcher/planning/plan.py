"""The plan: every decision about a run made once, before anything starts, and shown to the user.

`resolve` turns each `auto` in the config into a concrete value (device, precision, accumulation,
and, through the memory planner, stage and micro batch). `build_plan` adds the batch arithmetic, the
final DeepSpeed config and the launch command. Nothing here imports torch.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from launcher.backends.slurm import mem_bytes, render_sbatch
from launcher.backends.torchrun import launch_script, process_env, torchrun_argv
from launcher.contract.config import RunConfig, replicas_words
from launcher.contract.errors import ConfigError
from launcher.contract.run_dir import RunDir
from launcher.planning.checkpoint_size import (
    disk_need,
    disk_verdict,
    grace_warning,
    plan_checkpoint,
    reserve_verdict,
)
from launcher.planning.chunked_loss import loss_chunk_tokens, resolve_chunked_loss
from launcher.planning.compile_choice import resolve_compile
from launcher.planning.deepspeed_config import render_deepspeed_config
from launcher.planning.devices import resolve_device, resolve_kernels, resolve_slurm_resources
from launcher.planning.host import HostFacts
from launcher.planning.hub_snapshot import hub_cache_env
from launcher.planning.memory import tiled_mlp_problem
from launcher.planning.memory_plan import apply_auto_choice, auto_fields, check_fit, format_memory, memory_summary
from launcher.planning.model_files import absent_model, foreign_code, weight_files_problems
from launcher.planning.model_size import (
    ModelCounts,
    counts_from_config,
    parameter_count,
    read_model_config,
    state_layers,
)
from launcher.planning.moe_settings import moe_plan_notes
from launcher.planning.quantized_weights import quantized_weights_note, quantized_weights_problem
from launcher.planning.sequence_parallel import describe as describe_sequence_parallel
from launcher.planning.sequence_parallel import sliding_window_problem, split_problems


@dataclass
class Plan:
    config: RunConfig
    world_size: int
    micro_batch_size: int
    grad_accum_steps: int
    global_batch_size: int
    batch_arithmetic: str
    tokens_per_step: int
    deepspeed: dict
    command: list[str]
    script: str
    notes: list[str] = field(default_factory=list)
    memory: Optional[dict] = None
    checkpoint: Optional[dict] = None
    """Size of one checkpoint and its write time at launch.storage_gbps (when the model's size is known)."""
    warnings: list[str] = field(default_factory=list)
    """Things that will work, but probably not as the user wants: shown by plan and launch."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(self.checkpoint or {"checkpoint_gb": None, "checkpoint_write_s": None})
        out["config"] = self.config.model_dump(mode="json")
        out["command"] = " ".join(self.command)
        out["argv"] = self.command
        return out


def resolve(cfg: RunConfig, host: Optional[HostFacts] = None) -> tuple[RunConfig, list[str]]:
    """A copy of the config with every `auto` replaced, and one note per decision saying why."""
    cfg = cfg.model_copy(deep=True)
    host = host or HostFacts.detect(cfg.slurm.partition, slurm=cfg.launch.backend == "slurm",
                                    output_dir=RunDir(cfg.output_dir).checkpoints)
    notes: list[str] = []
    world = cfg.launch.world_size
    resolve_device(cfg, host, notes)
    resolve_kernels(cfg, host, notes)
    resolve_slurm_resources(cfg, host, notes)
    model_config = read_model_config(cfg.model.name_or_path)
    resolve_long_context(cfg, model_config, notes)
    if auto_fields(cfg):
        notes += apply_auto_choice(cfg, model_config)
    t = cfg.train
    t.compile, note = resolve_compile(cfg, model_config, host)
    notes += [note] if note else []
    if t.resume not in ("auto", "never") and not Path(t.resume).is_dir():
        raise ConfigError([f"train.resume: {t.resume} does not exist "
                           f"(use auto, never or an existing checkpoint directory)"])
    sp = t.sequence_parallel
    replicas = world // sp
    if t.grad_accum_steps is None:
        t.grad_accum_steps = t.global_batch_size // (t.micro_batch_size * replicas)
        notes.append(f"train.grad_accum_steps = global {t.global_batch_size} / (micro {t.micro_batch_size} × "
                     f"{replicas_words(world, sp)}) = {t.grad_accum_steps}")
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * t.grad_accum_steps * replicas
    if t.precision in ("bf16", "fp16") and t.grad_accum_steps > 1:
        if cfg.zero.stage == 0:
            notes.append(f"warning: zero.stage 0 in {t.precision} accumulates gradients in {t.precision} "
                         f"(DeepSpeed has no fp32 accumulation without ZeRO); use zero.stage 1 or higher")
        else:
            notes.append(f"gradients accumulate in fp32 over {t.grad_accum_steps} micro-batches "
                         f"(data_types.grad_accum_dtype; {t.precision} sums lose precision as they grow)")
    return cfg, notes


def resolve_long_context(cfg: RunConfig, model_config: Optional[dict], notes: list[str]) -> None:
    """The chunked loss (auto: on where it is exact) and whether the model's heads split over the sequence-parallel
    group; both need the model's config.json, so without it the trainer checks them on the loaded model."""
    t = cfg.train
    t.chunked_loss, note = resolve_chunked_loss(t.chunked_loss, model_config)
    if note:
        notes.append(note)
    if model_config is None:
        return
    counts = counts_from_config(model_config, source=f"{cfg.model.name_or_path}/config.json")
    problems = [p for p in [tiled_mlp_problem(counts, cfg.model.name_or_path)] if p and t.tiled_mlp]
    if isinstance(t.sequence_parallel, int):
        problems += split_problems(t.sequence_parallel, counts)
        window = sliding_window_problem(t.sequence_parallel, model_config, cfg.data.seq_len)
        problems += [window] if window else []
    if problems:
        raise ConfigError(problems)


def build_plan(cfg: RunConfig, trainer_args: tuple[str, ...] = (), host: Optional[HostFacts] = None,
               reserve: bool = False) -> Plan:
    """Everything `plan` shows and `launch` writes, from a validated config (trainer_args: e.g. --preflight)."""
    damaged = weight_files_problems(cfg.model.name_or_path)
    if damaged:
        raise ConfigError([f"model.name_or_path: {cfg.model.name_or_path}: {p}" for p in damaged])
    host = host or HostFacts.detect(cfg.slurm.partition, slurm=cfg.launch.backend == "slurm",
                                    output_dir=RunDir(cfg.output_dir).checkpoints)
    cfg, notes = resolve(cfg, host)
    t = cfg.train
    world, sp = cfg.launch.world_size, t.sequence_parallel
    global_batch = t.micro_batch_size * t.grad_accum_steps * (world // sp)
    model_cfg = read_model_config(cfg.model.name_or_path)
    quantized = quantized_weights_problem(model_cfg, cfg.model.name_or_path)
    if quantized:
        raise ConfigError([quantized])
    notes += [n for n in [quantized_weights_note(model_cfg, t.precision)] if n]
    hidden = (model_cfg or {}).get("hidden_size") or (model_cfg or {}).get("n_embd")
    ds = render_deepspeed_config(cfg, hidden, parameter_count(model_cfg))
    check_fit(cfg, model_cfg, ds)
    notes += moe_plan_notes(cfg, model_cfg)
    if cfg.launch.backend == "slurm":
        script = render_sbatch(cfg, {**hub_cache_env(cfg), **process_env(cfg)}, trainer_args=trainer_args)
        argv = ["sbatch", str(RunDir(cfg.output_dir).script("slurm"))]
    else:
        argv = torchrun_argv(cfg, trainer_args=trainer_args)
        script = launch_script(cfg, argv, defaults=hub_cache_env(cfg))
    memory = memory_summary(cfg, model_cfg, ds)
    warnings = [n[len("warning: "):] for n in notes if n.startswith("warning: ")]
    notes = [n for n in notes if not n.startswith("warning: ")]
    ckpt = None
    if memory is not None:
        lead = cfg.slurm.signal_lead_s if cfg.launch.backend == "slurm" else None
        planned = plan_checkpoint(memory["params"], int(cfg.zero.stage), t.precision, cfg.launch.storage_gbps, lead)
        ckpt = planned.to_json()
        warnings += [planned.warning] if planned.warning else []
        need = disk_need(cfg, memory["params"], model_cfg, RunDir(cfg.output_dir))
        free = host.disk_free
        ckpt.update(disk_need_gb=round(need.more / 1e9, 3), disk_free_gb=free and round(free[1] / 1e9, 3))
        warnings += [w for w in disk_verdict(need, free) if w]
        warnings += [w for w in reserve_verdict(need, free, RunDir(cfg.output_dir).checkpoints) if w] if reserve else []
        grace = grace_warning(planned, host.preemption, cfg.launch.storage_gbps) if lead is not None else ""
        warnings += [grace] if grace else []
        warnings += _host_memory_warning(cfg, memory)
        warnings += _sample_memory_warning(cfg, memory, model_cfg)
    warnings += _state_layers_warning(cfg, model_cfg)
    warnings += _foreign_code_warning(cfg)
    absent = absent_model(cfg.model.name_or_path)
    warnings += [f"model.name_or_path: {cfg.model.name_or_path}: {absent}, so the plan has no model shape; every "
                 f"node must see it when the job starts"] if absent else []
    return Plan(
        config=cfg, world_size=world, micro_batch_size=t.micro_batch_size, grad_accum_steps=t.grad_accum_steps,
        global_batch_size=global_batch,
        batch_arithmetic=(f"global batch = micro {t.micro_batch_size} × accumulation {t.grad_accum_steps} × "
                          f"{replicas_words(world, sp)} ({cfg.launch.nodes} node{'s' if cfg.launch.nodes > 1 else ''}"
                          f" × {cfg.launch.procs_per_node}) = {global_batch} sequences"),
        tokens_per_step=global_batch * cfg.data.seq_len, deepspeed=ds, command=argv,
        script=script, notes=notes, memory=memory, checkpoint=ckpt, warnings=warnings)


def _host_memory_warning(cfg: RunConfig, memory: dict) -> list[str]:
    """SLURM kills a job whose node exceeds its --mem; the estimate is a peak that may not all be resident at once
    (loading goes through the page cache), so this warns instead of refusing."""
    limit = mem_bytes(cfg.slurm.mem) if cfg.launch.backend == "slurm" and cfg.launch.device == "cuda" else None
    need = memory["host_total_gb"] * 1e9
    if limit is None or need <= limit:
        return []
    return [f"slurm.mem {cfg.slurm.mem} ({limit / 1e9:,.1f} GB) is less than the host RAM a node needs, about "
            f"{need / 1e9:,.1f} GB (its parts are on the memory section's host line): SLURM would kill the job "
            f"when a node reaches its limit. Raise slurm.mem, or set it to 0 for all of each node's memory"]


def _state_layers_warning(cfg: RunConfig, model_cfg: Optional[dict]) -> list[str]:
    """A model with layers that carry state along the sequence cannot keep packed samples apart with a mask, nor be
    split over a sequence-parallel group: the trainer stops such runs at its checks, so say it before the job
    queues. (Some kernels read sample boundaries, e.g. flash-attention's varlen arguments in a few Mamba models,
    so this warns instead of refusing; the trainer's check decides.)"""
    layers = state_layers(model_cfg) if model_cfg else None
    if layers is None:
        return []
    name = model_cfg.get("model_type", cfg.model.name_or_path)
    fails = (["data.packing: true (set it to false)"] if cfg.data.packing else []) + (
        [f"train.sequence_parallel: {cfg.train.sequence_parallel} (set it to 1)"]
        if cfg.train.sequence_parallel != 1 else [])
    if not fails:
        return []
    return [f"{name} has layers that are not attention ({layers}); they carry state along the sequence, across "
            f"packed samples and past a rank's slice. The trainer checks before the first step and stops with "
            f"{' and '.join(fails)}"]


def _foreign_code_warning(cfg: RunConfig) -> list[str]:
    """Code from another hub repository is not in the model's snapshot or checkpoint: transformers fetches it at
    every load, unpinned, which nodes without the network cannot do."""
    if not cfg.model.trust_remote_code:
        return []
    return [f"model.trust_remote_code: the model's auto_map runs code from another hub repository, {repo} "
            f"({', '.join(modules)}). transformers downloads it at every load (each rank, the export, the tools), "
            f"from that repository's main branch: every node needs the hub, and the code may change under the run. "
            f"To pin it, copy those files into the model directory and drop the '{repo}--' prefix in auto_map"
            for repo, modules in foreign_code(*[d for d in (cfg.model.name_or_path, cfg.model.tokenizer) if d]).items()]


def _sample_memory_warning(cfg: RunConfig, memory: dict, model_cfg: Optional[dict]) -> list[str]:
    """train.sample_prompt loads the whole exported model on rank 0's node, in the dtype it is saved in, after the
    export: past slurm.mem SLURM kills the job at its very end (the run itself is already complete)."""
    limit = mem_bytes(cfg.slurm.mem) if cfg.launch.backend == "slurm" else None
    if not cfg.train.sample_prompt or limit is None:
        return []
    dtype = str((model_cfg or {}).get("dtype") or (model_cfg or {}).get("torch_dtype") or "float32")
    need = memory["params"] * (2 if dtype in ("bfloat16", "float16") else 4)
    if need <= limit:
        return []
    return [f"train.sample_prompt loads the exported model on rank 0's node after the export, about "
            f"{need / 1e9:,.1f} GB in {dtype}, more than slurm.mem {cfg.slurm.mem} ({limit / 1e9:,.1f} GB): SLURM "
            f"would kill the job at its end. Leave sample_prompt unset and run `shardtune generate` on the export, "
            f"or raise slurm.mem"]


def _counts_or_none(cfg: RunConfig) -> Optional[ModelCounts]:
    model_config = read_model_config(cfg.model.name_or_path)
    try:
        return counts_from_config(model_config) if model_config else None
    except ConfigError:
        return None


def _long_context_line(cfg: RunConfig) -> str:
    """The loss and the memory savers for long sequences, as they will run."""
    t = cfg.train
    model_config = read_model_config(cfg.model.name_or_path) or {}
    vocab = model_config.get("vocab_size")
    if t.chunked_loss is True:
        chunk = f" of {loss_chunk_tokens(vocab):,} positions" if vocab else ""
        loss = f"loss chunked (chunks{chunk}: never the tokens × vocab logits)"
    else:
        loss = ("loss on the full logits" if t.chunked_loss is False
                else "loss chunked where exact (decided on the loaded model)")
    mlp = "tiled MLP" if t.tiled_mlp else "MLP whole"
    ckpt = {"offload": "checkpoint inputs offloaded to host", True: "checkpointing on"}.get(
        t.activation_checkpointing, "checkpointing off")
    return f"{loss}; {mlp}; {ckpt}"


def format_plan(plan: Plan) -> str:
    """The human-readable plan."""
    cfg = plan.config
    lines = [
        f"run        {cfg.output_dir}",
        f"model      {cfg.model.name_or_path}",
        f"data       {cfg.data.path} ({cfg.data.format}, seq_len {cfg.data.seq_len}, "
        f"packing {'on' if cfg.data.packing else 'off'}"
        f"{f', first {cfg.data.max_rows:,} rows' if cfg.data.max_rows else ''})",
        f"world      {plan.world_size} = {cfg.launch.nodes} node(s) × {cfg.launch.procs_per_node} process(es) "
        f"on {cfg.launch.device}, backend {cfg.launch.backend}",
        f"batch      {plan.batch_arithmetic}",
        f"tokens     {plan.tokens_per_step:,} per optimizer step (global batch × seq_len, at most)",
        f"optimizer  AdamW lr {cfg.train.lr:g}, {cfg.train.lr_schedule} schedule, warmup {cfg.train.warmup_steps}, "
        f"{cfg.train.max_steps} steps, clip {cfg.train.grad_clip:g}, precision {cfg.train.precision}",
        f"zero       stage {cfg.zero.stage}, offload optimizer {cfg.zero.offload_optimizer}, "
        f"params {cfg.zero.offload_params}",
        f"sequence   {describe_sequence_parallel(cfg, _counts_or_none(cfg))}",
        f"long       {_long_context_line(cfg)}",
    ]
    lines.append(format_memory(plan.memory))
    if plan.checkpoint:
        c = plan.checkpoint
        free = "free space unknown" if c["disk_free_gb"] is None else f"{c['disk_free_gb']:,.1f} GB free"
        lines.append(f"checkpoint {c['checkpoint_gb']:,.2f} GB each, about {c['checkpoint_write_s']:,.0f} s to write "
                     f"at {cfg.launch.storage_gbps:g} GB/s (launch.storage_gbps)"
                     f"{'; in the background' if cfg.train.async_save else ''}; the run needs "
                     f"{c['disk_need_gb']:,.1f} GB more on its filesystem at the peak ({free})")
    if plan.warnings:
        lines.append("warnings")
        lines += [f"  - {w}" for w in plan.warnings]
    if plan.notes:
        lines.append("decisions")
        lines += [f"  - {n}" for n in plan.notes]
    lines += ["deepspeed config", json.dumps(plan.deepspeed, indent=2), "launch command", " ".join(plan.command)]
    if cfg.launch.backend == "slurm":
        lines += ["sbatch script", plan.script.rstrip()]
    return "\n".join(lines)

