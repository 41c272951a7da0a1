"""Data preparation benchmark: preprocessing throughput and packing efficiency.

    .venv/bin/python -m bench.data_prep                    # 100k synthetic chat rows, 2 workers
    .venv/bin/python -m bench.data_prep --rows 20000 --workers 1 2 --tokenizer tiny
    .venv/bin/python -m bench.data_prep --memory 50000 200000 --tokenizer tiny   # peak RSS against size only
    .venv/bin/python -m bench.data_prep --pack-scaling 200000 800000 3200000 12800000   # packing alone, by size

Part 1 runs the real `prepare` (read -> datasets.map with num_proc -> masks -> pack -> cache) on
synthetic multi-turn chat rows whose lengths are shaped like instruction data. Part 2 packs
log-normal sample lengths (median ~250 tokens, tail clipped at 2,048) into 2,048 and 4,096 token
sequences, against one-sample-per-sequence padding. Timings on a shared machine are noisy: the CPU
seconds (this process and its workers) and the load average before each run say how much of the
machine the run really had. --memory N1 N2 ...: `shardtune prepare` on N rows each, in a fresh process
under bench._max_rss (the largest RSS of any of its processes, as the kernel counts it), and what the
peak grows by per token between the sizes: `prepare` holds the tokenized set in memory, and that growth
says how much RAM the host that prepares a dataset of a given size needs. --pack-scaling N1 N2 ...:
best-fit decreasing alone on N log-normal lengths each, in a fresh process (seconds, and the peak RSS it adds to
the lengths already in memory): how packing's cost grows with the number of samples.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from bench._runner import REPO, machine_words, own_cpu_seconds
from examples.tiny_model import WORDS
from launcher.contract.config import load_config
from trainer.data.packing import best_fit_decreasing
from trainer.data.prepare import prepare

SMOLLM2 = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"


def words(rng: random.Random, median: float, sigma: float, cap: int) -> str:
    n = max(1, min(cap, int(rng.lognormvariate(np.log(median), sigma))))
    out = rng.choices(WORDS, k=n)
    for i in range(0, n, rng.randint(8, 20)):
        number = f" {rng.randint(0, 9999)}" if rng.random() < 0.2 else ""
        out[i] = out[i] + rng.choice([".", ",", "?", ":", ""]) + number
    return " ".join(out)


def synthetic_chat(n: int, seed: int = 0) -> list[dict]:
    """Chat rows sized like instruction data: ~30% with a system prompt, 1-4 turns, long-tailed answers."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        msgs = [{"role": "system", "content": words(rng, 12, 0.5, 60)}] if rng.random() < 0.3 else []
        for _ in range(min(4, 1 + int(rng.expovariate(1.5)))):
            msgs.append({"role": "user", "content": words(rng, 25, 0.9, 600)})
            msgs.append({"role": "assistant", "content": words(rng, 90, 0.9, 1500)})
        rows.append({"messages": msgs})
    return rows


def pick_tokenizer(choice: str, work: Path) -> tuple[str, str]:
    """(directory, description): SmolLM2's real tokenizer when converted locally, else the tiny test one."""
    if choice == "auto":
        choice = "smollm2" if (SMOLLM2 / "tokenizer.json").exists() else "tiny"
    if choice == "smollm2":
        return str(SMOLLM2), f"SmolLM2-135M-Instruct (49,152-token BPE, its own chat template) from {SMOLLM2}"
    if choice == "tiny":
        from transformers import LlamaConfig

        from examples.tiny_model import make_tokenizer

        out = work / "tiny-tokenizer"
        make_tokenizer().save_pretrained(out)
        LlamaConfig(vocab_size=512).save_pretrained(out)  # `shardtune prepare` checks ids against a model's vocabulary
        return str(out), "examples.tiny_model.make_tokenizer() (512-token byte-level BPE, ChatML)"
    return choice, choice


def bench_config(rows_path: Path, tokenizer: str, workers: int, seq_len: int, work: Path) -> Path:
    """A run config that prepares rows_path with the tokenizer into a fresh cache (the tokenizer's directory
    stands in for the model)."""
    cache = work / f"cache-{workers}"
    shutil.rmtree(cache, ignore_errors=True)
    raw = {"model": {"name_or_path": tokenizer},
           "data": {"path": str(rows_path), "format": "messages", "seq_len": seq_len, "num_proc": workers,
                    "cache_dir": str(cache), "on_bad_row": "skip"},
           "train": {"max_steps": 1, "micro_batch_size": 1, "grad_accum_steps": 1, "lr": 1e-5, "seed": 0},
           "launch": {"nodes": 1, "procs_per_node": 1}, "output_dir": str(work / "run")}
    cfg_path = work / "bench.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    return cfg_path


