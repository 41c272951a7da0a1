"""A compiled op's build lock left by a killed build no longer makes every later start wait forever.

The locks here are torch's own: a process creates one with torch.utils.file_baton.FileBaton, exactly as
torch.utils.cpp_extension does before it builds an op, and is then killed (SIGKILL, so nothing cleans up) or ends
its build normally.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from torch.utils.file_baton import FileBaton

from launcher.contract.errors import UserError
from launcher.planning.host import extensions_dir
from tests.conftest import losses, shardtune, tiny_config
from trainer import build_locks

# Takes torch's build lock at argv[1], says so, then is killed (argv[2] == "kill") or holds it for argv[2] seconds
# and releases it, as a build that ends does.
BUILDER = textwrap.dedent("""
    import os, signal, sys, time
    from torch.utils.file_baton import FileBaton
    baton = FileBaton(sys.argv[1])
    assert baton.try_acquire()
    print("locked", flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(float(sys.argv[2]))
    baton.release()
""")


def builder(lock: Path, then: str) -> subprocess.Popen:
    lock.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", BUILDER, str(lock), then], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def killed_build(lock: Path, age_s: float = 0.0) -> None:
    """A build lock whose builder was killed age_s seconds ago."""
    proc = builder(lock, "kill")
    assert proc.wait(timeout=30) == -signal.SIGKILL and lock.exists()
    then = time.time() - age_s
    os.utime(lock, (then, then))


def test_a_killed_builds_lock_is_removed_so_torch_can_build_again(tmp_path):
    root = tmp_path / "ext"
    lock = root / "fused_adam" / "lock"
    killed_build(lock)
    messages = []
    removed = build_locks.wait_for_builds(True, messages.append, poll_s=0.1, quiet_s=0.5,
                                          environ={"TORCH_EXTENSIONS_DIR": str(root)})
    assert [v.path for v in removed] == [lock] and not lock.exists()
    assert "no process on this host holds it" in messages[-1] and str(lock) in messages[-1]
    assert FileBaton(str(lock)).try_acquire()  # what torch does next: it builds instead of waiting


def test_a_lock_a_process_holds_is_waited_for_and_never_removed(tmp_path):
    """A build in progress on this host is live however old its lock looks; the wait ends when the build does."""
    root = tmp_path / "ext"
    lock = root / "cpu_adam" / "lock"
    proc = builder(lock, "3")
    old = time.time() - 3600
    os.utime(lock, (old, old))
    messages = []
    started = time.monotonic()
    removed = build_locks.wait_for_builds(True, messages.append, poll_s=0.1, quiet_s=0.5,
                                          environ={"TORCH_EXTENSIONS_DIR": str(root)})
    assert removed == [] and time.monotonic() - started > 2
    assert proc.wait(timeout=30) == 0  # its own release found its lock: nobody took it away
    assert messages == [f"waiting on the build lock {lock}: process {proc.pid} on this host is building"]


def test_only_the_remover_removes_and_the_others_wait_until_it_has(tmp_path):
    """A node's other ranks never remove a lock: they wait until its local rank 0 has."""
    root = tmp_path / "ext"
    lock = root / "deepspeed_shm_comm" / "lock"
    killed_build(lock, age_s=3600)
    env = {"TORCH_EXTENSIONS_DIR": str(root)}
    waiter = subprocess.Popen([sys.executable, "-c", "import sys; from trainer import build_locks; "
                               "build_locks.wait_for_builds(False, print, poll_s=0.1, environ={'TORCH_EXTENSIONS_DIR': "
                               "sys.argv[1]})", str(root)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    assert "waiting on the build lock" in waiter.stdout.readline()
    time.sleep(0.5)
    assert waiter.poll() is None and lock.exists()
    assert [v.path for v in build_locks.wait_for_builds(True, lambda _m: None, environ=env)] == [lock]
    assert waiter.wait(timeout=30) == 0


@pytest.mark.parametrize("filesystem, idle_s, stale", [("this disk", 60, False), ("this disk", 130, True),
                                                       ("nfs4", 300, False), ("nfs4", 610, True)])
def test_a_lock_nobody_here_holds_is_stale_after_its_filesystems_quiet_time_simulated_nfs(
        tmp_path, monkeypatch, filesystem, idle_s, stale):
    """No NFS server can run here, so that filesystem's type is given; the local one, the holder check and the
    times are real.

    On a network filesystem a build on another node holds the lock where this host cannot see it, and nvcc writes
    nothing to the build directory while it compiles one CUDA source, for minutes: ten minutes without a change
    mean a killed build there, two on a local disk.
    """
    lock = tmp_path / "ext" / "fused_adam" / "lock"
    killed_build(lock)
    (lock.parent / "build.ninja").write_text("")
    now = time.time()
    for path in (lock, lock.parent / "build.ninja"):
        os.utime(path, (now - idle_s, now - idle_s))
    if filesystem == "this disk":
        assert build_locks.filesystem_type(lock.parent) not in build_locks.NETWORK_FILESYSTEMS
    else:
        monkeypatch.setattr(build_locks, "filesystem_type", lambda _path: filesystem)
    assert build_locks.judge(lock, now=now).stale is stale
    os.utime(lock.parent / "build.ninja")  # ninja has just written something: a build is going on
    assert build_locks.judge(lock, now=time.time()).stale is False


def test_a_lock_replaced_by_another_nodes_new_build_is_left_in_place(tmp_path):
    """Two nodes judge one stale lock; the first removes it and starts a build; the second leaves that build's lock."""
    lock = tmp_path / "ext" / "fused_adam" / "lock"
    killed_build(lock, age_s=3600)
    verdict = build_locks.judge(lock)
    assert verdict.stale
    assert build_locks._remove(verdict)  # the first node
    killed_build(lock)  # its new build's lock (the process ends; the file is what matters here)
    new = lock.stat()
    assert not build_locks._remove(verdict)  # the second node, with its earlier verdict
    assert lock.exists() and (lock.stat().st_ino, lock.stat().st_mtime_ns) == (new.st_ino, new.st_mtime_ns)
    assert sorted(p.name for p in lock.parent.iterdir()) == ["lock"]


def test_a_killed_builds_lock_this_user_cannot_remove_stops_the_start_naming_it(tmp_path):
    """A cache another user owns (a team's TORCH_EXTENSIONS_DIR): the start stops, saying what to remove, instead of
    waiting forever. The op's directory is made read-only for this user (for root, which ignores modes, immutable)."""
    lock = tmp_path / "ext" / "fused_adam" / "lock"
    killed_build(lock, age_s=3600)
    lock_dir = ["chattr", "+i", str(lock.parent)] if os.geteuid() == 0 else ["chmod", "555", str(lock.parent)]
    subprocess.run(lock_dir, check=True)
    try:
        with pytest.raises(UserError) as refused:
            build_locks.wait_for_builds(True, print, environ={"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    finally:
        subprocess.run(["chattr", "-i", str(lock.parent)] if os.geteuid() == 0 else ["chmod", "755", str(lock.parent)],
                       check=True)
    assert lock.exists()
    assert str(refused.value).startswith(f"{lock} is a killed build's lock (no process on this host holds it")
    assert "and this user cannot remove it (" in str(refused.value)
    assert str(refused.value).endswith("); remove it, then launch again")


def test_a_run_after_a_killed_build_of_the_comm_op_starts_and_trains(tmp_path, tiny_model, monkeypatch):
    """DeepSpeed's CPU accelerator loads its comm op on every rank as the process group forms. A build of it killed
    an hour ago left its lock; before, every rank waited on it forever. The run is launched as a user would, with
    no TORCH_EXTENSIONS_DIR: its ranks load the op from this environment's own folder and never create torch's
    shared default one (<cache>/torch_extensions/py<version>_cpu)."""
    built = extensions_dir() / "deepspeed_shm_comm"
    assert built.is_dir(), f"make install builds DeepSpeed's comm op into {built.parent}"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    cache = tmp_path / "cache"
    root = extensions_dir({"XDG_CACHE_HOME": str(cache)})
    shutil.copytree(built, root / "deepspeed_shm_comm", ignore=shutil.ignore_patterns("lock*"))  # spares a build
    lock = root / "deepspeed_shm_comm" / "lock"
    killed_build(lock, age_s=3600)
    cfg = tiny_config(tmp_path, tiny_model, train={"max_steps": 2, "grad_accum_steps": 1, "warmup_steps": 0})
    proc = shardtune("launch", str(cfg), env={"XDG_CACHE_HOME": str(cache)}, timeout=300)
    assert list(losses(tmp_path / "run")) == [1, 2]
    assert proc.stderr.count(f"removed the build lock {lock}") == 1  # once per node: local rank 0
    assert not lock.exists()
    assert sorted(p.name for p in (cache / "torch_extensions").iterdir()) == [root.name]
