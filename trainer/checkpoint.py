"""Checkpoints that a crash, a preemption or a kill mid-save cannot corrupt.

Layout (DeepSpeed's standard one, so its zero_to_fp32.py keeps working):

    OUTPUT_DIR/checkpoints/step_00000010/   DeepSpeed shards + trainer_state.json + rng/ + hf/
    OUTPUT_DIR/checkpoints/step_00000010/COMPLETE.json   manifest: every file, its size and sha256
    OUTPUT_DIR/checkpoints/LATEST, latest   the newest complete tag (ours, and DeepSpeed's name for it)

Commit protocol: every rank writes its files through the checkpoint writer (trainer/shard_writer.py), which
hashes the bytes as they are written and makes each file durable (fsync, rename); once every rank's writes
are durable, rank 0 writes the manifest from those digests (temp file, fsync, rename) and only after that
replaces the pointers the same way. In the background mode training goes on between the two. A checkpoint
without a manifest, or whose files do not match it, is never loaded.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from launcher.contract.errors import UserError
from launcher.contract.run_dir import (
    DS_LATEST,
    HF,
    LATEST,
    MANIFEST,
    TAG_PREFIX,
    TRAINER_STATE,
    UNIVERSAL_SUFFIX,
    RunDir,
    atomic_write,
    complete_checkpoints,
    fsync_dir,
    partial_checkpoints,
    rng_file,
    step_of,
    tag_for,
)
from trainer.build_once import BUILT, build_once, built
from trainer.checkpoint_io import Identity, Manifests, copy_hashed, identity, load_verified, read_verified
from trainer.distributed import Dist, PeerProgress, all_gather_objects, all_reduce_max, broadcast_object
from trainer.faults import FaultHooks, unreadable_once
from trainer.watchdog import group_io_counters


class CheckpointError(UserError):
    """A checkpoint that was asked for by path cannot be used."""


def _hash_file(path: Path, progress: Callable[[int], None] = lambda n: None) -> tuple[int, str]:
    """Size and sha256 of a file on disk (verification, and files written outside our writer)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 << 20), b""):
            h.update(block)
            progress(len(block))
    return path.stat().st_size, h.hexdigest()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(ckpt: Path) -> list[str]:
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)


def share_by_bytes(files: dict[str, dict], world: int) -> list[list[tuple[str, dict]]]:
    """The files of a manifest dealt to `world` ranks, largest first, each to the rank with the fewest bytes so far:
    the ranks finish hashing together. Dealt by name, a ZeRO-3 universal copy gave one rank its largest file
    (the saving rank's optimizer shard, half the copy) and half the rest."""
    loads = [(0, r) for r in range(world)]
    shares: list[list[tuple[str, dict]]] = [[] for _ in range(world)]
    for rel, meta in sorted(files.items(), key=lambda item: (-item[1]["size"], item[0])):
        nbytes, r = heapq.heappop(loads)
        shares[r].append((rel, meta))
        heapq.heappush(loads, (nbytes + meta["size"], r))
    return shares


def verify_share(ckpt: Path, files: dict[str, dict], rank: int, world: int) -> tuple[list[str], dict[str, Identity]]:
    """This rank's share of the manifest check (`files`, the manifest's): sizes first (cheap), then hashes. Returns
    the problems, and the identity of each file that matched, as it was while it was hashed."""
    problems, matched = [], {}
    for rel, meta in share_by_bytes(files, world)[rank]:
        path = ckpt / rel
        try:  # a read error is this file's problem, reported like any other, not a crash of one rank
            unreadable_once(rank, path)
            if not path.is_file():
                problems.append(f"{rel}: missing")
                continue
            with open(path, "rb") as fh:
                before = os.fstat(fh.fileno())
                if before.st_size != meta["size"]:
                    problems.append(f"{rel}: {before.st_size} bytes, manifest says {meta['size']}")
                elif hashlib.file_digest(fh, "sha256").hexdigest() != meta["sha256"]:
                    problems.append(f"{rel}: sha256 differs from the manifest")
                elif identity(os.fstat(fh.fileno())) == identity(before):
                    matched[rel] = identity(before)
        except OSError as exc:
            problems.append(f"{rel}: unreadable ({exc})")
    return problems, matched


def unlisted_files(ckpt: Path, besides: tuple[str, ...] = ()) -> list[str]:
    """Files in a checkpoint its manifest does not name (nor `besides`): never loaded, so a checkpoint that has
    them is refused."""
    try:
        listed = set(json.loads((ckpt / MANIFEST).read_text())["files"]) | set(besides)
    except (OSError, json.JSONDecodeError, KeyError):
        return []
    return [rel for rel in _files(ckpt) if rel not in listed]


def verify(ckpt: Path, dist: Optional[Dist], into: Optional[Manifests] = None, besides: tuple[str, ...] = ()
           ) -> list[str]:
    """Every problem any rank found with a checkpoint; [] when every file matches its manifest (and any other file
    is one of `besides`).

    `into`: a checkpoint without problems is registered there, with the identity of every file as it was hashed:
    a load that finds a file unchanged since then does not read it whole again to check it (load_verified)."""
    rank, world = (dist.rank, dist.world) if dist else (0, 1)
    try:
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
        problems, matched = verify_share(ckpt, files, rank, world)
    except (OSError, json.JSONDecodeError) as exc:
        files, problems, matched = {}, [f"{ckpt / MANIFEST}: unreadable ({exc})"], {}
    if rank == 0:
        problems += [f"{rel}: not in the manifest" for rel in unlisted_files(ckpt, besides)]
    if dist is not None:
        shares = all_gather_objects((problems, matched))
        problems = [p for share, _ in shares for p in share]
        matched = {rel: ident for _, share in shares for rel, ident in share.items()}
    if into is not None and not problems:
        into.add(ckpt, files, verified=matched)
    return problems


def _remove(ckpt: Path, progress: Callable[[int], None] = lambda n: None) -> None:
    """Delete the manifest first, so a crash halfway never leaves a 'complete' partial checkpoint; then the files
    one at a time, reporting each: on some shared filesystems unlinking a checkpoint of a terabyte takes minutes,
    which without progress looks like a stuck rank to the watchdog (and to the ranks waiting on it)."""
    (ckpt / MANIFEST).unlink(missing_ok=True)
    if ckpt.parent.exists():
        fsync_dir(ckpt)
    _delete_tree(ckpt, progress)


def _delete_tree(path: Path, progress: Callable[[int], None]) -> None:
    """rmtree, reporting each file deleted."""
    for top, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            Path(top, name).unlink(missing_ok=True)
            progress(1)
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class PendingSave:
    """A checkpoint whose files are being written; it counts only once committed."""

    step: int
    ckpt: Path
    started: float
    peers: PeerProgress
    """How the ranks wait for each other's writes (progress-aware, no collective timeout)."""
    stall: float = 0.0
    """Seconds training waited for this save (all of it when synchronous; the snapshot when in the background)."""
    error: Optional[str] = None
    """This rank's write failure, once waited for (`wait_for_writes`); `commit` fails every rank with it."""


def begin_save(engine, writer, root: Path, step: int, state: dict, dist: Dist,
               write_extras: Callable[[Path, Callable], None], progress: Callable[[int], None],
               beat: Callable[[str], None], background: bool = False) -> PendingSave:
    """Hand checkpoint `step` to every rank's writer; returns once the files are queued. Collective."""
    tag = tag_for(step)
    ckpt = root / tag
    peers = PeerProgress(f"save/{tag}", dist.world)
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if ckpt.exists():
            _remove(ckpt)  # a leftover of an attempt that died while saving this step
    peers.wait_all("cleared", beat)
    started = time.perf_counter()
    writer.begin(lambda n: (progress(n), peers.add(n)), snapshot_first=background)
    engine.save_checkpoint(str(root), tag=tag, client_state={}, save_latest=False)
    rng = rng_file(ckpt, dist.rank)
    rng.parent.mkdir(parents=True, exist_ok=True)
    rng_now = rng_state()
    writer.write_file(rng, lambda w: torch.save(rng_now, w))
    if dist.is_main:
        text = json.dumps(state, indent=2) + "\n"
        writer.write_file(ckpt / TRAINER_STATE, lambda w: w.write(text.encode()))
        write_extras(ckpt, writer.write_file)
    return PendingSave(step, ckpt, started, peers, stall=time.perf_counter() - started)


