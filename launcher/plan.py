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

from launcher.autoplan import apply_auto_choice, auto_fields, check_fit, format_memory, memory_summary
from launcher.config import RunConfig
from launcher.deepspeed_config import render_deepspeed_config
from launcher.errors import ConfigError
from launcher.slurm import render_sbatch
from launcher.torchrun import launch_script, process_env, torchrun_argv


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

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["config"] = self.config.model_dump(mode="json")
        out["command"] = " ".join(self.command)
        out["argv"] = self.command
        return out


def local_gpu_count() -> int:
    """NVIDIA GPUs on this machine, from the driver's /proc entries (no torch, no subprocess)."""
    root = Path("/proc/driver/nvidia/gpus")
    return len(list(root.iterdir())) if root.is_dir() else 0


def read_model_config(name_or_path: str) -> Optional[dict]:
    """The model's config.json when it is on local disk (directory or file); None for hub ids."""
    p = Path(name_or_path)
    candidate = p / "config.json" if p.is_dir() else p
    if candidate.is_file() and candidate.suffix == ".json":
        try:
            return json.loads(candidate.read_text())
        except (OSError, json.JSONDecodeError):
            return None
    return None


def resolve(cfg: RunConfig) -> tuple[RunConfig, list[str]]:
    """A copy of the config with every `auto` replaced, and one note per decision saying why."""
    cfg = cfg.model_copy(deep=True)
    notes: list[str] = []
    world = cfg.launch.nodes * cfg.launch.procs_per_node
    if cfg.launch.device == "auto" and cfg.launch.backend == "slurm":
        cfg.launch.device = "cpu" if cfg.slurm.gpus_per_node == 0 else "cuda"
        notes.append(f"launch.device=auto -> {cfg.launch.device} (slurm.gpus_per_node={cfg.slurm.gpus_per_node})")
    elif cfg.launch.device == "auto":
        gpus = local_gpu_count()
        cfg.launch.device = "cuda" if gpus else "cpu"
        notes.append(f"launch.device=auto -> {cfg.launch.device} ({gpus} NVIDIA GPUs on this machine)")
    if cfg.launch.device == "cuda" and cfg.launch.backend == "torchrun" and cfg.launch.nodes == 1:
        gpus = local_gpu_count()
        if gpus and cfg.launch.procs_per_node > gpus:
            raise ConfigError([f"launch.procs_per_node: {cfg.launch.procs_per_node} processes but this machine has {gpus} GPUs (one process per GPU)"])
    if cfg.train.precision == "auto":
        cfg.train.precision = "bf16" if cfg.launch.device == "cuda" else "fp32"
        notes.append(f"train.precision=auto -> {cfg.train.precision} ({'GPUs train in bf16' if cfg.launch.device == 'cuda' else 'CPUs train in fp32'})")
    if auto_fields(cfg):
        notes += apply_auto_choice(cfg, read_model_config(cfg.model.name_or_path))
    t = cfg.train
    if t.resume not in ("auto", "never") and not Path(t.resume).is_dir():
        raise ConfigError([f"train.resume: {t.resume} does not exist (use auto, never or an existing checkpoint directory)"])
    if t.grad_accum_steps is None:
        t.grad_accum_steps = t.global_batch_size // (t.micro_batch_size * world)
        notes.append(f"train.grad_accum_steps = global {t.global_batch_size} / (micro {t.micro_batch_size} × world {world}) = {t.grad_accum_steps}")
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * t.grad_accum_steps * world
    return cfg, notes


def build_plan(cfg: RunConfig, trainer_args: tuple[str, ...] = ()) -> Plan:
    """Everything `plan` shows and `launch` writes, from a validated config (trainer_args: e.g. --preflight)."""
    cfg, notes = resolve(cfg)
    t = cfg.train
    world = cfg.launch.nodes * cfg.launch.procs_per_node
    global_batch = t.micro_batch_size * t.grad_accum_steps * world
    model_cfg = read_model_config(cfg.model.name_or_path)
    hidden = (model_cfg or {}).get("hidden_size") or (model_cfg or {}).get("n_embd")
    ds = render_deepspeed_config(cfg, hidden)
    check_fit(cfg, model_cfg, ds)
    if cfg.launch.backend == "slurm":
        script = render_sbatch(cfg, process_env(cfg), trainer_args=trainer_args)
        argv = ["sbatch", str(Path(cfg.output_dir) / "launch.sbatch")]
    else:
        argv = torchrun_argv(cfg, trainer_args=trainer_args)
        script = launch_script(cfg, argv)
    return Plan(
        config=cfg, world_size=world, micro_batch_size=t.micro_batch_size, grad_accum_steps=t.grad_accum_steps,
        global_batch_size=global_batch,
        batch_arithmetic=(f"global batch = micro {t.micro_batch_size} × accumulation {t.grad_accum_steps} × "
                          f"world {world} ({cfg.launch.nodes} node{'s' if cfg.launch.nodes > 1 else ''} × "
                          f"{cfg.launch.procs_per_node}) = {global_batch} sequences"),
        tokens_per_step=global_batch * cfg.data.seq_len, deepspeed=ds, command=argv,
        script=script, notes=notes, memory=memory_summary(cfg, model_cfg, ds))


def format_plan(plan: Plan) -> str:
    """The human-readable plan."""
    cfg = plan.config
    lines = [
        f"run        {cfg.output_dir}",
        f"model      {cfg.model.name_or_path}",
        f"data       {cfg.data.path} ({cfg.data.format}, seq_len {cfg.data.seq_len}, packing {'on' if cfg.data.packing else 'off'})",
        f"world      {plan.world_size} = {cfg.launch.nodes} node(s) × {cfg.launch.procs_per_node} process(es) on {cfg.launch.device}, backend {cfg.launch.backend}",
        f"batch      {plan.batch_arithmetic}",
        f"tokens     {plan.tokens_per_step:,} per optimizer step (global batch × seq_len, at most)",
        f"optimizer  AdamW lr {cfg.train.lr:g}, {cfg.train.lr_schedule} schedule, warmup {cfg.train.warmup_steps}, "
        f"{cfg.train.max_steps} steps, clip {cfg.train.grad_clip:g}, precision {cfg.train.precision}",
        f"zero       stage {cfg.zero.stage}, offload optimizer {cfg.zero.offload_optimizer}, params {cfg.zero.offload_params}",
    ]
    lines.append(format_memory(plan.memory))
    if plan.notes:
        lines.append("decisions")
        lines += [f"  - {n}" for n in plan.notes]
    lines += ["deepspeed config", json.dumps(plan.deepspeed, indent=2), "launch command", " ".join(plan.command)]
    if cfg.launch.backend == "slurm":
        lines += ["sbatch script", plan.script.rstrip()]
    return "\n".join(lines)

