"""Process-group setup and the few collectives the trainer needs, device-agnostic.

Everything goes through DeepSpeed's accelerator abstraction, so the code that runs on CPU with gloo
here is the code that runs on CUDA with NCCL.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn, Optional

import psutil
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float) -> Dist:
    """Join the job's process group (torchrun's environment) on this rank's device."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from trainer.ops import pin_build_dir  # ops imports this module

    pin_build_dir()  # DeepSpeed's CPU accelerator loads its comm op as the group forms

    acc = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    acc.set_device(local_rank)
    backend, timeout = acc.communication_backend_name(), timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun keeps one store across worker restarts and torch assumes a fresh one, so a restarted
        # rank can read the dead attempt's addresses and fail to connect. Give every attempt its own keys.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                              timeout=timeout)
        dist.init_process_group(backend, store=dist.PrefixStore(f"shardtune/attempt_{attempt}", store), rank=rank,
                                world_size=world, timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    node_peers()  # every worker has joined: note this node's while all are alive
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, torch.device(acc.device_name(local_rank)))


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks in one collective (one host sync)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_gather_floats(values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's few numbers in one collective (one host sync); callers take sums and maxima locally."""
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    out = torch.empty(dist.get_world_size() * len(values), dtype=torch.float64, device=device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the newer name, where it exists
    gather(out, mine)
    return out.view(-1, len(values)).tolist()


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_objects(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class PeerProgress:
    """Waiting for peers that are busy with long I/O without a collective, and without looking stuck.

    A rank that has finished its part of a save (or of a commit) would otherwise sit in a barrier while a peer
    still writes: its watchdog sees no progress and kills it, and a save longer than the collective timeout
    fails the process group. Instead every rank adds the bytes it writes to one counter in the job's key-value
    store (the one torchrun set up), and a rank that is done waits on the store, beating its heartbeat for as
    long as that counter keeps moving. A peer that really stalls stops the counter, and the waiters' watchdogs
    then do their job. A peer that dies on this node ends the wait at once (`node_peers`): the waiters
    used to sit out torchrun's 30 s between its SIGTERM to them and its SIGKILL.
    """

    def __init__(self, name: str, world: int, report_every_s: float = 1.0):
        self.name, self.world, self.report_every_s = f"shardtune/{name}", world, report_every_s
        self.store = dist.distributed_c10d._get_default_store()
        self._pending, self._last_report = 0, 0.0

    def add(self, nbytes: int) -> None:
        """Progress of this rank (rate-limited: one store round trip per second at most)."""
        self._pending += nbytes
        now = time.monotonic()
        if now - self._last_report >= self.report_every_s:
            self.store.add(f"{self.name}/bytes", max(self._pending, 1))
            self._pending, self._last_report = 0, now

    def wait_all(self, stage: str, beat: Callable[[str], None], poll_s: float = 0.2) -> None:
        """Mark this rank done with `stage`; return once every rank is, beating while anyone makes progress."""
        if self._pending:
            self.store.add(f"{self.name}/bytes", self._pending)
            self._pending = 0
        self.store.add(f"{self.name}/{stage}", 1)
        seen, looked = None, time.monotonic()
        peers = node_peers()
        while self.store.add(f"{self.name}/{stage}", 0) < self.world:
            progress = self.store.add(f"{self.name}/bytes", 0)
            if progress != seen:
                beat(stage)
                seen = progress
            if peers and time.monotonic() - looked >= 1.0:
                looked = time.monotonic()
                # A peer that left after every rank had marked the stage left normally: read the count again.
                ended = not peers <= _children_alive(os.getppid())
                if ended and self.store.add(f"{self.name}/{stage}", 0) < self.world:
                    raise PeerEnded(f"a peer training process on {socket.gethostname()} ended while this rank "
                                    f"waited for every rank to finish '{stage}' of {self.name.split('/', 1)[1]}")
            time.sleep(poll_s)


class PeerEnded(RuntimeError):
    """A rank this one waits for is gone; the rank that ended names the cause (this is only its consequence)."""


_NODE_PEERS: Optional[frozenset[int]] = None


def node_peers() -> Optional[frozenset[int]]:
    """The torchrun workers of this node (pids, this one included), as first seen all alive; None where they cannot
    be told apart: the agent (this process's parent) starts LOCAL_WORLD_SIZE of them and reaps one that ends,
    before it signals the others to stop. A parent with another number of live children (a wrapper script per
    rank, say) turns the check off."""
    global _NODE_PEERS
    expected = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if _NODE_PEERS is None and expected > 1:
        children = _children_alive(os.getppid())
        if len(children) == expected and os.getpid() in children:
            _NODE_PEERS = frozenset(children)
    return _NODE_PEERS


def _children_alive(parent: int) -> set[int]:
    """Pids of `parent`'s children that have not ended (a zombie has)."""
    try:
        children = psutil.Process(parent).children()
    except psutil.Error:
        return set()
    alive = set()
    for child in children:
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.add(child.pid)
        except psutil.Error:
            continue  # gone since the listing
    return alive


def exit_without_teardown(code: int) -> NoReturn:
    """End this rank's process now with `code`, skipping the interpreter's teardown; call it once everything the
    process owns is written, flushed and closed.

    `destroy_process_group` unregisters gloo's process groups but does not stop their worker threads while
    anything still holds a group, and DeepSpeed does (every ZeRO-3 parameter keeps its group): measured, a rank's
    3 gloo threads outlive the call and go only with the group's last reference. So C++ threads run on into the
    interpreter's teardown, and a rank whose run had completed aborted there ("terminate called without an
    active exception", SIGABRT): seen in CI on a loaded machine at ZeRO-3, and once in the bench's minimal
    DeepSpeed loop. Which thread it was could not be caught here; skipping the teardown removes the window.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
