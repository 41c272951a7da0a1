"""Run one contender's process tree, watching each rank's peak RSS, and always clean it up.

The peak RSS of a rank is the kernel's own high-water mark (VmHWM in /proc/PID/status), read every
quarter second while the rank lives. It never decreases, so the last reading before a time is the
peak up to then (the bench takes it at the last training step, before any final save or export).
"""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil


class RunFailed(Exception):
    pass


class OverCap(RunFailed):
    """A process of the tree went over the RSS cap and the tree was stopped."""


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all processes, all cores)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and every descendant it has waited for."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class Finished:
    started: float
    """time.time() just before the process was started."""
    wall: float
    other_cores: float = 0.0
    """CPU used by processes outside this benchmark during the run, in cores (0 = the machine was ours)."""
    rss: list[tuple[float, dict[int, int]]] = field(default_factory=list)
    """(time, {rank: VmHWM bytes}) readings."""

    def peak_rss(self, until: float) -> dict[int, int]:
        best: dict[int, int] = {}
        for t, per_rank in self.rss:
            if t > until + 0.5:
                break
            for rank, v in per_rank.items():
                best[rank] = max(best.get(rank, 0), v)
        return best


def _vmhwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _rank_of(proc: psutil.Process) -> int | None:
    """A torchrun worker: has LOCAL_RANK in its environment and its parent (the agent) does not."""
    try:
        env = proc.environ()
        if "LOCAL_RANK" not in env or "RANK" not in env:
            return None
        parent = proc.parent()
        if parent is not None and "LOCAL_RANK" in parent.environ():
            return None
        return int(env["RANK"])
    except (psutil.Error, ValueError):
        return None


def run_tree(argv: list[str], log: Path, cwd: Path, env: dict[str, str], timeout: float, poll: float = 0.25,
             rss_cap: int | None = None) -> Finished:
    """Run argv in its own session; raise RunFailed (with the log's tail) on a non-zero exit or timeout.

    rss_cap (bytes): stop the tree and raise OverCap as soon as any of its processes has had a larger RSS
    (VmHWM never decreases, so a peak between two readings is still seen at the next one).
    """
    busy0, own0 = busy_cpu_seconds(), own_cpu_seconds()
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)
    done = Finished(started, 0.0)
    ranks: dict[int, int] = {}
    checked: set[int] = set()
    try:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            if time.time() - started > timeout:
                raise RunFailed(f"timed out after {timeout:.0f} s: {' '.join(argv)}\n{tail(log)}")
            try:
                for child in root.children(recursive=True):
                    if child.pid not in checked:
                        checked.add(child.pid)
                        rank = _rank_of(child)
                        if rank is not None:
                            ranks[child.pid] = rank
            except psutil.Error:
                pass
            reading = {rank: v for pid, rank in ranks.items() if (v := _vmhwm(pid)) is not None}
            if reading:
                done.rss.append((time.time(), reading))
            if rss_cap is not None:
                over = [(pid, v) for pid in checked if (v := _vmhwm(pid)) is not None and v > rss_cap]
                if over:
                    pid, v = max(over, key=lambda x: x[1])
                    raise OverCap(f"process {pid} reached {v / 1e9:.2f} GB > cap {rss_cap / 1e9:.2f} GB")
            time.sleep(poll)
    finally:
        if proc.poll() is None:
            _stop_group(proc)
    done.wall = time.time() - started
    done.other_cores = max(0.0, (busy_cpu_seconds() - busy0) - (own_cpu_seconds() - own0)) / done.wall
    if proc.returncode != 0:
        raise RunFailed(f"exit code {proc.returncode}: {' '.join(argv)}\n{tail(log)}")
    return done


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the process group this module started (and only that one)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            time.sleep(0.5)  # let the workers of the group exit too
        except subprocess.TimeoutExpired:
            continue
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