def throughput(rows_path: Path, tokenizer: str, workers: int, seq_len: int, work: Path) -> dict:
    cfg = load_config(bench_config(rows_path, tokenizer, workers, seq_len, work))
    load = os.getloadavg()[0]
    cpu, started = own_cpu_seconds(), time.perf_counter()
    s = prepare(cfg, log=lambda _: None).summary
    wall, cpu = time.perf_counter() - started, own_cpu_seconds() - cpu
    return {"workers": workers, "cpu": cpu, "load": load, "rows": s["rows_read"], "seconds": wall,
            "rows_per_s": s["rows_read"] / wall, "tokens_per_s": s["tokens"] / wall, "tokens": s["tokens"],
            "kept": s["rows_kept"], "skipped": s["rows_skipped"], "efficiency": s["packing_efficiency"],
            "sequences": s["sequences"]}


def peak_memory(sizes: list[int], tokenizer: str, workers: int, seq_len: int, work: Path) -> list[dict]:
    """Peak RSS of `shardtune prepare` on the first N synthetic rows, for each N, each in a fresh process tree."""
    out = []
    rows = synthetic_chat(max(sizes))
    for n in sorted(sizes):
        rows_path = work / f"chat-{n}.jsonl"
        with open(rows_path, "w") as fh:
            fh.writelines(json.dumps(row) + "\n" for row in rows[:n])
        cfg = bench_config(rows_path, tokenizer, workers, seq_len, work)
        report, started = work / "rss.json", time.perf_counter()
        shardtune = str(Path(sys.executable).parent / "shardtune")
        done = subprocess.run([sys.executable, "-m", "bench._max_rss", str(report), shardtune, "prepare", str(cfg),
                               "--json"], capture_output=True, text=True, check=True)
        summary, rss = json.loads(done.stdout), json.loads(report.read_text())["max_rss_bytes"]
        out.append({"rows": n, "text_bytes": rows_path.stat().st_size, "tokens": summary["tokens"],
                    "peak_rss": rss, "seconds": time.perf_counter() - started})
    return out


def packing_table(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(250), 1.0, n), 16, 2048).astype(np.int64)
    out = []
    for seq_len in (2048, 4096):
        started = time.perf_counter()
        groups = best_fit_decreasing(lengths, seq_len)
        seconds = time.perf_counter() - started
        out.append({"seq_len": seq_len, "samples": n, "median": int(np.median(lengths)),
                    "p99": int(np.percentile(lengths, 99)), "sequences": len(groups),
                    "packed": lengths.sum() / (len(groups) * seq_len), "unpacked": lengths.mean() / seq_len,
                    "seconds": seconds})
    return out


PACK_ONE = """
import json, os, resource, sys, time
import numpy as np
from trainer.data.packing import best_fit_decreasing
n, seq_len = int(sys.argv[1]), int(sys.argv[2])
lengths = np.clip(np.random.default_rng(0).lognormal(np.log(250), 1.0, n), 16, 2048).astype(np.int64)
with open("/proc/self/statm") as fh:
    before = int(fh.read().split()[1]) * resource.getpagesize()
read, write = os.pipe()
if os.fork() == 0:  # a child's peak RSS starts from what it shares at the fork, not from the imports' peak
    started = time.perf_counter()
    groups = best_fit_decreasing(lengths, seq_len)
    os.write(write, json.dumps([len(groups), time.perf_counter() - started]).encode())
    os._exit(0)
os.close(write)
sequences, seconds = json.loads(os.read(read, 1 << 16))
_, _, usage = os.wait4(-1, 0)
print(json.dumps({"samples": n, "sequences": sequences, "seconds": seconds,
                  "added_bytes": usage.ru_maxrss * 1024 - before}))
"""


