"""`python -m trainer RUN_DIR`: what torchrun starts on every rank.

Parse the run directory the launcher wrote, build data, model and engine, resume, train, save,
export, and always clean up. Errors a user can act on end with one clear message, not a traceback.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from launcher.contract.errors import UserError
from trainer.session import Session, setup_logging

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
    except BaseException as exc:
        session.fail(exc)
        raise
    finally:
        session.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
