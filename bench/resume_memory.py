"""Resuming: a rank's host memory while it loads its checkpoint, shardtune's reader against DeepSpeed's own.

    .venv/bin/python -m bench.resume_memory     # about 9 min on 2 cores; writes the "## Resuming" section

The bench's 271M Llama (bench/io.py's: 1024 hidden, 16 layers, 32k vocabulary, untied) on 2 CPU ranks in
fp32, at ZeRO-2 and ZeRO-3 with the optimizer offloaded: one step, saved with DeepSpeed's own checkpoint engine.
Then, for each reader, a fresh pair of ranks builds the same engine and loads that checkpoint:
  - DeepSpeed: `engine.load_checkpoint` with its default engine (TorchCheckpointEngine), what a user runs;
  - shardtune: the trainer's reader, as `Session` runs it: every rank verifies a share of the files against the
    manifest (`checkpoint.verify`), then `ShardWriter.load` maps each file (hashing it again only if it changed
    since) and `MappedLoads.take_states` copies out the states the optimizer keeps;
  - shardtune_read_whole: the same, each file read into memory after its hash (the reader before mapping),
    which tells the mapping's cost in time from the hash's.
Per pair: the peak RSS of any process (getrusage RUSAGE_CHILDREN through bench._max_rss: the build and the
load), and per rank the kernel's own high-water mark over what the rank keeps after the load (VmHWM - VmRSS,
after the high-water mark was reset before the load), the anonymous memory the load added (RssAnon), the load's
wall time, and a digest of the optimizer states loaded (the two readers must agree bitwise).

Then a resume on another world size: the same model saved by one rank, converted by DeepSpeed's own
ds_to_universal, and loaded by two ranks with `load_universal`, by DeepSpeed's reader and by shardtune's (its
checkpoint_io.guarded_loads, which maps the files DeepSpeed loads with torch.load directly, and at ZeRO-1/2
mapped_loads.universal_states_in_place, which copies each slice into the flat optimizer states). At ZeRO-1/2
DeepSpeed all-gathers the parameters after that load; the rows give the peak before it too.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._runner import PYTHON, REPO, RunFailed, machine_words
from bench.io import MODEL

START, END = "<!-- bench-resume:start -->", "<!-- bench-resume:end -->"
READERS = ("deepspeed", "shardtune_read_whole", "shardtune")
STAGES = {"ZeRO-2, optimizer offloaded": ("zero.stage=2", "zero.offload_optimizer=cpu"),
          "ZeRO-3, optimizer offloaded": ("zero.stage=3", "zero.offload_optimizer=cpu")}

RANK = """
import gc, hashlib, json, os, sys, time
from pathlib import Path
rank, world, store, ckpt, ds_config, model_config, phases = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                                             Path(sys.argv[4]), json.loads(sys.argv[5]),
                                                             json.loads(sys.argv[6]), sys.argv[7].split(","))
universal = (ckpt / "zero").is_dir()  # DeepSpeed's universal format: one folder per parameter under zero/
if universal:
    ds_config["checkpoint"] = {"load_universal": True}
os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
import torch, torch.distributed as dist
from trainer.ops import pin_build_dir
pin_build_dir()
import deepspeed, deepspeed.comm
from transformers import LlamaConfig, LlamaForCausalLM
from trainer.checkpoint_io import Manifests, engine_loads, load_verified
from trainer.mapped_loads import mapped_files
from trainer.shard_writer import ShardWriter
from trainer.checkpoint import verify
from trainer.distributed import Dist
from launcher.contract.run_dir import MANIFEST
from bench.resume_memory import write_manifest
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
deepspeed.comm.init_distributed(dist_backend="gloo")
def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM", "RssAnon")}
def built():
    torch.manual_seed(0)
    config = LlamaConfig(**model_config, max_position_embeddings=2048)
    if ds_config["zero_optimization"]["stage"] == 3:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = LlamaForCausalLM(config)
    else:
        model = LlamaForCausalLM(config)
    return deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds_config)[0]
def states_digest(engine):
    digest, opt = hashlib.sha256(), engine.optimizer
    while opt is not None:
        if isinstance(opt, torch.optim.Optimizer):
            for state in opt.state.values():
                for key in sorted(state):
                    value = state[key]
                    digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if torch.is_tensor(value)
                                  else repr(value).encode())
        opt = getattr(opt, "optimizer", None)
    return digest.hexdigest()
def save(engine):
    ids = torch.randint(0, model_config["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(rank))
    for _ in range(ds_config["gradient_accumulation_steps"]):  # one optimizer step: Adam's moments exist
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    engine.save_checkpoint(str(ckpt.parent), tag=ckpt.name)
    dist.barrier()
def read_bytes():
    return int(dict(line.split(":", 1) for line in open("/proc/self/io"))["rchar"])  # through read(), not mapped
def load(engine, reader):
    if reader.startswith("shardtune") and rank == 0 and not (ckpt / MANIFEST).exists():
        write_manifest(ckpt)
    gc.collect()
    dist.barrier()
    before = status()
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    at_gather = {}
    gather = getattr(engine.optimizer, "update_lp_params", None)  # ZeRO-1/2 after a universal load: all-gather
    if gather is not None:
        engine.optimizer.update_lp_params = lambda: (at_gather.update(status()), gather())
    read_before, start = read_bytes(), time.perf_counter()
    if reader.startswith("shardtune"):
        engine.checkpoint_engine = writer = ShardWriter(engine._config)
        writer.manifests = Manifests()
        if reader == "shardtune_read_whole":  # the reader before files were mapped: hashed, then read into memory
            writer.load = lambda path, map_location=None: load_verified(
                Path(path), writer.manifests.expected(Path(path)), map_location)
            writer.manifests.add(ckpt, json.loads((ckpt / MANIFEST).read_text())["files"])
        else:  # as Session.build: every rank verifies a share of the files against the manifest (in the time)
            problems = verify(ckpt, Dist(rank, world, rank, torch.device("cpu")), into=writer.manifests)
            assert not problems, problems
    if reader == "shardtune":  # as Session.resume: DeepSpeed's direct torch.loads (the universal format's) too
        with engine_loads(writer.manifests, writer.mapped, engine.optimizer):
            engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:
        engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name)
    if reader.startswith("shardtune"):
        writer.mapped.take_states(engine.optimizer)
    seconds = time.perf_counter() - start
    read = read_bytes() - read_before
    gc.collect()
    after = status()
    return {"load_s": seconds, "read": read, "added": after["RssAnon"] - before["RssAnon"],
            "peak_over_kept": after["VmHWM"] - after["VmRSS"], "mapped_after": len(mapped_files(ckpt)),
            "before_gather": at_gather["VmHWM"] - after["VmRSS"] if at_gather else None,
            "states": states_digest(engine),
            "params": sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())}
for phase in phases:
    engine = built()  # as a relaunched rank: built, then loaded
    report = save(engine) if phase == "save" else load(engine, phase)
    if report:
        print("RESULT " + json.dumps({"rank": rank, "phase": phase, **report}), flush=True)
    del engine
    gc.collect()  # an engine's reference cycles: freed now, not during the next load measured
dist.barrier()
os._exit(0)  # as a rank ends (trainer.distributed.exit_without_teardown): gloo's teardown can abort a clean exit
"""


def ds_config_for(overrides: tuple[str, ...], work: Path, world: int = 2) -> dict:
    """The DeepSpeed config shardtune renders for a `world`-rank CPU run in fp32 (every reader loads with it)."""
    from launcher.contract.config import apply_overrides, validate_config
    from launcher.planning.deepspeed_config import render_deepspeed_config
    from launcher.planning.plan import resolve

    raw = {"model": {"name_or_path": "org/model"}, "data": {"path": "d.jsonl", "format": "text", "seq_len": 64},
           "train": {"max_steps": 1, "micro_batch_size": 1, "grad_accum_steps": 1, "lr": 1e-4, "seed": 0,
                     "precision": "fp32"},
           "launch": {"nodes": 1, "procs_per_node": world, "device": "cpu"}, "output_dir": str(work / "run")}
    return render_deepspeed_config(resolve(validate_config(apply_overrides(raw, list(overrides))))[0])


def pair(ckpt: Path, ds_config: dict, model: dict, phases: str, store: Path, world: int = 2) -> dict:
    """`world` ranks running `phases` in turn (comma-separated: save, deepspeed, shardtune, shardtune_read_whole),
    each on a freshly built engine, under bench._max_rss: {phase: [rank 0's report, ...]} and "max_rss". A
    checkpoint in DeepSpeed's universal format is loaded as one (`load_universal`). A report's "read" is the bytes
    the rank read through read() from verifying to the end of the load (/proc/self/io rchar; a mapped file's pages
    are not counted)."""
    from launcher.contract.run_dir import MANIFEST

    rss_file = store.with_suffix(".rss.json")
    driver = ("import subprocess, sys; ranks = [subprocess.Popen([sys.executable, '-c', sys.argv[1], str(r)] "
              "+ sys.argv[2:], stdout=subprocess.PIPE, text=True) for r in range(int(sys.argv[2]))]; "
              "outs = [p.communicate()[0] for p in ranks]; print(''.join(outs), end=''); "
              "sys.exit(max(p.returncode for p in ranks))")
    proc = subprocess.run([str(PYTHON), "-m", "bench._max_rss", str(rss_file), str(PYTHON), "-c", driver, RANK,
                           str(world), str(store), str(ckpt), json.dumps(ds_config), json.dumps(model), phases],
                          capture_output=True, text=True, cwd=REPO, timeout=1800,
                          env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})  # freed memory leaves at once
    (ckpt / MANIFEST).unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RunFailed(f"{phases} failed:\n{proc.stderr[-4000:]}")
    out: dict = {"max_rss": json.loads(rss_file.read_text())["max_rss_bytes"]}
    for line in proc.stdout.splitlines():
        if "RESULT " in line:
            report = json.loads(line.split("RESULT ", 1)[1])
            out.setdefault(report["phase"], [None] * world)[report["rank"]] = report
    return out


def convert_universal(ckpt: Path, out: Path | None = None, shardtune: bool = False) -> dict:
    """`ckpt` converted to DeepSpeed's universal format: by DeepSpeed's own ds_to_universal, as a user resuming on
    another world size runs it, or by shardtune's (`trainer.safe_convert`: every load verified and mapped, against
    a manifest written here as a shardtune save writes it). Returns the output folder, the wall time, the peak RSS
    of any process (getrusage) and the peak of the anonymous memory its processes held together (sampled)."""
    from launcher.contract.run_dir import MANIFEST

    out = out or ckpt.with_name(ckpt.name + "_universal")
    module = "trainer.safe_convert" if shardtune else "deepspeed.checkpoint.ds_to_universal"
    if shardtune:
        write_manifest(ckpt)
    rss_file = out.with_suffix(".rss.json")
    start = time.perf_counter()
    proc = subprocess.Popen([str(PYTHON), "-m", "bench._max_rss", str(rss_file), str(PYTHON), "-m", module,
                             "--input_folder", str(ckpt), "--output_folder", str(out), "--inject_missing_state",
                             "--num_extract_workers", "2", "--num_merge_workers", "2"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    anon = _group_anon_peak(proc)
    output = proc.communicate()[0]
    if proc.returncode != 0:
        raise RunFailed(f"{module} failed:\n{output[-4000:]}")
    (ckpt / MANIFEST).unlink(missing_ok=True)
    return {"folder": out, "seconds": time.perf_counter() - start, "anon_peak": anon,
            "max_rss": json.loads(rss_file.read_text())["max_rss_bytes"],
            "files": listing(out)}


def write_manifest(folder: Path) -> None:
    """The manifest a shardtune save writes (the "files" it checks), for a checkpoint DeepSpeed's engine wrote."""
    from launcher.contract.run_dir import MANIFEST

    (folder / MANIFEST).write_text(json.dumps({"files": listing(folder)}))


def listing(folder: Path) -> dict[str, dict]:
    """Size and sha256 of every file below `folder`, by relative path: a shardtune manifest's "files"."""
    out = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(f, "rb") as fh:
            out[str(f.relative_to(folder))] = {"size": f.stat().st_size,
                                              "sha256": hashlib.file_digest(fh, "sha256").hexdigest()}
    return out


def _group_anon_peak(proc: subprocess.Popen) -> int:
    """The largest sum of RssAnon over the processes of `proc`'s process group, sampled every 20 ms until it ends:
    memory the processes own, which the kernel cannot reclaim as it reclaims a mapped file's pages."""
    peak = 0
    while proc.poll() is None:
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == proc.pid:  # pgrp
                    fields = dict(line.split(":", 1) for line in (stat.parent / "status").read_text().splitlines())
                    total += int(fields["RssAnon"].split()[0]) * 1024
            except (OSError, ValueError, KeyError, IndexError):
                continue  # a process that ended meanwhile
        peak = max(peak, total)
        time.sleep(0.02)
    return peak


def measure(work: Path, quick: bool) -> dict:
    model = {**MODEL, "num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 688} if quick else MODEL
    report = {"machine": machine_words(), "stages": {}, "universal": {}}
    for name, overrides in STAGES.items():
        ds_config = ds_config_for(overrides, work)
        ckpt = work / name.split(",")[0] / "step"
        pair(ckpt, ds_config, model, "save", work / f"{ckpt.parent.name}-save.store")
        report["stages"][name] = {}
        for reader in READERS:  # a fresh pair each: the peak RSS of any process is that reader's alone
            ran = pair(ckpt, ds_config, model, reader, work / f"{ckpt.parent.name}-{reader}.store")
            report["stages"][name][reader] = {"ranks": ran[reader], "max_rss": ran["max_rss"]}
        # A resume on another world size: saved by one rank, loaded by two through the universal format.
        one = work / name.split(",")[0] / "one-rank"
        pair(one, ds_config_for(overrides, work, world=1), model, "save", work / f"{one.parent.name}-one.store",
             world=1)
        theirs = convert_universal(one)
        ours = convert_universal(one, one.with_name("one-rank_universal_shardtune"), shardtune=True)
        converted = {"deepspeed": theirs, "shardtune": ours}  # each reader loads its own converter's copy
        report["universal"][name] = {
            "optimizer_state_bytes": {reader: (done["folder"] / "zero" / "optimizer_state.pt").stat().st_size
                                      for reader, done in converted.items()},
            "shard_bytes": max(f.stat().st_size for f in one.glob("*optim_states.pt")), "convert": converted}
        for reader, done in converted.items():
            ran = pair(done["folder"], ds_config, model, reader, work / f"{one.parent.name}-universal-{reader}.store")
            report["universal"][name][reader] = {"ranks": ran[reader], "max_rss": ran["max_rss"]}
        shutil.rmtree(one.parent)  # ~17 GB of checkpoints per stage at full size
    return report


def _row(stage: str, reader: str, ran: dict, baseline: dict, reference: float) -> str:
    """One table row: a reader's pair against DeepSpeed's (`baseline`), `reference` GB in the sixth column. Where
    DeepSpeed all-gathered the parameters after the load (ZeRO-1/2, universal), the peak before it follows."""
    gb = 1e9
    (r0, r1), rss = ran["ranks"], ran["max_rss"]
    same = [r["states"] for r in baseline["ranks"]] == [r0["states"], r1["states"]]
    before = (f" ({r0['before_gather'] / gb:.3f} / {r1['before_gather'] / gb:.3f} before the gather)"
              if r0.get("before_gather") is not None else "")
    return (f"| {stage} | {reader} | {rss / gb:.2f} | {r0['peak_over_kept'] / gb:.3f} / "
            f"{r1['peak_over_kept'] / gb:.3f}{before} | {r0['added'] / gb:.2f} / {r1['added'] / gb:.2f} | "
            f"{reference:.2f} | {r0['read'] / gb:.2f} / {r1['read'] / gb:.2f} | "
            f"{max(r0['load_s'], r1['load_s']):.1f} | {'yes' if same else '**no**'} | "
            f"{r0['mapped_after'] + r1['mapped_after']} |")


def _but_optimizer_state(files: dict[str, dict]) -> dict[str, dict]:
    return {rel: meta for rel, meta in files.items() if rel != "zero/optimizer_state.pt"}


def markdown(report: dict, command: str) -> str:
    gb = 1e9
    columns = ("| stage | reader | peak RSS, any process (GB) | over kept, rank 0 / 1 (GB) | added, rank 0 / 1 (GB) "
               "| {} (GB) | read, rank 0 / 1 (GB) | load (s) | same states | files mapped after |")
    lines = [START, "## Resuming: host memory while a rank loads its checkpoint", "",
             f"Measured {time.strftime('%Y-%m-%d')} with `{command}` on {report['machine']}: the 271M Llama of "
             "*Large-model I/O* (random weights), 2 CPU ranks, fp32, one step saved by DeepSpeed's own engine and "
             "loaded by a fresh pair of ranks per reader. Peak RSS of any process: getrusage through "
             "`bench._max_rss` (building the engine and loading). Over kept: a rank's high-water mark (reset "
             "before the load) over its RSS after it. Added: the anonymous memory the load left (the moments). "
             "Read: what the rank read through read() (/proc/self/io rchar: shardtune's verification, the hash and "
             "every parse; a mapped file's pages are not counted). Load: verification included.", "",
             columns.format("4 bytes × share"), "|---|---|---|---|---|---|---|---|---|---|"]
    for stage, readers in report["stages"].items():
        for reader, ran in readers.items():
            lines.append(_row(stage, reader, ran, readers["deepspeed"], 4 * ran["ranks"][0]["params"] / 2 / gb))
    lines += ["", "DeepSpeed's engine holds the whole optimizer partition (12 bytes per parameter of the rank's share) "
              "before copying its fp32 master into place, and keeps the loaded moments: it peaks the master's 4 bytes "
              "per parameter above what it keeps, and so did shardtune's reader while it read files whole. The "
              "mapped reader copies the moments out 8 MiB at a time, handing each chunk's pages back: it peaks one "
              "chunk above. The peak RSS of any process is the same for every reader here because on CPU the "
              "engine's own build (the model and its fp32 copies, on a host that is also the device) peaks higher "
              "than any load; on a GPU node the host holds the offloaded optimizer, whose moments appear only at the "
              "load, so there the load is the host's peak. On an 8-GPU node resuming a 70B model at ZeRO-3 with the "
              "optimizer offloaded the difference is 282 GB of host RAM (4 bytes × 70.6B parameters). Load times "
              "are single runs on a shared 2-core VM with the files in the page cache after the save; they vary up "
              "to 2× between runs of this bench, so compare the rows of one run. shardtune's include its "
              "verification: the ranks hash the checkpoint once between them, each file by one rank (the read "
              "column's two ranks add up to the checkpoint), where its reader before hashed each file again as it "
              "loaded it (shardtune_read_whole: twice DeepSpeed's reads, on every rank); mapping is not slower "
              "than reading.", "",
              "### On another world size: saved by one rank, resumed by two through DeepSpeed's universal format", "",
              "The same model saved by a single rank, then converted and loaded with `load_universal` by a fresh "
              "pair of ranks as a user of each would: DeepSpeed's own `ds_to_universal` and its torch.load, or "
              "shardtune's conversion (`trainer.safe_convert`: DeepSpeed's, its loads verified and mapped) and its "
              "reader (`guarded_loads` mapping every file, as `Session.resume` runs it). The conversion itself, "
              "2 workers each:", "",
              "| stage | converter | peak RSS, any process (GB) | anonymous memory, its processes together, "
              "peak (GB) | the saved optimizer file (GB) | its optimizer_state.pt (GB) | seconds | "
              "the same files but optimizer_state.pt |", "|---|---|---|---|---|---|---|---|"]
    for stage, readers in report["universal"].items():
        for converter, ran in readers["convert"].items():
            same = _but_optimizer_state(ran["files"]) == _but_optimizer_state(readers["convert"]["deepspeed"]["files"])
            kept = readers["optimizer_state_bytes"][converter]
            lines.append(f"| {stage} | {converter} | {ran['max_rss'] / gb:.2f} | {ran['anon_peak'] / gb:.2f} | "
                         f"{readers['shard_bytes'] / gb:.2f} | {kept / gb:.4f} | {ran['seconds']:.1f} | "
                         f"{'yes' if same else '**no**'} |")
    lines += ["", CONVERSION_FINDINGS, "", columns.format("optimizer_state.pt"),
              "|---|---|---|---|---|---|---|---|---|---|"]
    for stage, readers in report["universal"].items():
        for reader in ("deepspeed", "shardtune"):
            lines.append(_row(stage, reader, readers[reader], readers["deepspeed"],
                              readers["optimizer_state_bytes"][reader] / gb))
    lines += ["", UNIVERSAL_FINDINGS, END]
    return "\n".join(lines)


CONVERSION_FINDINGS = (
    "An extract worker reads one saving rank's optimizer file (here the only one, 3.25 GB; at ZeRO-2 "
    "DeepSpeed's main process reads rank 0's as well, for the optimizer state every rank shares). "
    "DeepSpeed's converter reads it into memory of its own; shardtune's maps it, so it is page cache, "
    "which the kernel reclaims before it would kill anything (under a cgroup's limit too), and the "
    "anonymous memory of the conversion's processes peaks 2.8 to 3.3 GB lower. The peak RSS of any "
    'process counts mapped pages as well: at ZeRO-3 it is the same for both, at ZeRO-2 1 GB lower. For a '
    "70B model saved by one 8-GPU node (106 GB in each rank's file) every busy worker of DeepSpeed's "
    'converter would hold 106 GB of its own. Both write the same files, bitwise, but one: at ZeRO-3 '
    "DeepSpeed's `zero/optimizer_state.pt` is the saving rank's whole optimizer shard (3.25 GB here), of "
    "which its universal loader reads only the step, the hyperparameters and the loss scaler; shardtune's"
    ' keeps just those (a few kB), so its copy is smaller by the shard, and its conversion writes that '
    "much less. shardtune's seconds include its hash of every file it reads.")
"""What the conversion table shows (measured 2026-12-08; the numbers are that run's)."""

UNIVERSAL_FINDINGS = (
    "At ZeRO-3 DeepSpeed's loader reads the converter's `zero/optimizer_state.pt` into every resuming "
    "rank for its step count and keeps it for the whole load. That file is the saving world's rank 0 "
    "optimizer shard, whole: 12 bytes per parameter of that rank's share (here one rank saved, so 3.25 "
    "GB, the whole model's). DeepSpeed's reader peaks 4.34 GB above the kept state: that file, plus 1.08 "
    "GB (4 bytes per parameter of the model) of parameter files still resident until each state's pass "
    "ends (traced file by file; with the files mapped it does not appear). shardtune's copy has no shard "
    'in that file and its reader maps every file: a rank touches only its own slice of each parameter '
    'file (0.068 GB: half of the 131 MB output-layer file), and the peak RSS of any process falls from '
    "8.03 to 4.24 GB, back to the engine's build. A 70B model saved by one 8-GPU node and resumed on four"
    " would hold 106 GB on every rank with DeepSpeed's reader, 847 GB per node. At ZeRO-2 the file holds "
    "only hyperparameters. There DeepSpeed's loader clones each parameter's slice of both moments and, "
    "once every parameter is read, copies the clones into a new flat buffer per moment: 0.542 GB above "
    "the kept state per rank before the gather (4 bytes per parameter of the share). shardtune's fills "
    "the flat moments straight from the mapped files (`universal_states_in_place`): 0.13 GB, one file's "
    "pages (the 131 MB embedding or output layer, which lies whole in one rank's share). Then DeepSpeed "
    "all-gathers the parameters (`update_lp_params`, as after every ZeRO-1/2 step), and gloo gathers "
    "through a copy of the whole output (1.08 GB, 4 bytes per parameter of the model), which sets both "
    "readers' peak on CPU; NCCL gathers in place. Every "
    "rank loads a slice of every file of the copy: DeepSpeed's reader reads all of it on every rank (3.81"
    " and 6.51 GB), and shardtune's did too, hashing each file as it loaded it; its ranks now verify the "
    'copy once between them, each about half (2.21 and 1.69 GB), and a load finds its file unchanged '
    'since. At 70B that is 840 GB read per rank against 840 GB per job. Verification included, '
    "shardtune's load took about half DeepSpeed's time at both stages in this run; times vary between "
    "runs here (an earlier run, without the slimmer copy, had ZeRO-2 at 13.9 s against DeepSpeed's 9.8).")
"""What the universal table shows (measured 2026-12-08; the numbers are that run's)."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=None, help="where the checkpoints go (default: a temporary directory)")
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    ap.add_argument("--quick", action="store_true", help="a small model, for a smoke run (results not written)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = measure(work, args.quick)
    text = markdown(report, "python -m bench.resume_memory" + (" --quick" if args.quick else ""))
    print(text)
    if not args.quick:
        results = Path(args.results)
        old = results.read_text() if results.exists() else ""
        if START in old:
            results.write_text(old.split(START)[0] + text + old.split(END, 1)[1])
        else:
            results.write_text(old.rstrip() + "\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
