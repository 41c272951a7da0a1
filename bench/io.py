"""Large-model I/O: what a save, an export and a checkpoint cost in memory and time, against DeepSpeed's tools.

    .venv/bin/python -m bench.io            # about 15-25 min on 2 cores; writes the "## Large-model I/O" section

A random-weight Llama of ~271M parameters (hidden 1024, 16 layers, 32k vocabulary, untied: 1.08 GB in
fp32) trains for a few steps on 2 CPU ranks at ZeRO-3, saving every 2 steps, once with synchronous saves
and once with `train.async_save`. Then:
  - `shardtune export CKPT OUT --max_shard_size=200MB` against DeepSpeed's
    `python -m deepspeed.utils.zero_to_fp32 ROOT OUT --tag TAG --safe_serialization --max_shard_size 200MB`
    on the same checkpoint: peak RSS of any process of each command (getrusage RUSAGE_CHILDREN);
  - the rank-0 process during the end-of-run export: its RSS while final/ is being written, against the
    model's fp32 size;
  - one rank's optimizer shard saved twice: hashed as it is written, and written then read back to hash it
    (what saves did before), each fsynced;
  - training stall per save, synchronous vs background (`save_stall_seconds` of the metrics);
  - the planner's `checkpoint_gb` against the bytes on disk.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from bench._runner import PYTHON, REPO, SHARDTUNE, RunFailed, Tree, run_tree, tail
from launcher.contract.run_dir import RunDir

MODEL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=32000, tie_word_embeddings=False)
START, END = "<!-- bench-io:start -->", "<!-- bench-io:end -->"


def make_model(out: Path, quick: bool) -> Path:
    """A random Llama with the tiny test tokenizer (its ids are a subset of the 32k vocabulary)."""
    if (out / "config.json").exists():
        return out
    code = ("import sys, json, torch; from transformers import LlamaConfig, LlamaForCausalLM; "
            "from examples.tiny_model import make_tokenizer; tok = make_tokenizer(512); "
            "cfg = LlamaConfig(**json.loads(sys.argv[2]), max_position_embeddings=2048, "
            "eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None); "
            "torch.manual_seed(0); m = LlamaForCausalLM(cfg); m.save_pretrained(sys.argv[1]); "
            "tok.save_pretrained(sys.argv[1])")
    shape = {**MODEL, "num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 688} if quick else MODEL
    subprocess.run([str(PYTHON), "-c", code, str(out), json.dumps(shape)], check=True, cwd=REPO)
    return out


def run_config(work: Path, model: Path, name: str, async_save: bool, steps: int) -> Path:
    cfg = {"model": {"name_or_path": str(model)},
           "data": {"path": str(REPO / "examples" / "data" / "tiny_chat.jsonl"), "format": "messages",
                    "seq_len": 64},
           "train": {"max_steps": steps, "micro_batch_size": 1, "grad_accum_steps": 1, "lr": 1e-5, "seed": 0,
                     "save_every": 2, "keep_last": 2, "async_save": async_save, "export_max_shard_size": "200MB"},
           "zero": {"stage": 3}, "launch": {"nodes": 1, "procs_per_node": 2, "device": "cpu",
                                            "startup_timeout_s": 3600, "stall_timeout_s": 1800},
           "wandb": {"mode": "disabled"}, "output_dir": str(work / name)}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(cfg: Path, run_dir: Path, log: Path, timeout: float = 3600) -> dict:
    """Launch, sampling rank 0's resident memory while final/ is being written (its temporary directory exists)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    before: list[int] = []
    during: list[int] = []

    def watch(tree: Tree) -> None:
        if 0 not in tree.ranks:
            return
        try:
            rss = psutil.Process(tree.ranks[0]).memory_info().rss
        except psutil.Error:
            return
        if any(run_dir.glob(".final.tmp-*")):
            during.append(rss)
        elif not during:
            before[:] = [rss]

    done = run_tree([str(SHARDTUNE), "launch", str(cfg)], log, REPO, {**os.environ, "OMP_NUM_THREADS": "1"},
                    timeout=timeout, poll=0.1, watch=watch)
    return {"rank0_rss_before_export_gb": (before[0] if before else 0) / 1e9,
            "rank0_rss_peak_during_export_gb": max(during, default=0) / 1e9,
            "export_samples": len(during), "wall_s": done.wall}


