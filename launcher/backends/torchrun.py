"""The torchrun command that starts `python -m trainer RUN_DIR` on every rank, and the script around it.

Pure functions: config in, argv and script text out (reading only this machine's CPU count, which a one-node run
trains on). Only the CLI writes or runs them.
"""
from __future__ import annotations

import os
import shlex
import socket
import sys
from typing import Optional

from launcher.contract.config import RunConfig
from launcher.contract.run_dir import NCCL_TRACES, RunDir

DEFAULT_RDZV_PORT = 29400


def rdzv_endpoint(cfg: RunConfig) -> str:
    """host:port every node's torchrun agent meets at; the first node's address by default."""
    return cfg.launch.rdzv_endpoint or f"{socket.getfqdn()}:{DEFAULT_RDZV_PORT}"


def torchrun_argv(cfg: RunConfig, python: str = sys.executable, trainer_args: tuple[str, ...] = ()) -> list[str]:
    """torchrun for this run. One node: --standalone (a free local port). Several: a c10d rendezvous."""
    argv = [python, "-m", "torch.distributed.run"]
    if cfg.launch.nodes == 1:
        argv += ["--standalone", "--nnodes=1"]
    else:
        argv += [f"--nnodes={cfg.launch.nodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint(cfg)}",
                 f"--rdzv_id={rdzv_id(cfg)}"]
    argv += [f"--nproc_per_node={cfg.launch.procs_per_node}", f"--max_restarts={cfg.launch.max_restarts}",
             f"--rdzv_conf=join_timeout={cfg.launch.rdzv_timeout_s}", "-m", "trainer", cfg.output_dir, *trainer_args]
    return argv


def rdzv_id(cfg: RunConfig) -> str:
    """A rendezvous id shared by all nodes of one run and different between runs."""
    return "shardtune-" + "".join(ch if ch.isalnum() else "-" for ch in cfg.output_dir.strip("/"))[-48:]


def double_quoted(text: str) -> str:
    """text escaped for the inside of a bash double-quoted string."""
    return "".join("\\" + ch if ch in '\\"$`' else ch for ch in text)


def default_env(run_dir: str) -> dict[str, str]:
    """Settings that make failures fail fast and be explained; the environment a job starts in overrides them.

    NCCL's flight recorder records only with a trace buffer, and its dumps go to the run directory (which
    every node can read afterwards), not to each node's own /tmp. `run_dir` may be a shell expression.
    torch 2.7 renamed the flight recorder's variables (the old names still work, with a warning per rank).
    """
    fr_names = (("TORCH_FR_BUFFER_SIZE", "TORCH_FR_DUMP_TEMP_FILE") if installed_version("torch") >= (2, 7)
                else ("TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"))
    return {"OMP_NUM_THREADS": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_DEBUG": "WARN",
            "TORCH_NCCL_DUMP_ON_TIMEOUT": "1", fr_names[0]: "2000", fr_names[1]: f"{run_dir}/{NCCL_TRACES}/rank_"}


def agent_env(cfg: RunConfig) -> dict[str, str]:
    """How long torchrun's agent lets its workers finish after a SIGTERM: `slurm.signal_lead_s`, the time a save is
    planned to fit in, instead of torch's 30 s.

    SLURM's own preemption (PreemptMode=REQUEUE with a partition's GraceTime) signals every process of the job,
    torchrun's agents included, not only the batch shell that `--signal=B:USR1` reaches; without SLURM, a
    scheduler's or a user's SIGTERM reaches the whole process group (`shardtune launch` passes it on). The
    workers take the SIGTERM as a stop request and save; the agent SIGKILLs them when its shutdown timeout ends,
    in the middle of that save when it takes longer (a 70B model's does). A partition's GraceTime still bounds
    it from outside.
    """
    return {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(cfg.slurm.signal_lead_s)}


def cpu_threads_per_rank(cfg: RunConfig) -> Optional[int]:
    """OMP_NUM_THREADS for a rank whose optimizer is offloaded on a GPU node: DeepSpeed's CPU Adam steps the
    rank's partition with OpenMP, and torchrun's default (1 thread) would step each rank on one core while the
    rest of the node's CPUs idle. The node's CPUs (SLURM's cpus_per_task, else this machine's for a one-node
    torchrun run) over its ranks; None where nothing is offloaded or the node is not known."""
    if cfg.launch.device != "cuda" or cfg.zero.offload_optimizer != "cpu":
        return None
    if cfg.launch.backend == "slurm" and isinstance(cfg.slurm.cpus_per_task, int):
        cpus = cfg.slurm.cpus_per_task
    elif cfg.launch.backend == "torchrun" and cfg.launch.nodes == 1:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    else:
        return None
    return max(1, cpus // cfg.launch.procs_per_node)


def process_env(cfg: RunConfig) -> dict[str, str]:
    """Environment for the training processes: the accelerator choice, CPU threads where the optimizer is offloaded
    (cpu_threads_per_rank), then the user's launch.env."""
    env = {"DS_ACCELERATOR": cfg.launch.device}
    threads = cpu_threads_per_rank(cfg)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(cfg.launch.env)
    return env


def launch_script(cfg: RunConfig, argv: list[str], defaults: Optional[dict[str, str]] = None) -> str:
    """A bash script a user can rerun by hand: the environment and the exact torchrun command. `defaults`: variables
    set unless the environment the script starts in sets them."""
    lines = ["#!/usr/bin/env bash",
             "# Written by `shardtune launch`; rerun it to run again (it resumes from the newest checkpoint).",
             "set -euo pipefail"]
    if cfg.launch.nodes > 1:
        lines.append(f"# Start this same script on each of the {cfg.launch.nodes} nodes; "
                     f"they meet at {rdzv_endpoint(cfg)}.")
    if cfg.launch.device == "cuda":
        lines.append(f"mkdir -p {shlex.quote(str(RunDir(cfg.output_dir).nccl_traces))}")
        lines += [f'export {k}="${{{k}:-{v}}}"' for k, v in default_env(double_quoted(cfg.output_dir)).items()
                  if k != "OMP_NUM_THREADS"]
    lines += [f'export {k}="${{{k}:-{double_quoted(v)}}}"' for k, v in {**agent_env(cfg), **(defaults or {})}.items()]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in process_env(cfg).items()]
    python, run_dir = shlex.quote(argv[0]), shlex.quote(cfg.output_dir)
    lines += ["# A monitor outside the training processes kills a frozen rank (so torchrun restarts the job); when",
              "# torchrun gives up, the post-mortem names the rank, the cause and the checkpoint to resume from.",
              "STARTED=$(date +%s.%N)  # sub-second: a status from earlier in the same second is not this attempt's",
              f"{python} -m launcher.backends.monitor {run_dir} &",
              "trap 'kill $! 2>/dev/null || true' EXIT",
              "# A SIGTERM to the process group (`shardtune launch` passes one on) asks the ranks to save and stop:",
              "# this shell waits for them (and runs the post-mortem) instead of ending at once.",
              "trap ':' TERM",
              "CODE=0",
              " ".join(shlex.quote(a) for a in argv) + " || CODE=$?",
              f"{python} -m launcher.backends.postmortem {run_dir} \"$CODE\" \"$STARTED\"",
              'exit "$CODE"']
    return "\n".join(lines) + "\n"


def installed_version(package: str) -> tuple[int, ...]:
    """(major, minor) of an installed package from its metadata, without importing it; (0,) when absent."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version(package)
    except PackageNotFoundError:
        return (0,)
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)
