"""The sbatch script for a run, rendered from slurm/launch.sbatch.template, and talking to SLURM.

Rendering is a pure function of the resolved config. `#SBATCH` lines only ever hold literal values
(SLURM does not expand variables there); everything that depends on the allocation is computed by
the script when it runs, and anything that differs per node is escaped so each node expands its own.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from launcher.backends.torchrun import agent_env, default_env
from launcher.contract import run_dir
from launcher.contract.config import RunConfig
from launcher.contract.resources import data_dir
from launcher.contract.run_dir import RunDir

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                "PREEMPTED"}


RDZV_PORTS = range(29400, 29900)
"""Where a job's torchrun rendezvous listens on its head node: its preferred port is 29400 + job id % 500."""


def free_rdzv_port(job_id: int) -> int:
    """The job's rendezvous port: its preferred one, or the next in RDZV_PORTS (wrapping) nothing on this host
    listens on. Run by the batch script on the head node when each attempt starts. The preferred port alone
    collided when two jobs shared a head node (ids 500 apart, or another program on that port): the second job's
    agents failed to start, and every requeue failed the same way."""
    import errno
    import socket

    def free(port: int) -> bool:
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            try:
                with socket.socket(family, socket.SOCK_STREAM) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's store binds
                    sock.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return False  # not EAFNOSUPPORT or EADDRNOTAVAIL: a host without IPv6 says nothing of the port
        return True

    start = job_id % len(RDZV_PORTS)
    ports = [RDZV_PORTS[(start + i) % len(RDZV_PORTS)] for i in range(len(RDZV_PORTS))]
    return next((p for p in ports if free(p)), ports[0])


def gpus_per_node(cfg: RunConfig) -> int:
    if cfg.slurm.gpus_per_node is not None:
        return cfg.slurm.gpus_per_node
    return cfg.launch.procs_per_node if cfg.launch.device == "cuda" else 0


def mem_bytes(mem: str) -> Optional[int]:
    """Bytes of a `--mem` value as SLURM reads it (no suffix: megabytes; K/M/G/T are powers of 1024);
    None for 0, which asks for all of a node's memory."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = (mem[:-1], mem[-1]) if mem[-1] in units else (mem, "M")
    return int(number) * units[unit] or None


def sbatch_value(value: str) -> str:
    """A value as one #SBATCH argument: sbatch splits those lines at whitespace unless it is inside double
    quotes, where a backslash escapes the next character (checked with SLURM 22.05's sbatch)."""
    if not any(ch.isspace() or ch in '"\\' for ch in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sbatch_lines(cfg: RunConfig) -> list[str]:
    """Every #SBATCH option, literal values only."""
    s = cfg.slurm
    run = RunDir(cfg.output_dir)
    log_pattern = str(run.path).replace("%", "%%") + "/" + run.slurm_log().name  # %j stays SLURM's pattern
    opts = [f"--job-name={sbatch_value(s.job_name or run.path.name)}", f"--nodes={cfg.launch.nodes}",
            "--ntasks-per-node=1", f"--time={s.time}", f"--output={sbatch_value(log_pattern)}", "--open-mode=append",
            "--requeue", f"--signal=B:USR1@{s.signal_lead_s}"]
    gpus = gpus_per_node(cfg)
    if gpus:
        opts.append(f"--gpus-per-node={gpus}")
    if s.cpus_per_task == "auto" or s.mem == "auto":
        raise ValueError("sbatch_lines needs a resolved config "
                         "(slurm.cpus_per_task and slurm.mem decided by plan.resolve)")
    for flag, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos),
                        ("cpus-per-task", s.cpus_per_task), ("mem", s.mem), ("constraint", s.constraint)):
        if value is not None:
            opts.append(f"--{flag}={sbatch_value(str(value))}")
    if s.exclusive:
        opts.append("--exclusive")
    opts += s.extra_sbatch
    return [f"#SBATCH {o}" for o in opts]


def per_node_torchrun(cfg: RunConfig, python: str, trainer_args: tuple[str, ...] = ()) -> str:
    """The command every node runs; $SLURM_JOB_NUM_NODES, $RDZV_ENDPOINT, $SLURM_JOB_ID are the same on all nodes."""
    argv = [python, "-m", "torch.distributed.run", "--nnodes=$SLURM_JOB_NUM_NODES",
            f"--nproc_per_node={cfg.launch.procs_per_node}", "--rdzv_backend=c10d", "--rdzv_endpoint=$RDZV_ENDPOINT",
            "--rdzv_id=$SLURM_JOB_ID", f"--max_restarts={cfg.launch.max_restarts}",
            f"--rdzv_conf=join_timeout={cfg.launch.rdzv_timeout_s}", "-m", "trainer", cfg.output_dir, *trainer_args]
    monitor = f"{shlex.quote(python)} -m launcher.backends.monitor {shlex.quote(cfg.output_dir)} &"
    # exec keeps the shell's pid, so the monitor's parent stays put until torchrun ends (and the monitor with it).
    return monitor + " exec " + " ".join(a if "$" in a else shlex.quote(a) for a in argv)


