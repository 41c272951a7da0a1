r"""gpt-oss at long context: transformers' eager attention against shardtune's sink kernel, peak memory by length.

    .venv/bin/python -m bench.sink_attention            # the full run (~15 min on 2 cores) -> bench/RESULTS.md
    .venv/bin/python -m bench.sink_attention --quick    # a smoke run: lengths 512..1024, ~2 min

A random gpt-oss-shaped model (hidden 512, 16 query heads of 64 over 4 kv heads, one sliding-window layer of 128
tokens and one full layer, 4 experts of width 256 with top-2, the repository's 512-token BPE) trains for --steps
steps on one CPU rank, fp32, ZeRO-2, activation checkpointing on, one sample per row of exactly seq_len tokens,
every token trained. Two contenders, the same run config but `model.attn_implementation`:

  eager   transformers' eager attention: what the Hugging Face Trainer runs for gpt-oss (transformers has no sdpa
          path for its sinks), and what shardtune ran before trainer/sink_attention.py
  auto    shardtune's choice: the sink kernel (trainer/sink_attention.py)

For each, seq_len doubles from --start while a run stays under --cap_gb (the bench stops a run the moment any
of its processes goes over) and below --max_len. Peak memory is the largest RSS of any process of the run, from
resource.getrusage(RUSAGE_CHILDREN) after it (bench/_max_rss.py), with glibc's default heap, as a user runs it.
Beside it: shardtune's planner estimate per process (`shardtune plan`), and its activations term.
Results go to the `## gpt-oss attention at long context` section of bench/RESULTS.md (between markers).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import shutil
import sys
import time
from pathlib import Path

from bench._runner import REPO, capped_run, doubling_search, machine_words, search_parser, write_section
from bench.long_context import env, plan_json, shardtune_bin, text_rows_config, write_text_rows
from launcher.contract.run_dir import RunDir

RESULTS = REPO / "bench" / "RESULTS.md"
START, END = "<!-- sink-attention:start -->", "<!-- sink-attention:end -->"
CONTENDERS = {"eager": "transformers' eager attention (the HF Trainer's for gpt-oss; shardtune's before)",
              "auto": "shardtune's sink kernel (`auto`)"}
ROWS_PER_STEP = 2


def make_model(out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from examples.tiny_model import make_tokenizer

    if (out / "config.json").exists():
        return out
    tokenizer = make_tokenizer()
    config = AutoConfig.for_model(
        "gpt_oss", vocab_size=len(tokenizer), hidden_size=512, num_hidden_layers=2, num_attention_heads=16,
        num_key_value_heads=4, head_dim=64, intermediate_size=256, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=128, layer_types=["sliding_attention", "full_attention"], max_position_embeddings=1 << 17,
        tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None)
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def run_config(work: Path, model: Path, data: Path, name: str, seq_len: int, steps: int) -> Path:
    train = {"max_steps": steps, "micro_batch_size": 1, "grad_accum_steps": ROWS_PER_STEP, "precision": "fp32",
             "compile": False}
    return text_rows_config(work, f"{name}-{seq_len}", model, data, seq_len, train, 1, {"attn_implementation": name})


def measure(work: Path, model: Path, data: Path, name: str, seq_len: int, args) -> dict:
    config = run_config(work, model, data, name, seq_len, args.steps)
    out = work / "runs" / f"{name}-{seq_len}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    plan = plan_json(config)
    memory = plan.get("memory") or {}
    result = {"name": name, "seq_len": seq_len, "estimate_gb": memory.get("total_gb"),
              "activations_gb": round((memory.get("device_gb") or {}).get("activations", 0), 3),
              **capped_run([shardtune_bin(), "launch", str(config)], out, env(), args.timeout, args.cap_gb)}
    if result["ok"]:
        ends = RunDir(out / "run").step_end_times()
        result["step_s"] = [round(b - a, 1) for a, b in zip(ends, ends[1:])]
        log = (out / "log.txt").read_text()
        result["kernel"] = next((line.split("attention: ", 1)[1].split(";")[0] for line in log.splitlines()
                                 if "attention: " in line), None)
    run = RunDir(out / "run")
    for written in (run.checkpoints, run.final):
        shutil.rmtree(written, ignore_errors=True)
    return result


def search(work: Path, model: Path, data: Path, name: str, args, log) -> list[dict]:
    return doubling_search(lambda seq_len: measure(work, model, data, name, seq_len, args), args.start, args.max_len,
                           log, name)


def format_section(runs: dict[str, list[dict]], command: str, info: str, args) -> str:
    lines = [info, "", "```", command, "```", "",
             "| contender | seq_len | result | kernel | max RSS, any process (GB) | planner (GB/process) | "
             "planner's activations (GB) | step times (s) |", "|---|---|---|---|---|---|---|---|"]
    for name, rs in runs.items():
        for r in rs:
            lines.append(f"| {CONTENDERS[name]} | {r['seq_len']:,} | {'ok' if r['ok'] else r['why']} | "
                         f"{r.get('kernel') or '-'} | {r.get('max_rss_gb', '-')} | {r['estimate_gb'] or '-'} | "
                         f"{r['activations_gb']} | {r.get('step_s', '-')} |")
    lines.append("")
    ok = {name: {r["seq_len"]: r for r in rs if r["ok"]} for name, rs in runs.items()}
    longest = {name: max(found) if found else None for name, found in ok.items()}
    lines.append(f"- Longest seq_len under the {args.cap_gb:g} GB cap (search limit {args.max_len:,}): "
                 + ", ".join(f"{name} {v:,}" if v else f"{name} none" for name, v in longest.items()) + ".")
    for name, found in ok.items():
        lengths = sorted(found)
        growth = [f"{b:,}/{a:,}: {found[b]['max_rss_gb'] / found[a]['max_rss_gb']:.2f} ×"
                  for a, b in zip(lengths, lengths[1:]) if found[a].get("max_rss_gb") and found[b].get("max_rss_gb")]
        if growth:
            lines.append(f"- {name}: peak RSS growth per doubling: {', '.join(growth)}.")
        errors = [f"{s:,}: {found[s]['estimate_gb'] / found[s]['max_rss_gb'] - 1:+.0%}" for s in lengths
                  if found[s].get("estimate_gb") and found[s].get("max_rss_gb")]
        if errors:
            lines.append(f"- {name}: planner estimate vs measured: {', '.join(errors)}.")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = search_parser(__doc__.split("\n\n")[0], "smoke run: lengths 512..1024", cap_gb=8.0, steps=2)
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    p.add_argument("--work", type=Path, default=Path("/tmp/shardtune-bench-sink-attention"))
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--no_results", action="store_true", help="print the section instead of writing it")
    args = p.parse_args(argv)
    if args.quick:
        args.start, args.max_len = 512, 1024
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    log = lambda m: print(m, flush=True)  # noqa: E731
    started = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    model = make_model(args.work / "model")
    data = write_text_rows(args.work / "rows.jsonl", rows=4 * ROWS_PER_STEP * args.steps,
                           words=int(args.max_len * 1.2))
    runs = {name: search(args.work, model, data, name, args, log) for name in args.contenders}
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    info = (f"Measured {stamp} on {machine_words()}; {(time.time() - started) / 60:.1f} min in all. "
            "Model and method: the module docstring of bench/sink_attention.py.")
    command = "python -m bench.sink_attention " + " ".join(argv if argv is not None else sys.argv[1:])
    section = format_section(runs, command.strip(), info, args)
    if args.no_results:
        print(section)
    else:
        write_section(args.results, "gpt-oss attention at long context", START, END, section)
        log(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