def peak_rss(argv: list[str], log: Path) -> float:
    """Peak RSS (GB) of the largest process of a command, measured by a fresh parent that waits for it."""
    code = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:], stdout=open(sys.argv[1], 'w'), "
            "stderr=subprocess.STDOUT); print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")
    out = subprocess.run([str(PYTHON), "-c", code, str(log), *argv], capture_output=True, text=True, cwd=REPO,
                         check=True)
    rc, peak = out.stdout.split()
    if int(rc):
        raise RunFailed(f"exit {rc}: {' '.join(argv)}\n{tail(log)}")
    return int(peak) / 1e9


def hash_methods(shard: Path, work: Path) -> dict:
    """One optimizer shard saved twice (fsynced both ways): hashed while written, and read back to hash."""
    import torch

    from trainer.checkpoint_io import safe_load, write_hashed

    state = safe_load(shard)
    target = work / "hash_bench.pt"
    t0 = time.perf_counter()
    write_hashed(target, lambda w: torch.save(state, w))
    while_writing = time.perf_counter() - t0
    target.unlink()
    t0 = time.perf_counter()
    with open(target, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    cache = "warm"
    try:  # the read-back on a cluster comes from the shared filesystem, not this machine's page cache
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        cache = "dropped"
    except OSError:
        pass
    h = hashlib.sha256()
    with open(target, "rb") as fh:
        for block in iter(lambda: fh.read(8 << 20), b""):
            h.update(block)
    read_back = time.perf_counter() - t0
    size = target.stat().st_size
    target.unlink()
    return {"bytes": size, "hash_while_writing_s": while_writing, "write_then_read_back_s": read_back,
            "page_cache_before_read_back": cache}


def save_stats(run_dir: Path) -> dict:
    """The periodic saves, whose measurements ride on the next training row (the final save, always synchronous
    since nothing trains after it, is logged on a row of its own and left out)."""
    rows = [r for r in RunDir(run_dir).read_metrics() if "save_stall_seconds" in r and "tokens_per_sec" in r]
    return {"saves": len(rows), "stall_s": [r["save_stall_seconds"] for r in rows],
            "save_s": [r["save_seconds"] for r in rows], "gbps": [r["save_gbps"] for r in rows]}


def planned_gb(cfg: Path) -> float:
    out = subprocess.run([str(SHARDTUNE), "plan", str(cfg), "--json"], capture_output=True, text=True, cwd=REPO,
                         check=True).stdout
    return json.loads(out)["checkpoint_gb"]


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(work: Path, quick: bool) -> dict:
    model = make_model(work / "model", quick)
    fp32_gb = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 1e9
    steps = 8  # saves at steps 2, 4 and 6 (in the background with async_save), and the final one at 8
    report: dict = {"model": MODEL if not quick else "quick", "fp32_gb": fp32_gb}
    for name, async_save in (("sync", False), ("async", True)):
        cfg = run_config(work, model, name, async_save, steps)
        report[name] = {**train(cfg, work / name, work / f"{name}.log"), **save_stats(work / name)}
        print(f"{name}: {json.dumps(report[name])}", flush=True)
    run = RunDir(work / "sync")
    ckpt = run.checkpoint(steps)
    report["checkpoint"] = {"planned_gb": planned_gb(work / "sync.yaml"), "on_disk_gb": du(ckpt) / 1e9}
    report["export"] = {
        "shardtune_gb": peak_rss([str(SHARDTUNE), "export", str(ckpt), str(work / "export_ours"),
                                  "--max_shard_size=200MB"], work / "export_ours.log"),
        "zero_to_fp32_gb": peak_rss([str(PYTHON), "-m", "deepspeed.utils.zero_to_fp32", str(ckpt.parent),
                                     str(work / "export_theirs"), "--tag", ckpt.name, "--safe_serialization",
                                     "--max_shard_size", "200MB"], work / "export_theirs.log"),
        "python_torch_deepspeed_import_gb": peak_rss([str(PYTHON), "-c", "import torch, deepspeed, transformers"],
                                                     work / "imports.log")}
    shard = sorted(ckpt.glob("*optim_states.pt"))[0]
    report["hashing"] = hash_methods(shard, work)
    return report


def markdown(r: dict, command: str) -> str:
    e, c, h, s, a = r["export"], r["checkpoint"], r["hashing"], r["sync"], r["async"]
    ratio = e["shardtune_gb"] / e["zero_to_fp32_gb"]
    sync_save = statistics.median(s["save_s"])
    async_stall = statistics.median(a["stall_s"])
    lines = [START, "## Large-model I/O", "",
             f"Measured {time.strftime('%Y-%m-%d')} with `{command}`: a random Llama of 271M parameters "
             f"(1024 hidden, 16 layers, 32k vocabulary, untied; {r['fp32_gb']:.2f} GB in fp32), 2 CPU ranks, "
             "ZeRO-3, fp32.", "",
             "| measurement | shardtune | baseline | ratio | goal |", "|---|---|---|---|---|",
             f"| peak RSS of any process, export with 200MB shards | {e['shardtune_gb']:.2f} GB (`shardtune export`) | "
             f"{e['zero_to_fp32_gb']:.2f} GB (`deepspeed.utils.zero_to_fp32`) | {ratio:.2f} | ≤ 0.5 "
             f"{'met' if ratio <= 0.5 else '**missed**'} |",
             "| rank 0 RSS while the final model is written (end of run) | "
             f"{s['rank0_rss_peak_during_export_gb']:.2f} GB peak, "
             f"{s['rank0_rss_before_export_gb']:.2f} GB before | model fp32 {r['fp32_gb']:.2f} GB | "
             f"+{s['rank0_rss_peak_during_export_gb'] - s['rank0_rss_before_export_gb']:.2f} GB for the export | "
             "no whole model in one process |",
             f"| one optimizer shard ({h['bytes'] / 1e9:.2f} GB) saved and hashed | {h['hash_while_writing_s']:.2f} s, "
             f"{h['bytes'] / 1e9:.2f} GB of I/O (hashed while written) | {h['write_then_read_back_s']:.2f} s, "
             f"{2 * h['bytes'] / 1e9:.2f} GB of I/O (written, then read back; page cache "
             f"{h['page_cache_before_read_back']}) | {h['hash_while_writing_s'] / h['write_then_read_back_s']:.2f} "
             "(time), 0.50 (I/O) | no second pass over the bytes |",
             f"| training stall per periodic save (median of {len(a['stall_s'])}; each: "
             f"{', '.join(f'{x:.2f}' for x in a['stall_s'])} s) | {async_stall:.2f} s (`train.async_save`) | "
             f"{sync_save:.2f} s (synchronous save, median) | {async_stall / sync_save:.2f} | ≤ 0.25 "
             f"{'met' if async_stall <= 0.25 * sync_save else '**missed**'} |",
             f"| checkpoint size | {c['planned_gb']:.3f} GB (plan's `checkpoint_gb`) | "
             f"{c['on_disk_gb']:.3f} GB on disk | "
             f"{c['planned_gb'] / c['on_disk_gb']:.3f} | within 5 % "
             f"{'met' if abs(c['planned_gb'] / c['on_disk_gb'] - 1) <= 0.05 else '**missed**'} |", "",
             "On this machine storage is a local disk and the CPU is the scarce resource (2 cores for 2 ranks): "
             "hashing costs the same CPU whether it happens while writing or on a read back, so the time is "
             "close either way; what hashing while writing saves is the second pass over the bytes, the I/O that a "
             "shared filesystem under every node of a job pays for. "
             "Python + torch + deepspeed + transformers imported alone: "
             f"{e['python_torch_deepspeed_import_gb']:.2f} GB. "
             f"Measured save bandwidth (the metrics' `save_gbps`): {', '.join(f'{x:.2f}' for x in s['gbps'])} GB/s "
             f"synchronous, {', '.join(f'{x:.2f}' for x in a['gbps'])} GB/s in the background (local disk, shared "
             "with the training processes' CPU).", END]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(REPO / "runs" / "bench_io"))
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS.md"))
    ap.add_argument("--quick", action="store_true", help="a small model, for a smoke run (results not written)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report = measure(work, args.quick)
    (work / "report.json").write_text(json.dumps(report, indent=2))
    text = markdown(report, "python -m bench.io")
    print(text)
    if not args.quick:
        results = Path(args.results)
        old = results.read_text() if results.exists() else ""
        if START in old:
            new = old.split(START)[0] + text + old.split(END, 1)[1]
        else:
            new = old.rstrip() + "\n\n" + text + "\n"
        results.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
