"""Build a directory once, whoever asks for it: one process builds, every other waits for the result.

Several processes (every rank of every node, or a command run ahead of the job) may ask for the same
directory at once. One of them takes an exclusive lock file and builds into a private directory that is
renamed into place only when complete; the others wait, watching the filesystem rather than a collective
(so no collective timeout bounds a long build). On a shared filesystem that means one builder for the
whole job; on node-local disks one per node. A builder that dies leaves a stale lock that the others
notice from its heartbeat and take over. Used for the tokenized-data cache and universal checkpoints.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Optional

from launcher.contract.errors import UserError
from launcher.contract.run_dir import fsync_dir, sync_tree

BUILT = "COMPLETE"
"""The file, written last, that says a directory was built whole."""
STALE_AFTER_S = 120.0
HEARTBEAT_S = 10.0


class BuildFailed(UserError):
    """Another process failed to build this cache entry; its message is repeated here."""


@contextmanager
def _heartbeat(lock: Path) -> Iterator[None]:
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                os.utime(lock)
            except FileNotFoundError:
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


def _try_lock(lock: Path) -> bool:
    """Create the lock file exclusively; take over a lock whose builder stopped beating."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            stale = time.time() - lock.stat().st_mtime > STALE_AFTER_S
        except FileNotFoundError:  # released between our open and stat
            return _try_lock(lock)
        if not stale:
            return False
        # Rename is atomic: of several waiters that all saw it stale, exactly one moves it away.
        grave = lock.with_name(f"{lock.name}.stale-{socket.gethostname()}-{os.getpid()}")
        try:
            os.rename(lock, grave)
        except FileNotFoundError:
            return False
        if time.time() - grave.stat().st_mtime <= STALE_AFTER_S:
            # Another waiter took over between our stat and rename, and we moved its fresh lock: give it back.
            try:
                os.link(grave, lock)
            except FileExistsError:
                pass
            grave.unlink(missing_ok=True)
            return False
        grave.unlink(missing_ok=True)
        return _try_lock(lock)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{socket.gethostname()} {os.getpid()}\n")
    return True


def built(root: Path, key: str) -> Optional[Path]:
    """The complete directory for key under root, if someone has built it."""
    final = root / key
    return final if (final / BUILT).exists() else None


def build_once(root: Path, key: str, build: Callable[[Path], None], on_wait: Optional[Callable[[str], None]] = None,
               timeout_s: float = 24 * 3600, on_poll: Optional[Callable[[], None]] = None,
               what: str = "build") -> tuple[Path, bool]:
    """The complete directory for key, building it with build(tmp_dir) if nobody has; (path, built_here).

    on_poll is called while waiting for a live builder (its lock is fresh): a waiter's heartbeat. A waiter whose
    builder failed fails with its message; a call that found nobody building builds again, even right after a
    failure (the user fixed the cause and ran the command again).
    """
    root.mkdir(parents=True, exist_ok=True)
    final, lock, failed = root / key, root / f"{key}.lock", root / f"{key}.failed"
    started = time.time()
    announced = waited = False
    while True:
        if built(root, key):
            return final, False
        if waited and failed.exists() and failed.stat().st_mtime >= started - 5:
            raise BuildFailed(failed.read_text())
        if _try_lock(lock):
            try:
                if built(root, key):
                    return final, False
                failed.unlink(missing_ok=True)
                tmp = root / f"{key}.tmp-{socket.gethostname()}-{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                with _heartbeat(lock):
                    try:
                        build(tmp)
                    except BaseException as exc:
                        shutil.rmtree(tmp, ignore_errors=True)  # first: a build that filled the disk needs the room
                        with suppress(OSError):
                            failed.write_text(str(exc))
                        raise
                    (tmp / BUILT).write_text(json.dumps({"built_by": socket.gethostname(), "pid": os.getpid(),
                                                               "time": time.time()}))
                    sync_tree(tmp)  # BUILT vouches for every file under it, after a crash too
                # Two builders happen only if a stalled (not dead) builder's lock was judged stale; keep the
                # first result, which readers may already have open.
                if built(root, key):
                    shutil.rmtree(tmp, ignore_errors=True)
                    return final, False
                shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover from a crash
                os.rename(tmp, final)
                fsync_dir(root)
                return final, True
            finally:
                lock.unlink(missing_ok=True)
        waited = True
        if not announced and on_wait:
            on_wait(f"waiting for {lock.read_text().strip() if lock.exists() else 'another process'} to {what} {final}")
            announced = True
        if on_poll is not None:
            on_poll()
        if time.time() - started > timeout_s:
            raise TimeoutError(f"gave up waiting for {final} after {timeout_s:.0f} s")
        time.sleep(0.5)