def render_sbatch(cfg: RunConfig, env: dict[str, str], python: str = sys.executable,
                  trainer_args: tuple[str, ...] = ()) -> str:
    """The batch script text for a resolved config; env is what every training process gets (launch.env last)."""
    template = (data_dir("slurm") / "launch.sbatch.template").read_text()
    defaults = {**default_env("$RUN_DIR"), **agent_env(cfg),
                **{k: v for k, v in env.items() if k not in cfg.launch.env}}
    values = {
        "SBATCH_LINES": "\n".join(sbatch_lines(cfg)),
        "RUN_DIR": shlex.quote(cfg.output_dir),
        "STOP_FILE": run_dir.STOP, "STATUS_FILE": run_dir.STATUS, "NCCL_TRACES": run_dir.NCCL_TRACES,
        "CHECKPOINTS": run_dir.CHECKPOINTS,
        "MAX_REQUEUES": str(cfg.slurm.max_requeues),
        "SETUP": "\n".join(cfg.slurm.setup) or ":",
        "DEFAULT_ENV": "\n".join(f'export {k}="${{{k}:-{v}}}"' for k, v in defaults.items()),
        "USER_ENV": "\n".join(f"export {k}={shlex.quote(v)}" for k, v in cfg.launch.env.items()) or ":",
        "PYTHON": shlex.quote(python),
        "TORCHRUN": per_node_torchrun(cfg, python, trainer_args).replace('"', '\\"'),
    }
    for key, value in values.items():
        template = template.replace(f"@@{key}@@", value)
    return template


# ---- talking to SLURM (only the CLI calls these) -------------------------------------------------

def submit(script: Path) -> str:
    """sbatch the script; the job id."""
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def job_info(job_id: str) -> dict[str, str]:
    """JobState, Restarts, Reason, ... from `scontrol show job` ({} once SLURM has forgotten the job)."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if proc.returncode != 0:
        return {}
    info = {}
    for field in proc.stdout.split():
        key, sep, value = field.partition("=")
        if sep:
            info[key] = value
    return info


def accounting_state(job_id: str) -> Optional[str]:
    """The final state from sacct for jobs scontrol no longer shows (needs accounting or jobcomp)."""
    for args in (["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id],
                 ["sacct", "-c", "-n", "-P", "-o", "State", "-j", job_id]):
        proc = subprocess.run(args, capture_output=True, text=True)
        states = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
        if proc.returncode == 0 and states:
            return states[-1]
    return None


def wait_for(job_id: str, poll_s: float = 2.0, on_change=print) -> str:
    """Block until the job reaches a final state (a requeued job is not final); that state."""
    last = None
    while True:
        info = job_info(job_id)
        state = info.get("JobState") or accounting_state(job_id) or "UNKNOWN"
        shown = f"{state} (restarts {info.get('Restarts', '?')}, {info.get('Reason', '')})"
        if shown != last:
            on_change(f"job {job_id}: {shown}")
            last = shown
        if state in FINAL_STATES:
            return state
        time.sleep(poll_s)


def slurm_node_cpus(partition: Optional[str]) -> Optional[int]:
    """CPUs per node of a partition (the smallest node, so the request fits any of them); None if sinfo fails."""
    if not shutil.which("sinfo"):
        return None
    args = ["sinfo", "--noheader", "--Node", "--format=%c"] + ([f"--partition={partition}"] if partition else [])
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    counts = [int(x) for x in proc.stdout.split() if x.isdigit()]
    return min(counts) if proc.returncode == 0 and counts else None


@dataclass(frozen=True)
class Preemption:
    """How SLURM stops a partition's jobs for a higher-priority one: REQUEUE or CANCEL, after GraceTime seconds of
    SIGTERM (the job's processes get it, not only the batch shell)."""

    partition: str
    mode: str
    grace_s: int


def preemption_of(fields: dict[str, str]) -> Optional[Preemption]:
    """From one partition's `scontrol show partition --oneliner` fields; None unless its jobs are stopped with a grace
    time. A GraceTime of 0 says nothing (it is the default of every partition, preemptible or not), and SUSPEND or
    GANG pause a job instead of stopping it."""
    mode = fields.get("PreemptMode", "OFF").split(",")[0].upper()
    grace = fields.get("GraceTime", "0")
    if mode not in ("REQUEUE", "CANCEL") or not grace.isdigit() or int(grace) == 0:
        return None
    return Preemption(fields.get("PartitionName", "?"), mode, int(grace))


def partition_preemption(partition: Optional[str]) -> Optional[Preemption]:
    """The preemption of the partition a job goes to (the default one when None); None when scontrol does not
    answer or the partition's jobs are not stopped with a grace time."""
    if not shutil.which("scontrol"):
        return None
    try:
        proc = subprocess.run(["scontrol", "show", "partition", "--oneliner", *([partition] if partition else [])],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode:
        return None
    for line in proc.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if partition is not None or fields.get("Default") == "YES":
            return preemption_of(fields)
    return None
