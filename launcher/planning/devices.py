"""What runs where: device, precision, attention kernel, optimizer and the resources a batch job asks for.

Each rule is decided here once, from the config and facts about the machines that will train (HostFacts),
never from the login node that happens to plan the run.
"""
from __future__ import annotations

from launcher.contract.config import RunConfig
from launcher.contract.errors import ConfigError
from launcher.planning.host import HostFacts

DEFAULT_GPUS_PER_NODE = 8  # the common HGX/DGX node, when nothing says otherwise
GPU_OPTIONS = ("--gres", "--gpus", "-G")
"""slurm.extra_sbatch options that request GPUs their own way (then slurm.gpus_per_node is not checked)."""
DEFAULT_CPUS_PER_RANK = 8  # when SLURM cannot say how many CPUs a node has: a common GPU node has 8-16 per GPU


def precision_for(device: str, configured: str = "auto") -> str:
    """`train.precision: auto` is bf16 on GPUs (half the memory traffic, no loss scaling) and fp32 on CPU."""
    if configured != "auto":
        return configured
    return "bf16" if device == "cuda" else "fp32"


def accumulates_in_fp32(precision: str, stage: int, grad_accum_steps: int) -> bool:
    """Whether gradients sum in fp32 over a step's micro-batches (DeepSpeed's data_types.grad_accum_dtype): in
    bf16/fp16 with accumulation, where ZeRO can (DeepSpeed has no fp32 accumulation at stage 0)."""
    return precision in ("bf16", "fp16") and stage != 0 and grad_accum_steps > 1


def resolve_device(cfg: RunConfig, host: HostFacts, notes: list[str]) -> None:
    """`launch.device: auto` is decided from facts about the machines that will train, never a login node's."""
    launch = cfg.launch
    if launch.device == "auto" and launch.backend == "slurm":
        launch.device = "cpu" if cfg.slurm.gpus_per_node == 0 else "cuda"
        notes.append(f"launch.device=auto -> {launch.device} (slurm.gpus_per_node={cfg.slurm.gpus_per_node})")
    elif launch.device == "auto" and launch.nodes > 1:
        raise ConfigError([f"launch.device: 'auto' cannot be decided for a {launch.nodes}-node torchrun run from "
                           f"this machine (its GPUs say nothing about the nodes'); set launch.device to cuda or cpu"])
    elif launch.device == "auto":
        launch.device = "cuda" if host.visible_gpus else "cpu"
        notes.append(f"launch.device=auto -> {launch.device} ({host.visible_gpus} visible NVIDIA GPUs on this machine)")
    gpus, own_request = cfg.slurm.gpus_per_node, [o for o in cfg.slurm.extra_sbatch if o.startswith(GPU_OPTIONS)]
    if launch.device == "cuda" and launch.backend == "slurm" and gpus is not None and gpus < launch.procs_per_node \
            and not own_request:
        raise ConfigError([f"slurm.gpus_per_node: {gpus} GPUs per node for launch.procs_per_node "
                           f"{launch.procs_per_node} training processes on cuda; each process needs its own GPU "
                           f"(ranks from local rank {gpus} on would find none): request at least "
                           f"{launch.procs_per_node}, or leave it unset (one per process)"])
    if launch.device == "cuda" and launch.backend == "torchrun" and launch.nodes == 1:
        if host.visible_gpus and launch.procs_per_node > host.visible_gpus:
            raise ConfigError([f"launch.procs_per_node: {launch.procs_per_node} processes but this machine has "
                               f"{host.visible_gpus} visible GPUs (one process per GPU; CUDA_VISIBLE_DEVICES counts)"])


def resolve_kernels(cfg: RunConfig, host: HostFacts, notes: list[str]) -> None:
    """Precision, attention kernel and optimizer: choices that fail at the first step when wrong."""
    t, device = cfg.train, cfg.launch.device
    if t.precision == "auto":
        t.precision = precision_for(device)
        why = "GPUs train in bf16" if device == "cuda" else "CPUs train in fp32"
        notes.append(f"train.precision=auto -> {t.precision} ({why})")
    if t.precision == "fp16" and device != "cuda":
        raise ConfigError([f"train.precision: 'fp16' trains only on CUDA GPUs (DeepSpeed: \"Type fp16 is not supported "
                           f"on your device\"), not {device}; use bf16 or fp32 (or auto)"])
    if cfg.model.attn_implementation == "flash_attention_2" and (device != "cuda" or t.precision == "fp32"):
        raise ConfigError([f"model.attn_implementation: 'flash_attention_2' runs only on CUDA GPUs in bf16 or fp16, "
                           f"not {device} in {t.precision}; use sdpa (or auto)"])
    if t.optimizer == "auto":
        if device != "cuda":
            t.optimizer = "torch"
        elif host.fused_adam.usable:
            t.optimizer = "fused"
            notes.append(f"train.optimizer=auto -> fused (DeepSpeed's FusedAdam: {host.fused_adam.reason} on this "
                         f"machine; every node checks again at start-up)")
        else:
            t.optimizer = "torch"
            notes.append(f"train.optimizer=auto -> torch (torch.optim.AdamW with fused kernels): "
                         f"{host.fused_adam.reason}")
    elif t.optimizer == "fused" and device != "cuda":
        raise ConfigError([f"train.optimizer: 'fused' (DeepSpeed's FusedAdam) needs CUDA GPUs, not {device}; "
                           f"use torch or auto"])


def resolve_slurm_resources(cfg: RunConfig, host: HostFacts, notes: list[str]) -> None:
    """A batch job that asks for no CPUs or memory may get one core and a small default per node."""
    s = cfg.slurm
    if cfg.launch.backend != "slurm":
        return
    if s.cpus_per_task == "auto":
        if host.slurm_node_cpus:
            s.cpus_per_task = host.slurm_node_cpus
            notes.append(f"slurm.cpus_per_task=auto -> {s.cpus_per_task} (all CPUs of a node of partition "
                         f"{s.partition or '(default)'}, from sinfo)")
        else:
            s.cpus_per_task = DEFAULT_CPUS_PER_RANK * cfg.launch.procs_per_node
            notes.append(f"slurm.cpus_per_task=auto -> {s.cpus_per_task} ({DEFAULT_CPUS_PER_RANK} per training "
                         f"process: sinfo did not answer here; set it to your nodes' CPU count)")
    if s.mem == "auto":
        s.mem = "0"
        notes.append("slurm.mem=auto -> 0 (all of each node's memory: every rank loads the model on the host)")
