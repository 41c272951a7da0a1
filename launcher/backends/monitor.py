"""`python -m launcher.backends.monitor RUN_DIR`: kills this node's frozen training processes from outside.

Each rank's watchdog thread catches a rank that runs but makes no progress. A frozen process (SIGSTOP, a
wedged driver call, an uninterruptible NFS read) freezes its watchdog too, and in a one-rank-per-node job
nothing else notices. This monitor runs next to torchrun on every node (the launch scripts start it), shares
no fate with the workers, and reads their heartbeat files: a rank whose file has not been rewritten for its
own allowance plus two write intervals is frozen, and gets SIGKILL, so torchrun restarts the job (and SLURM
requeues it when restarts are spent). Torch-free: it starts in a fraction of a second.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from pathlib import Path

import psutil

from launcher.contract.run_dir import RunDir

EXIT_GRACE_S = 60.0
"""How long an ended rank may take to close its tracker (a wandb upload) and process group before it counts as hung."""


def frozen(beat: dict, now: float) -> bool:
    """A rank whose heartbeat file stopped changing for longer than it may.

    Alive, its watchdog thread rewrites the file every write_every_s. Ended (finished, stopped, failed, stuck),
    the process has nothing left but closing the tracker and the process group, and a process still there an
    allowance (at least EXIT_GRACE_S) later is hung in that teardown: torchrun waits for it forever, so it is
    frozen too.
    """
    slack = 2 * float(beat.get("write_every_s", 5.0))
    allowance = float(beat.get("allowance_s", 300.0))
    if beat.get("state") != "alive":
        allowance = max(allowance, EXIT_GRACE_S)
    return now - float(beat.get("time", now)) > allowance + slack


def _same_process(pid: int, beat: dict) -> bool:
    """The pid in the heartbeat is still that worker (pids are reused)."""
    try:
        return psutil.Process(pid).create_time() <= float(beat.get("time", 0)) + 1
    except psutil.Error:
        return False


def sweep(run_dir: RunDir, host: str, now: float, kill=os.kill) -> list[dict]:
    """Kill this host's frozen ranks; the heartbeats acted on."""
    killed = []
    for beat in run_dir.read_heartbeats():
        pid = beat.get("pid")
        if beat.get("host") != host or pid is None or not frozen(beat, now) or not _same_process(int(pid), beat):
            continue
        age = now - float(beat["time"])
        where = (f"in '{beat.get('phase')}'" if beat.get("state") == "alive"
                 else f"when it {beat.get('state')}, and the process never exited")
        reason = (f"frozen: its heartbeat stopped {age:.0f} s ago {where} at step {beat.get('step')} "
                  f"(allowance {float(beat.get('allowance_s', 0)):.0f} s); killed by the node's monitor")
        try:
            kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            continue
        run_dir.record_event({"rank": beat.get("rank"), "host": host, "pid": pid, "attempt": beat.get("attempt", 0),
                              "event": "frozen", "reason": reason})
        print(f"shardtune monitor: rank {beat.get('rank')} (pid {pid}) on {host} is {reason}", file=sys.stderr,
              flush=True)
        killed.append(beat)
    return killed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--interval", type=float, default=2.0)
    args = ap.parse_args(argv)
    run_dir, host = RunDir(Path(args.run_dir)), socket.gethostname()
    parent = os.getppid()
    while os.getppid() == parent:  # ends with the launch script that started it
        sweep(run_dir, host, time.time())
        time.sleep(args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
