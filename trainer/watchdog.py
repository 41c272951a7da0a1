"""Heartbeats and a per-rank watchdog: a stuck rank dumps its stacks and exits instead of hanging the job.

The loop marks its phase (data, forward, backward, step, save, eval) in memory, which costs an
attribute write. A thread writes the heartbeat file every few seconds and checks how long ago the
phase last changed. Past the allowance (longer until the first step is done: model loading, first
gathers and compilation are slow) it writes every thread's Python stack to
OUTPUT_DIR/stacks/rank_XXXXX.txt with faulthandler and ends the process with STUCK_EXIT_CODE, so
torchrun's restarts or the SLURM requeue take over and the run resumes from its last checkpoint.
A rank waiting in a collective for a stuck peer trips its own watchdog too: its stack shows the
collective, the stuck rank's shows where it really is.
"""
from __future__ import annotations

import faulthandler
import json
import os
import socket
import threading
import time
from pathlib import Path

from launcher.contract.run_dir import RunDir

STUCK_EXIT_CODE = 86
WRITTEN_AT_ONCE = frozenset({"save", "eval", "export", "convert"})
"""Phases entered once in many steps, where a rank often dies (a save's full disk or host OOM): the heartbeat is
written as one begins, so a post-mortem names it and its step, not what the last periodic write saw seconds
before (with steps shorter than the write period, several steps before)."""
ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
"""Which of torchrun's attempts this process belongs to (0 first, then one more per restart)."""


class Heartbeat:
    def __init__(self, run_dir: RunDir, rank: int, stall_timeout_s: float, startup_timeout_s: float,
                 write_every_s: float = 5.0):
        self.run_dir, self.rank = run_dir, rank
        self.stall, self.startup, self.write_every = stall_timeout_s, startup_timeout_s, write_every_s
        self.step, self.phase, self.changed = 0, "start", time.monotonic()
        self.first_step_done = False
        self.path = run_dir.heartbeat_file(rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stop = threading.Event()
        self._write_lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="shardtune-watchdog", daemon=True)

    def start(self) -> Heartbeat:
        self._write()
        self._thread.start()
        return self

    def beat(self, phase: str, step: int | None = None) -> None:
        """Progress: the loop entered a new phase (cheap enough to call several times per step)."""
        entered = phase != self.phase
        self.phase, self.changed = phase, time.monotonic()
        if step is not None:
            started = step > self.step and self.step > 0 and not self.first_step_done
            self.step = step
            if started:
                self.first_step_done = True
                # At once, not at the next periodic write: until the file says so, a monitor outside allows a
                # process frozen now the startup timeout, not the stall timeout.
                self._try_write()
                return
        if entered and phase in WRITTEN_AT_ONCE:
            self._try_write()

    def _allowance(self) -> float:
        return self.stall if self.first_step_done else self.startup

    def _write(self, state: str = "alive", reason: str = "") -> None:
        # allowance_s and write_every_s let a monitor outside this process tell a frozen process (this file
        # no longer changes) from a slow one (launcher/backends/monitor.py).
        record = {"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(), "step": self.step,
                  "phase": self.phase, "state": state, "time": time.time(),
                  "since_progress_s": round(time.monotonic() - self.changed, 1), "allowance_s": self._allowance(),
                  "write_every_s": self.write_every, "attempt": ATTEMPT, **({"reason": reason} if reason else {})}
        with self._write_lock:  # the loop's thread and the watchdog's both write
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record) + "\n")
            os.replace(tmp, self.path)

    def _try_write(self) -> None:
        try:
            self._write()
        except OSError:
            pass  # a full or flaky filesystem must not kill a healthy rank

    def _watch(self) -> None:
        while not self._stop.wait(min(self.write_every, max(self._allowance() / 4, 0.5))):
            idle = time.monotonic() - self.changed
            self._try_write()
            if idle > self._allowance():
                self._dump_and_exit(idle)

    def _dump_and_exit(self, idle: float) -> None:
        stacks = self.run_dir.stack_file(self.rank)
        stacks.parent.mkdir(parents=True, exist_ok=True)
        with open(stacks, "w") as fh:
            fh.write(f"rank {self.rank} on {socket.gethostname()} (pid {os.getpid()}) made no progress for "
                     f"{idle:.0f} s (allowance {self._allowance():.0f} s) in phase '{self.phase}' "
                     f"of step {self.step}\n\n")
            fh.flush()
            faulthandler.dump_traceback(file=fh, all_threads=True)
        reason = f"no progress for {idle:.0f} s in '{self.phase}' at step {self.step} (watchdog)"
        try:
            self._write(state="stuck", reason=reason)
            self.run_dir.record_event({"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(),
                                       "attempt": ATTEMPT, "event": "stuck", "reason": reason,
                                       "stacks": str(stacks)})
        except OSError:
            pass
        print(f"shardtune: rank {self.rank} stuck in '{self.phase}' at step {self.step} for {idle:.0f} s; "
              f"stacks in {stacks}; exiting with {STUCK_EXIT_CODE} so the job can restart", flush=True)
        os._exit(STUCK_EXIT_CODE)

    def stop(self, state: str = "finished", reason: str = "") -> None:
        if self._stop.is_set():
            return  # the first reason to stop (e.g. "failed") is the one to keep
        self._stop.set()
        self.phase = state
        try:
            self._write(state=state, reason=reason)
        except OSError:
            pass


class NoHeartbeat:
    """Before the watchdog starts (and in tools that reuse the loop)."""

    def beat(self, phase: str, step: int | None = None) -> None:
        pass

    def stop(self, state: str = "finished", reason: str = "") -> None:
        pass


def io_counters(pid: str = "self") -> tuple[int, ...]:
    """Bytes this process read and wrote (any file, cached or not) and its page faults (memory-mapped reads)."""
    try:
        io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(io["rchar"]), int(io["wchar"]), int(stat[7]), int(stat[9])  # minflt, majflt
    except (OSError, KeyError, ValueError, IndexError):
        return ()


def group_io_counters(pgid: int) -> dict[int, tuple[int, ...]]:
    """io_counters of every process in a process group, by pid (a conversion and its workers): whether the group
    made progress, read from /proc on this node instead of from the files it writes on a shared filesystem."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                out[int(proc.name)] = io_counters(proc.name)
        except (OSError, ValueError, IndexError):
            continue
    return out


class IOProgress:
    """While a long read or write runs inside code we do not control (from_pretrained, DeepSpeed's checkpoint
    load), beat whenever the process has read, written or faulted in more pages since the last look: the
    watchdog's stall limit then means "no I/O progress for that long", not "this phase took long"."""

    def __init__(self, heartbeat, phase: str, every_s: float = 2.0):
        self.heartbeat, self.phase, self.every_s = heartbeat, phase, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"shardtune-io-{phase}", daemon=True)

    def __enter__(self) -> IOProgress:
        self.heartbeat.beat(self.phase)
        self._thread.start()
        return self

    def _watch(self) -> None:
        last = io_counters()
        while not self._stop.wait(self.every_s):
            now = io_counters()
            if now != last:
                self.heartbeat.beat(self.phase)
                last = now

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
