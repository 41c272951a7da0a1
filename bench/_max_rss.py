"""Run a command and write the largest RSS any of its processes reached, as the kernel accounts it.

    python -m bench._max_rss OUT.json COMMAND [ARGS...]

`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` after the command ends is the maximum resident set of
every descendant that was waited for (torchrun waits for its workers, shardtune for torchrun), so it is
independent of what the processes report about themselves. A fresh process per command keeps the
number to that command alone. SIGTERM is passed on, so a stopped tree is still waited for and counted.
"""
from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys


def main() -> int:
    out, argv = sys.argv[1], sys.argv[2:]
    proc = subprocess.Popen(argv)
    signal.signal(signal.SIGTERM, lambda signum, _frame: proc.send_signal(signum))
    code = proc.wait()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(out, "w") as fh:
        json.dump({"returncode": code, "max_rss_bytes": usage.ru_maxrss * 1024}, fh)
    return code


if __name__ == "__main__":
    sys.exit(main())
