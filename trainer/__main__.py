"""`python -m trainer RUN_DIR`: what torchrun starts on every rank.

Parse the run directory the launcher wrote, build data, model and engine, resume, train, save,
export, and always clean up.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from trainer.session import Session, setup_logging


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m trainer RUN_DIR  (normally started by `shardtune launch`)", file=sys.stderr)
        return 2
    started = time.time()
    session = Session.from_run_dir(Path(argv[0]))
    setup_logging(session.dist.is_main)
    try:
        session.build()
        state = session.resume()
        state = session.loop.run(state)
        return session.finish(state, started)
    finally:
        session.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
