"""`shardtune status RUN_DIR`: where a run is, from its files and (for SLURM jobs) the scheduler.

Torch-free and read-only, so it answers instantly on a login node while the job runs elsewhere.
"""
from __future__ import annotations

import time
from typing import Any

from launcher.backends import requeue, slurm
from launcher.contract.run_dir import STATUS, RunDir


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def collect(run_dir: RunDir) -> dict[str, Any]:
    """Everything status shows, as one JSON-able object."""
    out: dict[str, Any] = {"run_dir": str(run_dir.path)}
    out["status"] = run_dir.read_status()
    jobs = run_dir.read_jobs()
    if jobs:
        job_id = jobs[-1]["job_id"]
        info = slurm.job_info(job_id)
        out["slurm"] = {"job_id": job_id, "state": info.get("JobState") or slurm.accounting_state(job_id),
                        "restarts": int(info["Restarts"]) if "Restarts" in info else None,
                        "reason": info.get("Reason"), "nodes": info.get("NodeList"), "jobs_submitted": len(jobs)}
        record = requeue.read(run_dir)
        if record is not None and record.job == job_id:
            out["slurm"]["attempts_without_progress"] = record.fruitless
    train = run_dir.train_metrics()
    if train:
        out["last_step"] = {k: train[-1].get(k) for k in ("step", "loss", "tokens_per_sec", "lr", "time")}
    ckpts = run_dir.complete_checkpoints()
    out["newest_checkpoint"] = str(ckpts[0]) if ckpts else None
    out["heartbeats"] = run_dir.read_heartbeats()
    out["stack_dumps"] = [str(p) for p in run_dir.stack_dumps()]
    if run_dir.config_file.exists():
        config = run_dir.read_config()
        out["max_steps"] = config.get("train", {}).get("max_steps")
        out["max_requeues"] = config.get("slurm", {}).get("max_requeues")
    return out


def format_status(info: dict[str, Any]) -> str:
    now = time.time()
    lines = [f"run         {info['run_dir']}"]
    status = info.get("status")
    if status:
        by = {"signal": " on a signal", "request": " on request"}.get(status.get("stopped_by"), "")
        lines.append(f"state       {status['state']}{by} at step {status.get('step')} ({_age(now - status['time'])})"
                     + (f": {status['reason']}" if status.get("reason") else ""))
    else:
        lines.append(f"state       not started (no {STATUS})")
    if "slurm" in info:
        s = info["slurm"]
        lines.append(f"slurm       job {s['job_id']} {s['state'] or 'unknown to SLURM'}, restarts {s['restarts']}"
                     + (f", {s['reason']}" if s.get("reason") not in (None, "None") else "")
                     + (f", nodes {s['nodes']}" if s.get("nodes") not in (None, "(null)") else ""))
        if "attempts_without_progress" in s:
            n = s["attempts_without_progress"]
            lines.append(f"            {n} attempt{'' if n == 1 else 's'} in a row ended without a newer checkpoint "
                         f"(slurm.max_requeues {info.get('max_requeues')})")
    last = info.get("last_step")
    if last:
        loss = f"{last['loss']:.4f}" if last.get("loss") is not None else "skipped"
        lines.append(f"progress    step {last['step']}/{info.get('max_steps')}, loss {loss}, "
                     f"{last['tokens_per_sec']:,.0f} tokens/s ({_age(now - last['time'])})")
    lines.append(f"checkpoint  {info['newest_checkpoint'] or 'none yet'}")
    beats = info.get("heartbeats") or []
    if beats:
        ages = [now - b["time"] for b in beats]
        phases = ", ".join(f"{p}×{n}" for p, n in sorted(_count(b["phase"] for b in beats).items()))
        lines.append(f"heartbeats  {len(beats)} ranks, last written {_age(min(ages))} to {_age(max(ages))}; "
                     f"phases {phases}")
        for b in beats:
            if b.get("state") not in ("alive", "finished") or b.get("since_progress_s", 0) > 60:
                lines.append(f"            rank {b['rank']} on {b['host']}: {b.get('state')} in '{b['phase']}' at step "
                             f"{b['step']}, no progress for {b.get('since_progress_s')} s ({_age(now - b['time'])})")
    for path in info.get("stack_dumps") or []:
        lines.append(f"stacks      {path}")
    return "\n".join(lines)


def _count(items) -> dict:
    counts: dict = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts
