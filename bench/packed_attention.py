r"""Packed rows on sdpa: shardtune's one-call-per-sample attention against transformers' own packing masks.

    .venv/bin/python -m bench.packed_attention            # ~8 min on 2 cores -> bench/RESULTS.md
    .venv/bin/python -m bench.packed_attention --quick    # a smoke run: 512 and 1,024 tokens, ~30 s

Two contenders run the forward and backward of the same random-weight Llama decoder (hidden 512, 2 layers,
8 heads, 2 kv heads, MLP 1376, fp32) over one row of `seq_len` tokens packed with 8 samples of equal length:

  masks        what a Hugging Face user packing for sdpa runs: position ids that restart at every sample and
               no attention mask (DataCollatorWithFlattening's inputs), from which transformers builds a row ×
               row mask for every forward
  per_sample   shardtune's kernel for such runs (trainer/separation.py: one causal sdpa call per sample)

The loss is the mean square of the last hidden state, so the LM head (whose memory bench.long_context
measures) does not hide the attention's. Each (contender, seq_len) runs in its own process through
bench/_max_rss.py, which reports the largest RSS of the process from resource.getrusage(RUSAGE_CHILDREN), with
glibc returning every block over 64 KiB when freed (RSS follows the bytes allocated). Reported: that peak, the
median time of steps 2-3, and the loss (the two must agree: the same samples, kept apart two ways).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench._runner import PYTHON, REPO, machine_words, wait_for_quiet, write_section

RESULTS = REPO / "bench" / "RESULTS.md"
START, END = "<!-- packed-attention:start -->", "<!-- packed-attention:end -->"
CONTENDERS = ("masks", "per_sample")
SAMPLES_PER_ROW = 8
STEPS = 3
MODEL = dict(vocab_size=1000, hidden_size=512, intermediate_size=1376, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=65536)
ALLOCATED_LIKE = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_case(contender: str, seq_len: int, sample: int) -> dict:
    """One process: STEPS forward/backward passes; the step times and the loss."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    from trainer import separation

    torch.manual_seed(0)
    attention = "sdpa"
    if contender == "per_sample":
        separation.register_packed_attention()
        attention = separation.PACKED_ATTENTION
    model = LlamaModel._from_config(LlamaConfig(**MODEL), attn_implementation=attention)
    ids = torch.randint(0, MODEL["vocab_size"], (1, seq_len))
    positions = (torch.arange(seq_len) % sample)[None]
    times, loss = [], None
    for _ in range(STEPS):
        start = time.perf_counter()
        hidden = model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
        loss = hidden.float().pow(2).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times[1:]), "loss": float(loss)}


def measure(contender: str, seq_len: int, sample: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        rss, out = Path(tmp) / "rss.json", Path(tmp) / "case.json"
        env = {**os.environ, **ALLOCATED_LIKE, "PYTHONPATH": str(REPO)}
        subprocess.run([str(PYTHON), "-m", "bench._max_rss", str(rss), str(PYTHON), "-m", "bench.packed_attention",
                        "--case", contender, str(seq_len), str(sample), str(out)], check=True, env=env, cwd=REPO)
        return {**json.loads(out.read_text()), "max_rss_gb": json.loads(rss.read_text())["max_rss_bytes"] / 1e9}


def table(rows: list[dict]) -> str:
    lines = ["| seq_len | samples per row | contender | peak RSS (GB) | step (s) | loss |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seq_len']:,} | {r['seq_len'] // r['sample']} | {r['contender']} | {r['max_rss_gb']:.2f} "
                     f"| {r['step_s']:.2f} | {r['loss']:.6f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--case", nargs=4, metavar=("CONTENDER", "SEQ_LEN", "SAMPLE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        contender, seq_len, sample, out = args.case
        Path(out).write_text(json.dumps(run_case(contender, int(seq_len), int(sample))))
        return
    lengths = [512, 1024] if args.quick else [256, 512, 1024, 2048, 4096, 8192, 16384]
    wait_for_quiet(1.0, 300, print)
    rows = []
    for seq_len in lengths:
        sample = seq_len // SAMPLES_PER_ROW
        for contender in CONTENDERS:
            rows.append({"contender": contender, "seq_len": seq_len, "sample": sample,
                         **measure(contender, seq_len, sample)})
            print(json.dumps(rows[-1]), flush=True)
    text = (f"Measured {_dt.date.today()} on {machine_words()}: `python -m bench.packed_attention"
            f"{' --quick' if args.quick else ''}`\n\n{table(rows)}")
    print(text)
    if not args.quick:
        write_section(RESULTS, "Packed attention", START, END, text)


if __name__ == "__main__":
    main()
