"""Whether a compiled op's build lock belongs to a build in progress or to one that was killed, and clearing the latter.

torch.utils.cpp_extension lets one process build an op: it creates <build dir>/lock (O_EXCL), builds, and removes
the file; any other process that finds the file polls until it disappears, with no timeout, then imports the op.
A build killed midway (a job preempted, timed out or cancelled during its first start; an interrupted install)
leaves the file behind, and every later process that loads the op waits forever: every rank of every later job
on the nodes that share the cache, silently, after DeepSpeed's "Using ... as PyTorch extensions root".

A lock is a live build's while a process on this host holds it open (torch keeps the file's descriptor until it
removes it) or while its build directory keeps changing. It is a killed build's when no process here holds it and
nothing in its directory has changed for a while: long enough for a build on another machine (a network
filesystem) or in another container on this one (a PID namespace this host's /proc does not show) to have written
something. nvcc can compile one CUDA source for minutes without writing to the build directory, so on a network
filesystem that while is ten minutes; on a local disk only another container could be building, and two minutes
cover a CPU op.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from launcher.contract.errors import UserError
from launcher.planning.host import extensions_dir

NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "fuse.ceph", "glusterfs",
    "fuse.glusterfs", "9p", "panfs", "wekafs", "afs", "fuse.sshfs", "fuse.juicefs", "virtiofs", "orangefs"})
QUIET_LOCAL_S = 120.0
QUIET_NETWORK_S = 600.0


@dataclass(frozen=True)
class LockVerdict:
    path: Path
    stale: bool
    reason: str
    identity: tuple[int, int]
    """The judged file's inode and modification time: a lock created after the verdict has others."""


def build_locks(environ: Optional[dict] = None) -> list[Path]:
    """Every op build lock in the directory this environment's ops are built into."""
    return sorted(extensions_dir(environ).glob("*/lock"))


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding path, from the longest mount point above it in /proc/mounts."""
    resolved, best, kind = str(path.resolve()), "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def holders(path: Path) -> list[int]:
    """The processes on this host (those this process may inspect) that hold path open."""
    target, found = str(path.resolve()), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:  # gone, or another user's
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    found.append(int(proc.name))
                    break
            except OSError:
                continue
    return found


def _last_change(lock: Path, lock_mtime: float) -> float:
    """The newest modification time of the lock and of the files in its build directory (ninja's outputs)."""
    times = [lock_mtime]
    for entry in lock.parent.iterdir():
        try:
            times.append(entry.stat().st_mtime)
        except OSError:
            continue
    return max(times)


def judge(lock: Path, now: Optional[float] = None, quiet_s: Optional[float] = None) -> LockVerdict:
    """Whether lock is a killed build's (stale) or may still be a live build's, and why. Raises if it is gone."""
    now = time.time() if now is None else now
    judged = lock.stat()
    identity = (judged.st_ino, judged.st_mtime_ns)
    held = holders(lock)
    if held:
        return LockVerdict(lock, False, f"process {held[0]} on this host is building", identity)
    kind = filesystem_type(lock.parent)
    if quiet_s is None:
        quiet_s = QUIET_NETWORK_S if kind in NETWORK_FILESYSTEMS else QUIET_LOCAL_S
    idle = now - _last_change(lock, judged.st_mtime)
    where = f"no process on this host holds it, and its directory ({kind}) has not changed for {idle:.0f} s"
    if idle >= quiet_s:
        return LockVerdict(lock, True, f"{where}: a build that was killed", identity)
    return LockVerdict(lock, False, f"{where}; it is a killed build's if nothing changes for {quiet_s:.0f} s",
                       identity)


def _remove(verdict: LockVerdict) -> bool:
    """Remove a stale lock unless another process replaced it meanwhile; True if this call removed it.

    Two nodes sharing the cache may both find a lock stale; the first removes it and may start a build, whose new
    lock the second must not take away. So the lock is renamed to a name of this process's own first, and put
    back if it is not the file that was judged.
    """
    aside = verdict.path.with_name(f"lock.stale.{os.uname().nodename}.{os.getpid()}")
    try:
        os.rename(verdict.path, aside)
    except FileNotFoundError:
        return False
    except PermissionError as exc:  # a cache another user owns: torch would wait forever, so stop and say why
        raise UserError(f"{verdict.path} is a killed build's lock ({verdict.reason}), and this user cannot remove it "
                        f"({exc.strerror}); remove it, then launch again") from None
    taken = aside.stat()
    if (taken.st_ino, taken.st_mtime_ns) != verdict.identity:
        try:
            os.link(aside, verdict.path)  # back where it was, unless yet another build has begun there
        except FileExistsError:
            pass
        aside.unlink()
        return False
    aside.unlink()
    return True


def wait_for_builds(remove: bool, log: Callable[[str], None], poll_s: float = 5.0, quiet_s: Optional[float] = None,
                    environ: Optional[dict] = None) -> list[LockVerdict]:
    """Return once no op build lock is left, removing killed builds' locks if remove; the removed ones' verdicts.

    One process per node removes (the others only wait): a lock is judged by the processes this host shows, and
    each node judges its own. Builds in progress are waited for here rather than in torch, which would wait on a
    build that dies meanwhile forever.
    """
    removed: list[LockVerdict] = []
    announced: set[Path] = set()
    while True:
        waiting = []
        for lock in build_locks(environ):
            try:
                verdict = judge(lock, quiet_s=quiet_s)
            except FileNotFoundError:  # its build ended meanwhile
                continue
            except PermissionError:  # a directory this user cannot read, so neither can its torch build there
                continue
            if verdict.stale and remove:
                if _remove(verdict):
                    removed.append(verdict)
                    log(f"removed the build lock {lock} ({verdict.reason}); torch would have waited on it forever")
                continue
            waiting.append(verdict)
        if not waiting:
            return removed
        for verdict in waiting:
            if verdict.path not in announced:
                announced.add(verdict.path)
                log(f"waiting on the build lock {verdict.path}: {verdict.reason}")
        time.sleep(poll_s)
