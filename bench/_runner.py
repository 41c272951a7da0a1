"""What every benchmark shares: running a process tree and watching it, a quiet machine, CPU time.

- `run_tree` starts a command in its own session, finds the torchrun workers under it (and their
  ranks), reads each one's peak RSS, calls the benchmark's own `watch` on every poll (to reset a
  high-water mark at a step, sample memory while an export runs, attach a profiler), enforces a
  timeout and always ends the process group it started, and only that one.
- `capped_run` runs a command under a per-process RSS cap and bench/_max_rss.py, and `doubling_search` doubles
  a run's sequence length while it stays under the cap (the long-context benches).
- `wait_for_quiet` waits until the 1-minute load average is low: the machine is shared.
- `machine_words` names the machine a table was measured on: the VM behind this project has changed
  CPU between sessions, and absolute rates move with it.
- `busy_cpu_seconds` (the whole machine) and `own_cpu_seconds` (this process and the children it
  waited for) give, as a difference, the CPU other users took during a run.

The peak RSS of a rank is the kernel's own high-water mark (VmHWM in /proc/PID/status). It never
decreases, so the last reading before a time is the peak up to then (the throughput bench takes it
at the last training step, before any final save or export).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import psutil

REPO = Path(__file__).resolve().parent.parent
PYTHON = Path(sys.executable)
SHARDTUNE = PYTHON.parent / "shardtune"


class RunFailed(Exception):
    """A benchmarked command exited non-zero or timed out; the message ends with its log's tail."""


class OverCap(RunFailed):
    """A process of the tree went over the RSS cap and the tree was stopped."""


def machine_words() -> str:
    """'<CPU model>, <n> cores, <arch> Linux': what a benchmark's numbers were measured on."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.machine()} {platform.system()}"


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all processes, all cores)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and every descendant it has waited for (not affected by other users)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def wait_for_quiet(max_load: float, give_up_s: float, log: Callable[[str], None], fail: bool = False) -> float:
    """Block until the 1-minute load average is below max_load; return it.

    After give_up_s, measure anyway (fail=False, time is compared within one run) or raise
    SystemExit (fail=True, for a benchmark whose numbers mean nothing on a busy machine).
    """
    start = time.time()
    while (load := os.getloadavg()[0]) >= max_load:
        if time.time() - start > give_up_s:
            if fail:
                raise SystemExit(f"load average still {load:.2f} >= {max_load} after {give_up_s:.0f} s; try later")
            log(f"load average still {load:.2f} after {give_up_s:.0f} s; measuring anyway")
            return load
        log(f"1-minute load average {load:.2f} >= {max_load}; waiting")
        time.sleep(30)
    return load


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process in bytes; {} once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in text.splitlines())
            if k in ("VmRSS", "VmHWM")}


def reset_peak_rss(pid: int) -> None:
    """Make VmHWM the current RSS (`echo 5 > /proc/PID/clear_refs`), to measure the peak of a later phase."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


NOT_YET = -1
"""rank_of: this process is no worker now but may become one (re-read it at the next poll)."""


def rank_of(proc: psutil.Process) -> Optional[int]:
    """A torchrun worker's global rank: it has LOCAL_RANK in its environment and its parent (the agent) has not.

    None when it never will be (a worker's own child inherits LOCAL_RANK from it); NOT_YET when it is no
    worker now: the agent, or a worker caught between fork and exec (it still has the agent's environment),
    or one /proc would not read. Settling those at the first look lost a rank's memory once in CI.
    """
    try:
        env = proc.environ()
        if "LOCAL_RANK" not in env or "RANK" not in env:
            return NOT_YET
        parent = proc.parent()
        if parent is not None and "LOCAL_RANK" in parent.environ():
            return None
        return int(env["RANK"])
    except (psutil.Error, ValueError):
        return NOT_YET


@dataclass
class Tree:
    """The running command as a watch callback sees it."""

    pid: int
    started: float
    ranks: dict[int, int] = field(default_factory=dict)
    """rank -> pid of the torchrun workers found so far."""


Watch = Callable[[Tree], Optional[bool]]
"""Called on every poll while the command runs; returning True ends the run early (not a failure)."""


@dataclass
class Finished:
    started: float
    """time.time() just before the process was started."""
    wall: float = 0.0
    other_cores: float = 0.0
    """CPU used by processes outside this benchmark during the run, in cores (0 = the machine was ours)."""
    rss: list[tuple[float, dict[int, int]]] = field(default_factory=list)
    """(time, {rank: VmHWM bytes}) readings."""
    stopped: bool = False
    """The watch callback ended the run early."""

    def peak_rss(self, until: float) -> dict[int, int]:
        """Each rank's peak RSS up to a time (its last reading before it, the high-water mark never falls)."""
        best: dict[int, int] = {}
        for t, per_rank in self.rss:
            if t > until + 0.5:
                break
            for rank, v in per_rank.items():
                best[rank] = max(best.get(rank, 0), v)
        return best