def packing_scaling(sizes: list[int], seq_len: int) -> None:
    """Time and memory of packing alone against the number of samples, each size in a fresh process."""
    print(f"# best-fit decreasing against size ({platform.node()}, {machine_words()}, "
          f"python {platform.python_version()}; log-normal lengths, median 250, clipped 16..2048; seq_len {seq_len})")
    print("| samples | sequences | packing s | µs per sample | peak RSS added, MB | bytes per sample |")
    print("|---|---|---|---|---|---|")
    for n in sizes:
        r = json.loads(subprocess.run([sys.executable, "-c", PACK_ONE, str(n), str(seq_len)], cwd=REPO,
                                      capture_output=True, text=True, check=True).stdout)
        print(f"| {n:,} | {r['sequences']:,} | {r['seconds']:.2f} | {r['seconds'] / n * 1e6:.2f} | "
              f"{r['added_bytes'] / 1e6:.0f} | {r['added_bytes'] / n:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--tokenizer", default="auto",
                        help="auto (SmolLM2 if converted, else tiny), smollm2, tiny, or a path")
    parser.add_argument("--pack-samples", type=int, default=200_000)
    parser.add_argument("--memory", type=int, nargs="+", metavar="ROWS",
                        help="only measure prepare's peak RSS at these row counts")
    parser.add_argument("--pack-scaling", type=int, nargs="+", metavar="SAMPLES",
                        help="only time best-fit decreasing on these numbers of samples")
    args = parser.parse_args()
    if args.pack_scaling:
        packing_scaling(args.pack_scaling, args.seq_len)
        return
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    work = Path(tempfile.mkdtemp(prefix="shardtune-bench-data-"))
    try:
        tokenizer, described = pick_tokenizer(args.tokenizer, work)
        if args.memory:
            memory_table(args, tokenizer, described, work)
            return
        rows_path = work / "chat.jsonl"
        started = time.perf_counter()
        with open(rows_path, "w") as fh:
            for row in synthetic_chat(args.rows):
                fh.write(json.dumps(row) + "\n")
        print(f"# data preparation benchmark ({platform.node()}, {machine_words()}, "
              f"python {platform.python_version()})")
        print(f"tokenizer: {described}")
        print(f"synthetic rows: {args.rows:,} multi-turn chats written in {time.perf_counter() - started:.1f} s "
              f"({rows_path.stat().st_size / 1e6:.0f} MB)\n")
        print(f"## preprocessing: prepare() end to end, seq_len {args.seq_len}, cold cache")
        print("| workers | rows | wall s | rows/s | tokens/s | CPU s | load before | tokens | kept | skipped "
              "| sequences | packing eff. |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        warm = work / "warm.jsonl"  # imports, tokenizer load and template compilation, outside the timings
        warm.write_text("".join(json.dumps(row) + "\n" for row in synthetic_chat(200, seed=1)))
        throughput(warm, tokenizer, 1, args.seq_len, work)
        for workers in args.workers:
            r = throughput(rows_path, tokenizer, workers, args.seq_len, work)
            print(f"| {workers} | {r['rows']:,} | {r['seconds']:.1f} | {r['rows_per_s']:,.0f} | "
                  f"{r['tokens_per_s']:,.0f} | {r['cpu']:.0f} | {r['load']:.1f} | {r['tokens']:,} | {r['kept']:,} | "
                  f"{json.dumps(r['skipped'])} | {r['sequences']:,} | {r['efficiency']:.4f} |", flush=True)
        print(f"\n## packing: best-fit decreasing, {args.pack_samples:,} log-normal lengths "
              "(median 250, clipped 16..2048)")
        print("| seq_len | median | p99 | sequences | packed eff. | one sample per sequence | packing s |")
        print("|---|---|---|---|---|---|---|")
        for r in packing_table(args.pack_samples):
            print(f"| {r['seq_len']} | {r['median']} | {r['p99']} | {r['sequences']:,} | {r['packed']:.4f} | "
                  f"{r['unpacked']:.4f} | {r['seconds']:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def memory_table(args: argparse.Namespace, tokenizer: str, described: str, work: Path) -> None:
    print(f"# prepare's peak memory ({platform.node()}, {machine_words()}, python {platform.python_version()}; "
          f"tokenizer: {described}; seq_len {args.seq_len}, {args.workers[0]} worker(s))")
    print("| rows | jsonl MB | tokens | peak RSS GB | wall s | growth from the row above, bytes per token |")
    print("|---|---|---|---|---|---|")
    previous = None
    for r in peak_memory(args.memory, tokenizer, args.workers[0], args.seq_len, work):
        growth = "" if previous is None else \
            f"{(r['peak_rss'] - previous['peak_rss']) / (r['tokens'] - previous['tokens']):.1f}"
        print(f"| {r['rows']:,} | {r['text_bytes'] / 1e6:.0f} | {r['tokens']:,} | {r['peak_rss'] / 1e9:.2f} | "
              f"{r['seconds']:.1f} | {growth} |", flush=True)
        previous = r


if __name__ == "__main__":
    main()
