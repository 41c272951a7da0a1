"""Reading a run back from metrics.jsonl: the end-of-run summary and `shardtune report` plots.

For people who cannot reach wandb from the cluster, and for the last lines of every run's log.
Needs no torch (matplotlib only for the plots).
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Optional

from launcher.layout import METRICS


def read_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def summarize(rows: list[dict]) -> dict:
    """Totals and means over the training rows (eval rows only add the last eval loss)."""
    train = [r for r in rows if "tokens_per_sec" in r]
    evals = [r for r in rows if "eval_loss" in r]
    out: dict = {"steps": train[-1]["step"] if train else 0, "trained_tokens": train[-1].get("trained_tokens") if train else 0}
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


def format_summary(s: dict, final: Optional[Path] = None, checkpoint: Optional[Path] = None) -> str:
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
        lines.append(f"MFU              {100 * s['mean_mfu']:.1f}% ({s['mean_tflops_per_device']:.1f} TFLOPs per device)")
    elif "mean_tflops_per_device" in s:
        lines.append(f"TFLOPs/device    {s['mean_tflops_per_device']:.3f} (no MFU: peak unknown; set launch.peak_tflops)")
    if "mem_host_peak_rss_gb" in s and "mem_device_allocated_peak_gb" in s:
        lines.append(f"peak memory      device {s['mem_device_allocated_peak_gb']:.2f} GB, host RSS {s['mem_host_peak_rss_gb']:.2f} GB")
    if final:
        lines.append(f"final model      {final}")
    if checkpoint:
        lines.append(f"checkpoints      {Path(checkpoint).parent} (newest {Path(checkpoint).name})")
    return "\n".join(lines)


def run_summary(run_dir: Path, started: float, final: Path, checkpoint: Path) -> str:
    """The table printed at the end of training (rows of earlier attempts included: it is one run)."""
    return format_summary(summarize(read_rows(run_dir)), final, checkpoint) + f"\n(this launch: {time.time() - started:.0f} s)"


PLOTS = [("loss", ["loss", "eval_loss"], "loss"), ("lr", ["lr"], "learning rate"),
         ("throughput", ["tokens_per_sec", "total_tokens_per_sec"], "tokens/s"),
         ("memory", ["mem_device_allocated_peak_gb", "mem_host_rss_gb", "mem_host_peak_rss_gb"], "GB")]


def write_plots(run_dir: Path) -> list[Path]:
    """One PNG per panel next to metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(run_dir)
    written = []
    for name, keys, ylabel in PLOTS:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        drawn = False
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3, label=key)
                drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        values = [v for line in ax.get_lines() for v in line.get_ydata() if v > 0]
        if name == "loss" and values and max(values) / min(values) > 20:
            ax.set_yscale("log")  # fine-tuning losses fall by orders of magnitude
        elif name in ("throughput", "memory"):
            ax.set_ylim(0, max(values) * 1.4 if values else 1)  # from zero: a 1% drift is not a leak; room for the legend
        ax.set_title(f"{Path(run_dir).name}: {name}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = Path(run_dir) / f"report_{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