def run_tree(argv: list[str], log: Path, cwd: Path = REPO, env: Optional[dict[str, str]] = None,
             timeout: float = 3600, poll: float = 0.25, watch: Optional[Watch] = None,
             rss_cap: Optional[int] = None) -> Finished:
    """Run argv in its own session, watching it; raise RunFailed (with the log's tail) on a non-zero exit or timeout.

    rss_cap (bytes): stop the tree and raise OverCap as soon as any of its processes has had a larger RSS
    (VmHWM never decreases, so a peak between two readings is still seen at the next one).
    """
    busy0, own0 = busy_cpu_seconds(), own_cpu_seconds()
    done = Finished(time.time())
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                env=env if env is not None else dict(os.environ), start_new_session=True)
    tree = Tree(proc.pid, done.started)
    checked: set[int] = set()
    settled: set[int] = set()
    try:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            if time.time() - done.started > timeout:
                raise RunFailed(f"timed out after {timeout:.0f} s: {' '.join(argv)}\n{tail(log)}")
            try:
                for child in root.children(recursive=True):
                    checked.add(child.pid)
                    if child.pid not in settled and (rank := rank_of(child)) != NOT_YET:
                        settled.add(child.pid)
                        if rank is not None:
                            tree.ranks[rank] = child.pid
            except psutil.Error:
                pass
            reading = {rank: v for rank, pid in tree.ranks.items() if (v := proc_status(pid).get("VmHWM"))}
            if reading:
                done.rss.append((time.time(), reading))
            if rss_cap is not None:
                over = [(pid, v) for pid in checked if (v := proc_status(pid).get("VmHWM")) is not None and v > rss_cap]
                if over:
                    pid, v = max(over, key=lambda x: x[1])
                    raise OverCap(f"process {pid} reached {v / 1e9:.2f} GB > cap {rss_cap / 1e9:.2f} GB")
            if watch is not None and watch(tree):
                done.stopped = True
                break
            time.sleep(poll)
    finally:
        if proc.poll() is None:
            _stop_group(proc)
    done.wall = time.time() - done.started
    done.other_cores = max(0.0, (busy_cpu_seconds() - busy0) - (own_cpu_seconds() - own0)) / done.wall
    if proc.returncode != 0 and not done.stopped:
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


def write_section(results: Path, heading: str, start: str, end: str, body: str) -> None:
    """Put `body` between a bench's markers in RESULTS.md: in place of what they held (the text after them stays),
    else right under its `## heading`, else in a new section at the end."""
    text = results.read_text() if results.exists() else "# Benchmark results\n"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    elif f"## {heading}" in text:
        line_end = text.index("\n", text.index(f"## {heading}")) + 1
        text = text[:line_end] + "\n" + block + "\n" + text[line_end:]
    else:
        text = text.rstrip("\n") + f"\n\n## {heading}\n\n" + block + "\n"
    results.write_text(text)


def capped_run(command: list[str], out: Path, env: dict[str, str], timeout: float, cap_gb: float) -> dict:
    """Run `command` (output to out/log.txt) under bench/_max_rss.py, stopped the moment any of its processes goes
    over `cap_gb`: {"ok": bool, "why": (when not ok), "wall_s", "max_rss_gb": the largest RSS of any process}."""
    max_rss_file = out / "max_rss.json"
    argv = [sys.executable, "-m", "bench._max_rss", str(max_rss_file), *command]
    started, result = time.time(), {}
    try:
        run_tree(argv, out / "log.txt", REPO, env, timeout=timeout, rss_cap=int(cap_gb * 1e9))
        result["ok"] = True
    except OverCap as exc:
        result.update(ok=False, why=f"over the cap: {exc}")
    except RunFailed as exc:
        result.update(ok=False, why=str(exc).splitlines()[0][:300])
    result["wall_s"] = round(time.time() - started, 1)
    if max_rss_file.exists():
        result["max_rss_gb"] = round(json.loads(max_rss_file.read_text())["max_rss_bytes"] / 1e9, 3)
    return result


def doubling_search(measure: Callable[[int], dict], start: int, last: int, log: Callable[[str], None],
                    label: str) -> list[dict]:
    """measure(seq_len) for seq_len = start, 2·start, ... up to `last`, stopping after the first that is not ok."""
    results, seq_len = [], start
    while seq_len <= last:
        r = measure(seq_len)
        results.append(r)
        log(f"  {label:12s} seq_len {seq_len:>6,}: {'ok' if r['ok'] else r['why']}; max RSS "
            f"{r.get('max_rss_gb', float('nan')):.2f} GB, estimate {r.get('estimate_gb')} GB, "
            f"{r.get('tokens_per_s', '-')} tokens/s, {r['wall_s']:.0f} s")
        if not r["ok"]:
            break
        seq_len *= 2
    return results


def search_parser(description: str, quick: str, cap_gb: float, steps: int) -> argparse.ArgumentParser:
    """The options every doubling search takes (the bench adds its own): a smoke run, the RSS cap, the lengths,
    the steps per run, a timeout."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--cap_gb", type=float, default=cap_gb, help="per-process RSS cap (GB = 1e9 bytes)")
    p.add_argument("--start", type=int, default=1024)
    p.add_argument("--max_len", type=int, default=16384, help="longest seq_len tried")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--timeout", type=float, default=1800)
    return p
