"""Which job owns a run directory, and whether it is still alive.

Two jobs in one output_dir (a second `launch` by mistake, a requeue racing a manual relaunch) would rewrite
each other's plan, delete each other's saves and mix their shards in one manifest. So the job that trains
records itself in the run directory (`owner.json`), and anyone else refuses to start while that job lives.
Identity: the SLURM job id (requeues keep it), or the torchrun agent (host, pid and the pid's start time;
torchrun's restarts keep it). Liveness: SLURM's view of the job, the process table on the same host, or,
for a torchrun owner on another host, whether any rank's heartbeat is recent. No flock: it is unreliable on
the shared filesystems run directories live on; the record is created atomically (link) instead.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from typing import Optional

import psutil

from launcher.contract.run_dir import RunDir

LIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                     "SUSPENDED", "RESIZING", "STAGE_OUT", "SIGNALING", "PREEMPTED"}
HEARTBEAT_FRESH_S = 60.0  # heartbeats are written every few seconds by a live rank


def _start_time(pid: int) -> Optional[float]:
    try:
        return round(psutil.Process(pid).create_time(), 2)
    except psutil.Error:
        return None


def this_job(environ: Optional[dict] = None) -> dict:
    """The identity of the job this process belongs to (a training rank or the torchrun agent above it)."""
    env = os.environ if environ is None else environ
    if env.get("SLURM_JOB_ID"):
        return {"slurm_job_id": env["SLURM_JOB_ID"], "host": socket.gethostname()}
    agent = os.getppid() if "TORCHELASTIC_RUN_ID" in env else os.getpid()
    return {"host": socket.gethostname(), "pid": agent, "pid_start": _start_time(agent),
            "torchrun_run_id": env.get("TORCHELASTIC_RUN_ID")}


def same_job(a: dict, b: dict) -> bool:
    if a.get("slurm_job_id") or b.get("slurm_job_id"):
        return a.get("slurm_job_id") == b.get("slurm_job_id")
    return (a.get("host"), a.get("pid"), a.get("pid_start")) == (b.get("host"), b.get("pid"), b.get("pid_start"))


def describe(owner: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
    if owner.get("slurm_job_id"):
        return f"SLURM job {owner['slurm_job_id']} (since {since})"
    return f"pid {owner.get('pid')} on {owner.get('host')} (torchrun, since {since})"


def alive(owner: dict, run_dir: RunDir) -> bool:
    """Whether the recorded owner still runs (or is queued to run again)."""
    if owner.get("slurm_job_id"):
        try:
            out = subprocess.run(["scontrol", "show", "job", "-o", str(owner["slurm_job_id"])], capture_output=True,
                                 text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return True  # cannot ask SLURM: assume the job lives rather than risk two jobs in one directory
        state = next((f.split("=", 1)[1] for f in out.stdout.split() if f.startswith("JobState=")), None)
        return out.returncode == 0 and state in LIVE_SLURM_STATES
    if owner.get("host") == socket.gethostname():
        return owner.get("pid") is not None and _start_time(int(owner["pid"])) == owner.get("pid_start")
    now = time.time()
    return any(now - b.get("time", 0) < HEARTBEAT_FRESH_S for b in run_dir.read_heartbeats())


def live_owner(run_dir: RunDir, us: Optional[dict] = None) -> Optional[dict]:
    """The recorded owner when it is alive and is not `us`; None when the directory is free (or ours)."""
    owner = run_dir.read_owner()
    if owner is None or (us is not None and same_job(owner, us)) or not alive(owner, run_dir):
        return None
    return owner


def claim(run_dir: RunDir, log=print) -> Optional[dict]:
    """Make this job the owner; returns the live owner that prevents it, or None once claimed."""
    us = {**this_job(), "since": time.time()}
    for _ in range(5):
        owner = run_dir.read_owner()
        if owner is not None and same_job(owner, us):
            return None  # a restart or requeue of the same job
        if owner is not None:
            if alive(owner, run_dir):
                return owner
            if run_dir.drop_owner(owner):
                log(f"taking over {run_dir.path} from {describe(owner)}, which is no longer running")
            continue
        if run_dir.claim_owner(us):
            return None
    return run_dir.read_owner()


def release(run_dir: RunDir) -> None:
    """At the end of a job: the directory is free again (only if we still own it)."""
    owner = run_dir.read_owner()
    if owner is not None and same_job(owner, this_job()):
        run_dir.drop_owner(owner)
