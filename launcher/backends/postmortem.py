"""`python -m launcher.backends.postmortem RUN_DIR EXIT_CODE ATTEMPT_START`: why a job ended, in one line.

Run by the launch scripts when torchrun gives up (its restarts are spent): torchrun's own summary names an
exit code, not a cause. Here the cause comes from the run directory: the event log (a rank stuck, frozen,
or failing with an exception) and the heartbeats (a rank whose process died without a word was killed by a
signal, e.g. the OOM killer). The line names the rank, the host, the cause and the checkpoint a relaunch
resumes from, and the run's status says the same.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

from launcher.contract.run_dir import RunDir

PEER_FAILURE = re.compile(r"connection (reset|closed|refused)|broken pipe|nccl|gloo|processgroup|timed? ?out|"
                          r"collective|peer", re.IGNORECASE)


def cause(run_dir: RunDir, since: float) -> Optional[str]:
    """The failure the others followed, in the last attempt that began after `since`.

    When one rank fails, its peers fail too (their collectives break, torchrun kills them), so the causes are
    ranked: a rank the node's monitor killed as frozen, one the watchdog stopped as stuck, an exception of its
    own, one that died without a word (its heartbeat says alive, the process is gone: a signal such as the OOM
    killer's), and last an exception that only reports a broken collective. An exception outranks a silent
    death because torchrun kills every other rank once one has failed: a rank that was waiting for the failed
    one (in a save, in the export) dies without a word too, after the exception that caused it.
    """
    beats = [b for b in run_dir.read_heartbeats() if b.get("time", 0) >= since]
    attempt = max((b.get("attempt", 0) for b in beats), default=0)
    beats = [b for b in beats if b.get("attempt", 0) == attempt]
    events = [e for e in run_dir.read_events(since) if e.get("attempt", 0) == attempt]
    ranked = []
    for e in events:
        order = {"frozen": 0, "stuck": 1}.get(e.get("event"), 4 if PEER_FAILURE.search(e.get("reason", "")) else 2)
        ranked.append((order, e["time"],
                       f"rank {e.get('rank')} on {e.get('host')} (pid {e.get('pid')}): {e['reason']}"))
    for b in beats:
        if b.get("state") == "alive":
            ranked.append((3, b.get("time", 0),
                           f"rank {b.get('rank')} on {b.get('host')} (pid {b.get('pid')}): the process ended "
                           f"without a word in '{b.get('phase')}' at step {b.get('step')} "
                           f"(killed by a signal, e.g. SIGKILL from the OOM killer)"))
    return min(ranked)[2] if ranked else None


def summary(run_dir: RunDir, exit_code: int, since: float) -> str:
    checkpoints = run_dir.complete_checkpoints()
    resume = f"a relaunch resumes from {checkpoints[0]}" if checkpoints else "there is no checkpoint yet"
    why = cause(run_dir, since) or f"torchrun exited with code {exit_code} (no rank recorded a cause)"
    return f"training ended after its restarts were spent: {why}; {resume}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    run_dir, exit_code, since = RunDir(Path(args[0])), int(args[1]), float(args[2]) if len(args) > 2 else 0.0
    status = run_dir.read_status() or {}
    # A status written before this attempt began (a relaunch of a completed run fails before rank 0 says
    # "running", killed by torchrun after another rank's failure) says nothing about how it ended.
    if exit_code == 0 or (status.get("state") in ("completed", "stopped") and status.get("time", 0) >= since):
        return 0
    line = summary(run_dir, exit_code, since)
    print(f"shardtune: {line}", file=sys.stderr, flush=True)
    checkpoints = run_dir.complete_checkpoints()
    run_dir.write_status("failed", status.get("step"), checkpoints[0] if checkpoints else None, reason=line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
