"""A run's summary from its metrics rows: printed at the end of training and by `shardtune report`.

Rank-side (the end of a run prints it) and torch-free, so the report tool reuses it.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Optional

from launcher.contract.run_dir import RunDir


def summarize(rows: list[dict]) -> dict:
    """Totals and means over the training rows (eval rows only add the last eval loss)."""
    train = [r for r in rows if "tokens_per_sec" in r]
    evals = [r for r in rows if "eval_loss" in r]
    out: dict = {"steps": train[-1]["step"] if train else 0,
                 "trained_tokens": train[-1].get("trained_tokens") if train else 0}
    if train:
        out["first_loss"] = next((r["loss"] for r in train if r.get("loss") is not None), None)
        out["last_loss"] = next((r["loss"] for r in reversed(train) if r.get("loss") is not None), None)
        out["mean_tokens_per_sec"] = statistics.mean(r["tokens_per_sec"] for r in train)
        out["skipped_steps"] = train[-1].get("skipped_steps", 0)
        for key in ("mfu", "tflops_per_device"):
            values = [r[key] for r in train if r.get(key) is not None]
            if values:
                out[f"mean_{key}"] = statistics.mean(values)
        for key in ("mem_device_allocated_peak_gb", "mem_host_peak_rss_gb"):
            values = [r[key] for r in train if r.get(key) is not None]
            if values:
                out[key] = max(values)
        out["wall_time_s"] = train[-1]["time"] - train[0]["time"] + (train[0].get("step_time") or 0)
    if evals:
        out["eval_loss"] = evals[-1]["eval_loss"]
    return out


def format_run_summary(s: dict, final: Optional[Path] = None, checkpoint: Optional[Path] = None) -> str:
    lines = ["== run summary ==",
             f"steps            {s['steps']} ({s.get('skipped_steps', 0)} skipped)",
             f"trained tokens   {s.get('trained_tokens') or 0:,}"]
    if "wall_time_s" in s:
        lines.append(f"wall time        {s['wall_time_s']:.0f} s of training")
    if "first_loss" in s and s["first_loss"] is not None:
        lines.append(f"loss             {s['first_loss']:.4f} -> {s['last_loss']:.4f}"
                     + (f" (eval {s['eval_loss']:.4f})" if "eval_loss" in s else ""))
    if "mean_tokens_per_sec" in s:
        lines.append(f"tokens/s         {s['mean_tokens_per_sec']:,.0f} (trained tokens, all ranks)")
    if "mean_mfu" in s:
        lines.append(f"MFU              {100 * s['mean_mfu']:.1f}% "
                     f"({s['mean_tflops_per_device']:.1f} TFLOPs per device)")
    elif "mean_tflops_per_device" in s:
        lines.append(f"TFLOPs/device    {s['mean_tflops_per_device']:.3f} "
                     f"(no MFU: peak unknown; set launch.peak_tflops)")
    if "mem_host_peak_rss_gb" in s and "mem_device_allocated_peak_gb" in s:
        lines.append(f"peak memory      device {s['mem_device_allocated_peak_gb']:.2f} GB, "
                     f"host RSS {s['mem_host_peak_rss_gb']:.2f} GB")
    if final:
        lines.append(f"final model      {final}")
    if checkpoint:
        lines.append(f"checkpoints      {Path(checkpoint).parent} (newest {Path(checkpoint).name})")
    return "\n".join(lines)


def end_of_run_summary(run_dir: RunDir, started: float, final: Path, checkpoint: Path) -> str:
    """The table printed at the end of training (rows of earlier attempts included: it is one run)."""
    return (format_run_summary(summarize(run_dir.read_metrics()), final, checkpoint)
            + f"\n(this launch: {time.time() - started:.0f} s)")
