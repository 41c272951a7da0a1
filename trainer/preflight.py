"""Checks every rank runs together at job start, before the model loads, so a broken node fails the
job in seconds instead of hanging a reservation.

Each rank reports where it runs and what it has; the reports are gathered and compared on every
rank: world size, library versions, a writable run directory with room for the checkpoints, whole
weight files of the model on every node, and an all-reduce that must give the expected value. A
rank's own failure is caught and reported rather than raised, so one bad rank cannot leave the others
waiting in the gather. The bandwidth of a larger all-reduce is measured, and the device's peak FLOPs
are looked up or, where no data sheet has them (CPUs), probed on every rank.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Optional

import psutil
import torch
import torch.distributed as dist

from launcher.contract.errors import UserError
from launcher.contract.run_dir import RunDir
from launcher.planning.checkpoint_size import DiskNeed, disk_verdict, free_space, reserve_verdict
from launcher.planning.memory_plan import HostNeed
from launcher.planning.model_files import absent_model, absent_weights, weight_files_problems
from trainer import faults, ops
from trainer.distributed import Dist, all_gather_objects
from trainer.peak_probe import Peak, device_peak

PACKAGES = ("torch", "deepspeed", "transformers")
BANDWIDTH_BYTES = 16 << 20


class PreflightError(UserError):
    """A preflight check failed; the message names the node, the rank and what differs."""


def versions(rank: int) -> dict[str, str]:
    import deepspeed
    import transformers

    found = {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__}
    found.update(faults.fake_versions(rank))
    return found


def can_write(run_dir: RunDir, rank: int) -> Optional[str]:
    """None when this rank can create, fsync and remove a file in the run directory; else why not."""
    target = faults.unwritable_dir(rank) or run_dir.preflight_probes
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / f"rank_{rank:05d}.{os.getpid()}"
        with open(probe, "w") as fh:
            fh.write("ok")
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
        return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def report(run_dir: RunDir, d: Dist, ds_config: Optional[dict] = None, model: Optional[str] = None,
           disk: Optional[DiskNeed] = None) -> dict:
    """What this rank has. The model's weight files are checked once per node (by its local rank 0): the nodes
    may each hold their own copy, and 64 ranks reading every shard's header of one shared copy would only load the
    filesystem's metadata servers. Rank 0 alone reserves the checkpoints' bytes (reserve_verdict)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    try:
        free_device = acc.available_memory(d.local_rank)
    except Exception:  # noqa: BLE001 - not every accelerator can tell
        free_device = None
    damaged = [p for p in [absent_model(model), absent_weights(model)] + weight_files_problems(model) if p] \
        if model and d.local_rank == 0 else []
    disk_free = free_space(run_dir.checkpoints)
    reserve = reserve_verdict(disk, disk_free, run_dir.checkpoints) if disk is not None and d.rank == 0 else ("", "")
    return {"rank": d.rank, "local_rank": d.local_rank, "host": socket.gethostname(), "device": str(d.device),
            "free_device_gb": None if free_device is None else round(free_device / 1e9, 2),
            "free_host_gb": round(psutil.virtual_memory().available / 1e9, 2), "versions": versions(d.rank),
            "write_error": can_write(run_dir, d.rank), "disk_free": disk_free, "disk_reserve": reserve,
            "weight_files": [f"{model}: {p}" for p in damaged],
            "op_errors": ops.unavailable(ds_config or {}, d.device.type) + faults.unbuildable_ops(d.rank)}


def compare(reports: list[dict], expected_world: int, disk: Optional[DiskNeed] = None) -> list[str]:
    """Every problem, each naming the rank and host it concerns."""
    problems = []
    hosts_seeing: dict[str, list[str]] = {}
    for r in reports:
        for p in r.get("weight_files", []):
            hosts_seeing.setdefault(p, []).append(r["host"])
    problems += [f"model.name_or_path: {p} (seen {_on_hosts(hosts)})" for p, hosts in hosts_seeing.items()]
    if disk is not None:
        problems += sorted({f"on {r['host']}: {p}" for r in reports if (p := disk_verdict(disk, r["disk_free"])[0])})
        problems += [f"on {r['host']}: {r['disk_reserve'][0]}" for r in reports if r["disk_reserve"][0]]
    if len(reports) != expected_world:
        problems.append(f"world size is {len(reports)}, the plan says {expected_world}")
    reference = reports[0]["versions"]
    for r in reports:
        where = f"rank {r['rank']} on {r['host']}"
        for pkg in PACKAGES:
            if r["versions"][pkg] != reference[pkg]:
                problems.append(f"{where} has {pkg} {r['versions'][pkg]}, rank 0 on {reports[0]['host']} has "
                                f"{reference[pkg]}")
        if r["write_error"]:
            problems.append(f"{where} cannot write to the run directory: {r['write_error']}")
        problems += [f"{where} cannot load a compiled op the run needs: {e}" for e in r.get("op_errors", [])]
    return problems


