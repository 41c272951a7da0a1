"""`shardtune report`: PNG plots of a run's metrics, for people who cannot reach wandb from the cluster.

Needs no torch (matplotlib only).
"""
from __future__ import annotations

from pathlib import Path

from launcher.contract.run_dir import RunDir

PLOTS = [("loss", ["loss", "eval_loss"], "loss"), ("lr", ["lr"], "learning rate"),
         ("throughput", ["tokens_per_sec", "total_tokens_per_sec"], "tokens/s"),
         ("memory", ["mem_device_allocated_peak_gb", "mem_host_rss_gb", "mem_host_peak_rss_gb"], "GB")]


def write_plots(run_dir: RunDir) -> list[Path]:
    """One PNG per panel, next to the metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = run_dir.read_metrics()
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
            # from zero: a 1% drift is not a leak; room for the legend
            ax.set_ylim(0, max(values) * 1.4 if values else 1)
        ax.set_title(f"{run_dir.path.name}: {name}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = run_dir.path / f"report_{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
