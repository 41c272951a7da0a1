"""`python -m trainer RUN_DIR`: what torchrun starts on every rank.

Parse the run directory the launcher wrote, build data, model and engine, resume, train, save,
export, and always clean up. Errors a user can act on end with one clear message, not a traceback.
"""
from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import NoReturn

from launcher.contract.errors import UserError
from launcher.contract.run_dir import RunDir
from trainer.distributed import PeerEnded, exit_without_teardown
from trainer.session import Session, failure_reason, record_failure, setup_logging

MIN_TORCH = "2.6"  # torch.load(weights_only=True) can run code in older versions (CVE-2025-32434)


def main(argv: list[str]) -> int:
    import torch

    if torch.__version__ < MIN_TORCH:
        print(f"shardtune: torch {torch.__version__} is older than {MIN_TORCH}; loading checkpoints with it is unsafe "
              "(CVE-2025-32434). Upgrade torch.", file=sys.stderr)
        return 2
    if len(argv) not in (1, 2) or argv[1:] not in ([], ["--preflight"]):
        print("usage: python -m trainer RUN_DIR [--preflight]  (normally started by shardtune launch / preflight)",
              file=sys.stderr)
        return 2
    started = time.time()
    rank = os.environ.get("RANK", "0")
    preflight_only = argv[1:] == ["--preflight"]
    try:
        session = Session.from_run_dir(Path(argv[0]), preflight_only)
    except UserError as exc:
        if rank == "0":
            print(f"shardtune: {exc}", file=sys.stderr)
        record_failure(RunDir(Path(argv[0])), int(rank), failure_reason(exc))
        return 1
    setup_logging(session.dist.is_main)
    try:
        session.preflight()
        if preflight_only:
            session.tracker.status("completed", None, reason="preflight only")
            session.finished = True
            return 0
        session.build()
        state = session.resume()
        state = session.loop.run(state)
        return session.finish(state, started)
    except UserError as exc:
        session.fail(exc)
        return 1
    except PeerEnded as exc:  # a consequence: the rank that ended names the cause, so no traceback here
        session.fail(exc)
        print(f"shardtune: rank {rank}: {exc}", file=sys.stderr, flush=True)
        return 1
    except BaseException as exc:
        session.fail(exc)
        raise
    finally:
        session.close()


def run_and_exit(argv: list[str]) -> NoReturn:
    """`main`, its exceptions printed as Python prints them, then the process ends without the interpreter's
    teardown (`exit_without_teardown` says why)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 128 + signal.SIGINT
    except BaseException:  # noqa: BLE001 - printed as Python would, then the same exit
        traceback.print_exc()
        code = 1
    exit_without_teardown(code)


if __name__ == "__main__":
    run_and_exit(sys.argv[1:])