def durable_everywhere(writer, dist: Dist) -> bool:
    """True on every rank once every rank's queued writes have finished (one tiny collective)."""
    return all_reduce_max([0.0 if writer.done() else 1.0], dist.device)[0] == 0


def wait_for_writes(writer, dist: Dist) -> Optional[str]:
    """Block until this rank's queued writes end; the failure, named for the other ranks, or None.

    Not raised here: a rank that raised alone would leave the others waiting for its shards, and the job would
    end blaming whichever rank torchrun killed first. `commit` shares it so every rank fails with it."""
    try:
        writer.wait()
    except Exception as exc:  # noqa: BLE001 - every rank must learn that some rank's write failed
        return f"rank {dist.rank}: {type(exc).__name__}: {exc}"
    return None


def commit(pending: PendingSave, writer, root: Path, dist: Dist, keep_last: int, log: Callable[[str], None],
           beat: Callable[[str], None], faults: Optional[FaultHooks] = None) -> dict:
    """Make a pending checkpoint the one in charge, once every rank's files are durable. Collective.

    The manifest lists what every rank's writer recorded (size and sha256 of the bytes as written); a file
    no writer recorded (DeepSpeed writing around its engine) is hashed from disk and reported. Returns the
    save's measurements for the metrics. A write that failed on any rank fails every rank, naming it.
    """
    error = pending.error or wait_for_writes(writer, dist)
    if faults is not None:
        faults.saving(pending.step)
    pending.peers.wait_all("written", beat)
    shares = all_gather_objects({"error": error, "snapshot_bytes": writer.snapshot_bytes(),
                                 "files": {str(Path(p).relative_to(pending.ckpt)): meta
                                           for p, meta in writer.written.items()}})
    errors = [s["error"] for s in shares if s["error"]]
    if errors:
        raise CheckpointError(f"saving {pending.ckpt.name} failed ({'; '.join(errors)}); the previous checkpoint "
                              f"stays in charge")
    files = {rel: dict(zip(("size", "sha256"), meta)) for share in shares for rel, meta in share["files"].items()}
    measured = {}
    if dist.is_main:
        unrecorded = [rel for rel in _files(pending.ckpt) if rel not in files]
        for rel in unrecorded:
            files[rel] = dict(zip(("size", "sha256"), _hash_file(pending.ckpt / rel)))
        manifest = {"step": pending.step, "world_size": dist.world, "time": time.time(), "files": files}
        atomic_write(pending.ckpt / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        atomic_write(root / LATEST, pending.ckpt.name + "\n")
        atomic_write(root / DS_LATEST, pending.ckpt.name)
        seconds = time.perf_counter() - pending.started
        prune(root, keep_last, pending.ckpt, log, progress=lambda n: (pending.peers.add(n), beat("save")))
        size = sum(meta["size"] for meta in files.values())
        measured = {"save_seconds": round(seconds, 3), "save_gb": round(size / 1e9, 4),
                    "save_gbps": round(size / 1e9 / max(seconds, 1e-9), 4),
                    "save_stall_seconds": round(pending.stall, 3)}
        snapshots = sum(share["snapshot_bytes"] for share in shares)
        if snapshots:
            measured["save_snapshot_gb"] = round(snapshots / 1e9, 6)
        log(f"checkpoint {pending.ckpt} committed: {len(files)} files, {size / 1e9:.3f} GB in {seconds:.1f} s "
            f"({measured['save_gbps']:.2f} GB/s), training waited {pending.stall:.1f} s"
            + (f"; hashed {len(unrecorded)} file(s) written outside the writer: {', '.join(unrecorded[:3])}"
               if unrecorded else ""))
    pending.peers.wait_all("committed", beat)
    return measured


def save(engine, writer, root: Path, step: int, state: dict, dist: Dist, keep_last: int,
         write_extras: Callable[[Path, Callable], None], log: Callable[[str], None],
         progress: Callable[[int], None], beat: Callable[[str], None], faults: Optional[FaultHooks] = None
         ) -> tuple[Path, dict]:
    """Write and commit checkpoint `step`, waiting for it; (its directory, the save's measurements)."""
    pending = begin_save(engine, writer, root, step, state, dist, write_extras, progress, beat)
    pending.error = wait_for_writes(writer, dist)
    pending.stall = time.perf_counter() - pending.started
    return pending.ckpt, commit(pending, writer, root, dist, keep_last, log, beat, faults)


def sizes_match(ckpt: Path) -> bool:
    """The cheap half of verification: every file the manifest names exists with its recorded size, no extras."""
    try:
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
    except (OSError, json.JSONDecodeError, KeyError):
        return False
    return (all((ckpt / rel).is_file() and (ckpt / rel).stat().st_size == meta["size"] for rel, meta in files.items())
            and not unlisted_files(ckpt))


def prune(root: Path, keep_last: int, committed: Path, log: Callable[[str], None] = lambda m: None,
          progress: Callable[[int], None] = lambda n: None) -> None:
    """Keep the checkpoint just committed and the newest keep_last - 1 sound ones before it; drop the rest.

    Run after LATEST names `committed`, which is never touched, so LATEST always names a complete checkpoint.
    Checkpoints of later steps belong to a timeline this run abandoned (it resumed from an earlier one, e.g.
    because they were damaged) and go; older ones are kept only if their files still have their recorded
    sizes (a full hash of every kept checkpoint at every save would reread terabytes; loads hash anyway).
    """
    newest = step_of(committed)
    kept = {committed.name}
    for ckpt in complete_checkpoints(root):
        if ckpt.name in kept:
            continue
        if step_of(ckpt) > newest:
            log(f"removing {ckpt.name}: a later step of a timeline this run did not continue")
        elif len(kept) < keep_last and sizes_match(ckpt):
            kept.add(ckpt.name)
            continue
        elif len(kept) < keep_last:
            log(f"removing {ckpt.name}: its files no longer match its manifest")
        _remove(ckpt, progress)
    for p in root.glob(f"{TAG_PREFIX}*{UNIVERSAL_SUFFIX}*"):
        if p.name.split(UNIVERSAL_SUFFIX)[0] not in kept:
            if p.is_dir():
                _delete_tree(p, progress)  # a universal copy: 12 bytes per parameter and more
            else:
                p.unlink(missing_ok=True)
    for p in partial_checkpoints(root):
        if p.name != committed.name:
            _delete_tree(p, progress)


def conversion_workers() -> int:
    """Worker processes for the universal conversion: every CPU this process may use, at most 16.

    Each extract worker reads one saving rank's optimizer shard (for a 70B model saved by 64 ranks about 13 GB,
    by 8 ranks 106 GB). It is mapped (trainer.safe_convert), so it is page cache the kernel can reclaim, not the
    worker's own memory; the cap bounds how many shards are read at once.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, cpus))


def _convert(ckpt: Path, out: Path, workers: int, beat: Callable[[str], None]) -> None:
    """DeepSpeed's ds_to_universal into `out`, beating while it reads and writes (progress, not a phase).

    Progress is the conversion's processes' I/O counters, not its output: walking that tree every second listed
    up to millions of per-rank fragment files (a large MoE model on many ranks) on the shared filesystem's
    metadata server."""
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "trainer.safe_convert", "--parent", str(os.getpid()), "--input_folder", str(ckpt),
           "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", str(workers),
           "--num_merge_workers", str(workers)]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            seen = None
            while proc.poll() is None:
                time.sleep(1.0)
                progress = group_io_counters(proc.pid)  # its own process group: it and its workers
                if progress != seen:
                    seen = progress
                    beat("convert")
        finally:
            if proc.poll() is None:  # this process is failing: the conversion and its workers go with it
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.returncode != 0:
            log.seek(0)
            raise CheckpointError(f"converting {ckpt} to a universal checkpoint failed:\n{log.read()[-4000:]}")
    # Copying and hashing the copy (12 bytes per parameter and more) beats as it goes: at 70B it outlasts the
    # watchdog's start-up allowance, which would kill the rank and start the conversion over.
    copied = {}
    for f in ckpt.glob("*model_states.pt"):  # module weights, LR schedule and counters stay where DeepSpeed looks
        copied[f.name] = copy_hashed(f, out / f.name, lambda n: beat("convert"))
    # The copy is a checkpoint of its own: its manifest is what a resume checks every file it reads against.
    files = {rel: dict(zip(("size", "sha256"), copied.get(rel) or _hash_file(out / rel, lambda n: beat("convert"))))
             for rel in _files(out)}
    atomic_write(out / MANIFEST, json.dumps({"from": str(ckpt), "source_manifest": _digest(ckpt / MANIFEST),
                                             "workers": workers, "seconds": round(time.perf_counter() - started, 1),
                                             "files": files}, indent=1) + "\n")


def universal_copy(ckpt: Path, log: Callable[[str], None], beat: Callable[[str], None] = lambda phase: None,
                   workers: Optional[int] = None, into: Optional[Path] = None) -> Path:
    """DeepSpeed's universal form of a ZeRO checkpoint, for resuming on another number of ranks: next to it, or
    in `into` if no copy is next to it yet.

    A job passes its own checkpoints directory as `into`: resuming from another run's checkpoint (train.resume)
    must not write into that run's directory, which may be read-only, shared, or pruned by its own job. A copy
    next to the checkpoint (`shardtune convert` made it ahead of the job) is used where it is.

    Built once, by whichever process asks first (a rank of the job or `shardtune convert` ahead of it), with
    parallel workers; everyone else waits on the filesystem, not in a collective, so a long conversion
    never meets a collective timeout. The copy is named after the source's manifest, so a step saved again
    gets a fresh conversion instead of a stale one.
    """
    key = f"{ckpt.name}{UNIVERSAL_SUFFIX}-{_digest(ckpt / MANIFEST)[:12]}"
    root = into if into is not None and built(ckpt.parent, key) is None else ckpt.parent
    workers = workers or conversion_workers()
    started = time.perf_counter()
    path, built_here = build_once(root, key, lambda tmp: _convert(ckpt, tmp, workers, beat), on_wait=log,
                                  on_poll=lambda: beat("convert"), what="convert to the universal format")
    if built_here:
        log(f"converted {ckpt.name} to DeepSpeed's universal format in {time.perf_counter() - started:.1f} s "
            f"({workers} workers)")
    return path


def verify_universal_copy(copy: Path, ckpt: Path, dist: Dist, log: Callable[[str], None], into: Manifests) -> None:
    """Every rank checks a share of the universal copy before any rank loads from it, and registers it in `into`.

    Each rank then loads a slice of every one of its files, and finds them unchanged since they were hashed, so
    the copy is read whole once per job instead of once per rank (load_verified's `verified_as`). A copy made ahead
    (`shardtune convert`) may have been damaged since: it is refused, not used, and the source stays as it was."""
    problems = verify_again_if_damaged(copy, dist, log, into, besides=(BUILT,))
    if problems:
        raise CheckpointError(f"{copy}: the universal copy of {ckpt.name} fails verification "
                              f"({'; '.join(problems[:3])}); delete it, and the next launch converts {ckpt.name} "
                              f"again")


def write_hf_metadata(ckpt: Path, model, tokenizer, write_file: Callable[[Path, Callable], None]) -> None:
    """config, generation config, tokenizer and (for a model with custom code) that code inside a checkpoint, so
    it can be exported on its own.

    Saved by transformers into a scratch directory first, then copied in through the checkpoint's writer, so
    their bytes are hashed on the way in like every other file of the checkpoint. A config's save copies only
    the configuration's code; the model's own modeling file is copied as `save_pretrained` would.
    """
    from transformers.dynamic_module_utils import custom_object_save

    with tempfile.TemporaryDirectory(prefix="shardtune-hf-") as scratch:
        model.config.save_pretrained(scratch)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(scratch)
        if getattr(model, "_auto_class", None) is not None:
            custom_object_save(model, scratch)
        tokenizer.save_pretrained(scratch)
        hf = ckpt / HF
        hf.mkdir(parents=True, exist_ok=True)
        # Not only files: transformers 5 saves a tokenizer's named chat templates in additional_chat_templates/.
        for item in sorted(p for p in Path(scratch).rglob("*") if p.is_file()):
            data, target = item.read_bytes(), hf / item.relative_to(scratch)
            target.parent.mkdir(parents=True, exist_ok=True)
            write_file(target, lambda w, data=data: w.write(data))


def rng_state() -> dict:
    from deepspeed.accelerator import get_accelerator

    return {"torch": torch.get_rng_state(), "device": get_accelerator().get_rng_state()}


def restore_rng(ckpt: Path, dist: Dist) -> bool:
    """Restore this rank's RNG streams when the checkpoint has them (same world size)."""
    from deepspeed.accelerator import get_accelerator

    path = rng_file(ckpt, dist.rank)
    if not path.is_file():
        return False
    state = load_verified(path, expected(ckpt, path))
    torch.set_rng_state(state["torch"])
    get_accelerator().set_rng_state(state["device"])
    return True


def manifest(ckpt: Path) -> dict:
    return json.loads((ckpt / MANIFEST).read_text())


def expected(ckpt: Path, path: Path) -> Optional[tuple[int, str]]:
    """(size, sha256) the manifest of `ckpt` records for one of its files."""
    meta = manifest(ckpt)["files"].get(str(path.relative_to(ckpt)))
    return None if meta is None else (meta["size"], meta["sha256"])


def read_state(ckpt: Path) -> dict:
    """The trainer's counters, verified like every other file of the checkpoint."""
    return json.loads(read_verified(ckpt / TRAINER_STATE, expected(ckpt, ckpt / TRAINER_STATE)))


RECHECK_S = 5.0


def verify_again_if_damaged(ckpt: Path, dist: Dist, log: Callable[[str], None],
                            into: Optional[Manifests] = None, besides: tuple[str, ...] = ()) -> list[str]:
    """verify, and once more after a pause when it finds problems: a shared filesystem can fail reads or hide a
    file for a moment, and a checkpoint judged damaged is passed over, and later pruned as an abandoned timeline."""
    problems = verify(ckpt, dist, into, besides)
    if problems:
        log(f"checkpoint {ckpt.name} failed verification ({'; '.join(problems[:3])}); checking it again in "
            f"{RECHECK_S:g} s in case the filesystem was briefly unavailable")
        time.sleep(RECHECK_S)
        problems = verify(ckpt, dist, into, besides)
    return problems


def find_resume(run_dir: RunDir, resume: str, dist: Dist, log: Callable[[str], None],
                into: Optional[Manifests] = None) -> Optional[Path]:
    """The checkpoint to resume from per train.resume, verified on every rank; None to start fresh. The one chosen
    is registered in `into` (verify)."""
    root = run_dir.checkpoints
    if resume == "never":
        return None
    if resume != "auto":
        ckpt = Path(resume)
        if not (ckpt / MANIFEST).is_file():
            raise CheckpointError(f"train.resume: {ckpt} is not a complete shardtune checkpoint "
                                  f"({'missing' if not ckpt.exists() else 'no ' + MANIFEST})")
        problems = verify_again_if_damaged(ckpt, dist, log, into)
        if problems:
            raise CheckpointError(f"train.resume: {ckpt} fails verification: " + "; ".join(problems[:5]))
        return ckpt
    chosen = None
    # On a shared filesystem nodes can list a directory differently for a while (NFS attribute caches):
    # rank 0 lists, and every rank verifies the same candidates in the same order.
    listed = [str(p) for p in complete_checkpoints(root)] if dist.is_main else None
    candidates = [Path(p) for p in broadcast_object(listed)]
    damaged = []
    for ckpt in candidates:
        problems = verify_again_if_damaged(ckpt, dist, log, into)
        if not problems:
            chosen = ckpt
            break
        damaged.append(f"{ckpt}: {'; '.join(problems[:3])}")
        log(f"checkpoint {ckpt.name} is damaged ({'; '.join(problems[:3])}); falling back to the previous one")
    if candidates and chosen is None:
        # Starting again from the pretrained weights would silently throw the run away (and its metrics).
        raise CheckpointError("every checkpoint of this run is damaged, so it cannot resume; nothing was changed:\n  "
                              + "\n  ".join(damaged) + "\nrestore one from a backup, or start over with "
                              "train.resume: never and train.overwrite: true")
    newest = step_of(chosen) if chosen else -1
    partial = [p.name for p in partial_checkpoints(root) if step_of(p) > newest]
    if partial:
        log(f"ignoring incomplete checkpoint(s) {', '.join(partial)} (a save that did not finish)")
    return chosen



def state_fingerprint(engine, dist: Dist) -> list[float]:
    """Sums of the optimizer's master weights and both Adam moments over the whole job, in float64.

    Written with every checkpoint and compared after every load, because DeepSpeed can return from
    load_checkpoint without having restored the weights or the optimizer state (a missing `latest`, some
    ZeRO-3 paths): training would then go on from the pretrained weights under the checkpoint's step counter.
    The sums do not depend on how the state is partitioned, so they hold across world-size changes too.
    """
    optimizer = engine.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer that steps the fp32 partitions
    if engine.zero_optimization_stage() == 3:
        # ZeRO-3 empties the torch optimizer's param groups between steps and hands it one partition per step.
        masters = list(optimizer.fp32_partitioned_groups_flat)
    else:
        masters = [p for group in inner.param_groups for p in group["params"]]
    sums = torch.zeros(3, dtype=torch.float64, device=dist.device)
    for p in masters:
        sums[0] += _sum64(p).to(sums.device)
    for state in inner.state.values():
        for i, key in ((1, "exp_avg"), (2, "exp_avg_sq")):
            if key in state:
                sums[i] += _sum64(state[key]).to(sums.device)
    if engine.zero_optimization_stage() > 0:
        torch.distributed.all_reduce(sums)  # partitions: each rank holds a part
    return sums.tolist()


def _sum64(t: torch.Tensor, chunk: int = 1 << 24) -> torch.Tensor:
    """Σ t in float64, a chunk at a time: torch.sum(dtype=float64) first copies the whole tensor to float64 (a rank's
    flat fp32 partition: twice its size again on the device, at every save and resume)."""
    flat = t.detach().reshape(-1)
    return sum((torch.sum(part, dtype=torch.float64) for part in flat.split(chunk)),
               torch.zeros((), dtype=torch.float64, device=t.device))


def check_fingerprint(ckpt: Path, saved: Optional[list[float]], loaded: list[float]) -> None:
    """Raise when the state in memory after a load is not the state the checkpoint was written from."""
    if saved is None:
        return  # written before fingerprints existed
    names = ("master weights", "first Adam moments", "second Adam moments")
    # A master sum of exactly 0: a ZeRO-3 checkpoint written before the masters were read from their partitions.
    compared = [(n, want, got) for n, want, got in zip(names, saved, loaded) if not (n == names[0] and want == 0.0)]
    wrong = [f"{n}: sum {got:.10g} after loading, {want:.10g} when saved" for n, want, got in compared
             if abs(got - want) > 1e-6 * max(abs(want), 1e-12) + 1e-9]
    if wrong:
        raise CheckpointError(f"{ckpt.name} did not load: the state in memory is not the one it was saved from "
                              f"({'; '.join(wrong)}); refusing to train on it")