def _on_hosts(hosts: list[str]) -> str:
    return f"on {', '.join(hosts[:3])}" + (f" and {len(hosts) - 3} more hosts" if len(hosts) > 3 else "")


def all_reduce_check(d: Dist) -> Optional[str]:
    """The sum of (rank + 1) over ranks is known in advance; anything else means a broken transport."""
    t = torch.full((1024,), float(d.rank + 1), device=d.device)
    dist.all_reduce(t)
    expected = d.world * (d.world + 1) / 2
    return None if torch.all(t == expected).item() else f"all-reduce gave {t[0].item()}, expected {expected}"


def bandwidth(d: Dist, nbytes: int = BANDWIDTH_BYTES, iterations: int = 3) -> dict:
    """Bus bandwidth of an fp32 all-reduce (the NCCL-tests convention: algbw × 2(n-1)/n)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    t = torch.ones(nbytes // 4, dtype=torch.float32, device=d.device)
    dist.all_reduce(t)  # warm-up: connection setup is not bandwidth
    acc.synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        dist.all_reduce(t)
    acc.synchronize()
    seconds = (time.perf_counter() - start) / iterations
    algbw = nbytes / seconds
    return {"bytes": nbytes, "seconds": seconds, "busbw_gbps": algbw * 2 * (d.world - 1) / d.world / 1e9}


def format_flops(tflops: float) -> str:
    return f"{tflops:,.1f} TFLOP/s" if tflops >= 1 else f"{tflops * 1000:,.1f} GFLOP/s"


def describe_peak(peak: Peak) -> str:
    if peak.tflops is None:
        return "no peak FLOPs"
    where = {"config": "launch.peak_tflops", "table": "data sheet",
             "probe": "matmul probe, median of " + ", ".join(format_flops(p) for p in peak.per_rank)}[peak.source]
    return f"peak {format_flops(peak.tflops)} per device ({where})"


def run_preflight(run_dir: RunDir, d: Dist, expected_world: int, log, ds_config: Optional[dict] = None,
                  precision: str = "fp32", configured_peak: Optional[float] = None,
                  disk: Optional[DiskNeed] = None, model: Optional[str] = None,
                  host: Optional[HostNeed] = None) -> dict:
    """All checks; raises PreflightError on every rank when any rank has a problem. The result's "peak" is
    the device peak MFU is computed against (trainer/peak_probe.py). `disk`, the run's checkpoint footprint
    (None when the model cannot be sized), is checked against the free space every rank sees; `model`, the model's
    name or path, has its weight files checked on every node (launcher/planning/model_files.py); `host`, the host
    RAM a node needs at the run's peak, against what each node has available (GPUs: on CPU the host is the device,
    whose plan is its own). Too little host RAM is a warning, not a failure: part of a peak can be page cache the
    kernel reclaims (ZeRO-3 loads the checkpoint through it), and the estimate is a planned peak."""
    started = time.perf_counter()
    reports = all_gather_objects(report(run_dir, d, ds_config, model, disk))
    problems = compare(reports, expected_world, disk)
    bad_sum = all_reduce_check(d)
    if bad_sum:
        problems.append(bad_sum)
    if problems:
        raise PreflightError("preflight failed:\n  - " + "\n  - ".join(problems))
    if disk is not None:
        for warning in sorted({w for r in reports for w in (disk_verdict(disk, r["disk_free"])[1],
                                                            r["disk_reserve"][1]) if w}):
            log(f"warning: {warning}")
    if host is not None and d.device.type != "cpu":
        available = {r["host"]: r["free_host_gb"] for r in reports}
        for warning in [host.warning(name, gb) for name, gb in sorted(available.items())]:
            if warning:
                log(f"warning: {warning}")
    bw = bandwidth(d)
    peak = device_peak(d, precision, configured_peak)
    hosts = sorted({r["host"] for r in reports})
    log(f"preflight ok in {time.perf_counter() - started:.1f} s: {len(reports)} ranks on {len(hosts)} host(s) "
        f"({', '.join(hosts[:8])}{' ...' if len(hosts) > 8 else ''}); torch {reports[0]['versions']['torch']}, "
        f"deepspeed {reports[0]['versions']['deepspeed']}, transformers {reports[0]['versions']['transformers']}; "
        f"all-reduce bus bandwidth {bw['busbw_gbps']:.2f} GB/s ({bw['bytes'] >> 20} MiB); {describe_peak(peak)}")
    return {"ranks": reports, "bandwidth": bw, "peak": peak.to_json()}
