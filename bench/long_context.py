r"""Long context: the longest sequence that trains under a per-process memory cap, and what it costs.

    .venv/bin/python -m bench.long_context            # the full run (~35 min on 2 cores) -> bench/RESULTS.md
    .venv/bin/python -m bench.long_context --quick    # a smoke run: small cap and lengths, ~3 min

Four contenders train the same Llama-shaped model (hidden 256, 4 layers, 8 heads, MLP 688, a 32,000-token
vocabulary: the issue's example) on 2 CPU ranks (gloo), ZeRO-2, fp32, activation checkpointing on, one
sample per row of exactly seq_len tokens, every token trained (long-trace SFT), 2 rows per optimizer step:

  sp2_chunked   shardtune, train.sequence_parallel 2, chunked loss (each rank holds half of every row)
  sp1_chunked   shardtune, sequence_parallel 1, chunked loss (each rank holds its own row)
  sp1_full      shardtune, sequence_parallel 1, full-logits loss
  trainer       the Hugging Face Trainer with shardtune's DeepSpeed config for sp1 (bench.hf_trainer,
                gradient_checkpointing=True), on the same token rows

For each, seq_len doubles from --start while a 3-step run trains under --cap_gb: the bench watches every
process of the run (VmHWM in /proc) and stops the run the moment one goes over the cap. Independently of
that and of shardtune's own metrics, every run goes through bench/_max_rss.py, which reports the largest
RSS of any of its processes from resource.getrusage(RUSAGE_CHILDREN) after the run. The search stops at
--max_len (the attention's cost grows with seq_len², so lengths beyond it take too long on 2 cores).

Then, at the longest seq_len every contender reached (the Trainer's, usually): peak RSS per contender,
shardtune's planner estimate (`shardtune plan`, per process) against the measured peak for the shardtune runs,
and trained tokens/s of sp2_chunked against the Trainer from runs of their own (SPEED: --speed_steps steps,
the first not timed, alternating for --speed_repeats rounds).
Results go to the `## Long context` section of bench/RESULTS.md (between markers; text after them stays).

The vocabulary is 32,000 but the tokenizer is the repository's tiny BPE (512 tokens; no 32k tokenizer is
on this machine): the logits, the head and the embedding have their full size, the ids just stay below 512.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

from bench._runner import REPO, capped_run, doubling_search, machine_words, search_parser, write_section
from examples.tiny_model import WORDS
from launcher.contract.run_dir import RunDir

RESULTS = REPO / "bench" / "RESULTS.md"
START, END = "<!-- long-context:start -->", "<!-- long-context:end -->"
CONTENDERS = ("sp2_chunked", "sp1_chunked", "sp1_full", "trainer")
SETTINGS = {"sp2_chunked": {"sequence_parallel": 2, "chunked_loss": True},
            "sp1_chunked": {"sequence_parallel": 1, "chunked_loss": True},
            "sp1_full": {"sequence_parallel": 1, "chunked_loss": False}}
ROWS_PER_STEP = 2
WORLD = 2


ALLOCATED_LIKE = {"MALLOC_MMAP_THRESHOLD_": "65536"}
"""glibc maps every block over 64 KiB on its own and unmaps it when freed: RSS follows the bytes allocated."""


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    out = dict(os.environ)
    out.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(extra or {}))
    out.pop("WANDB_MODE", None)
    return out


def make_model(out: Path, vocab: int) -> Path:
    """The issue's Llama (hidden 256, 4 layers, 8 heads) with a 32k vocabulary and the tiny BPE tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from examples.tiny_model import make_tokenizer

    if (out / "config.json").exists():
        return out
    tokenizer = make_tokenizer()
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1 << 17,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_text_rows(path: Path, rows: int, words: int) -> Path:
    """Documents longer than any seq_len tried; `data.truncation: truncate` cuts each to exactly seq_len."""
    rng = random.Random(0)
    with open(path, "w") as fh:
        for _ in range(rows):
            fh.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")
    return path


def run_config(work: Path, model: Path, data: Path, name: str, seq_len: int, steps: int, tag: str = "",
               micro: int = 1) -> Path:
    """The run's config: ROWS_PER_STEP rows per optimizer step, `micro` rows per micro-batch (accumulating the rest)."""
    settings = SETTINGS.get(name, SETTINGS["sp1_full"])
    sp = settings["sequence_parallel"]
    train = {"max_steps": steps, "micro_batch_size": micro, "grad_accum_steps": ROWS_PER_STEP * sp // WORLD // micro,
             **settings}
    return text_rows_config(work, f"{name}-{seq_len}{tag}", model, data, seq_len, train, WORLD)


def text_rows_config(work: Path, label: str, model: Path, data: Path, seq_len: int, train: dict, world: int,
                     model_settings: Optional[dict] = None) -> Path:
    """A long-context bench run's config, work/configs/LABEL.yaml: one document per row cut to exactly seq_len
    tokens, every token trained, ZeRO-2 on `world` CPU ranks, activation checkpointing, `train` on top."""
    cfg = {
        "model": {"name_or_path": str(model), **(model_settings or {})},
        "data": {"path": str(data), "format": "text", "seq_len": seq_len, "packing": False,
                 "truncation": "truncate", "cache_dir": str(work / "data-cache")},
        "train": {"lr": 1e-5, "seed": 0, "activation_checkpointing": True, "log_every": 1, **train},
        "zero": {"stage": 2},
        "launch": {"nodes": 1, "procs_per_node": world, "device": "cpu"},
        "wandb": {"mode": "disabled"},
        "output_dir": str(work / "runs" / label / "run"),
    }
    path = work / "configs" / f"{label}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def shardtune_bin() -> str:
    return str(Path(sys.executable).parent / "shardtune")


def plan_json(config: Path) -> dict:
    proc = subprocess.run([shardtune_bin(), "plan", str(config), "--json"], capture_output=True, text=True,
                          env=env(), cwd=REPO, check=True)
    return json.loads(proc.stdout)


def trainer_rows(config: Path, out: Path) -> Path:
    """The exact token rows shardtune trains on (its prepared data), for the Trainer: every label trained."""
    from launcher.contract.config import load_config
    from trainer.data.prepare import prepare

    data = prepare(load_config(config), log=lambda _m: None).train
    rows = []
    for k in range(len(data)):
        ids, _labels, _lens = data.sequence(k)
        ids = [int(x) for x in ids]
        rows.append({"idx": k, "input_ids": ids, "labels": ids})
    out.write_text(json.dumps(rows))
    return out


def measure(work: Path, model: Path, data: Path, name: str, seq_len: int, args,
            allocator: dict[str, str] | None = None, micro: int = 1, steps: int | None = None, tag: str = "") -> dict:
    """One short run under the cap: ok or over the cap, the largest RSS of any process, the step times."""
    tag += "-alloc" if allocator else ""
    config = run_config(work, model, data, name, seq_len, steps or args.steps, tag, micro)
    out = work / "runs" / f"{name}-{seq_len}{tag}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    plan = plan_json(config)
    if name == "trainer":
        ds = out / "trainer_deepspeed.json"
        ds.write_text(json.dumps(plan["deepspeed"]))
        rows = trainer_rows(config, out / "rows.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
                   "-m", "bench.hf_trainer", "--model", str(model), "--ds_config", str(ds),
                   "--data", str(rows), "--grad_accum", "1", "--micro", "1", "--steps", str(steps or args.steps),
                   "--lr", "1e-5", "--gradient_checkpointing", "--out", str(out / "result.json")]
    else:
        command = [shardtune_bin(), "launch", str(config)]
    result = {"name": name, "seq_len": seq_len, "micro": micro,
              "estimate_gb": (plan.get("memory") or {}).get("total_gb"),
              **capped_run(command, out, env(allocator), args.timeout, args.cap_gb)}
    if result["ok"]:
        ends = step_end_times(name, out)
        trained = ROWS_PER_STEP * (seq_len - 1)  # every token of a row but the first is a target
        if len(ends) >= 3:
            result["tokens_per_s"] = round(trained * (len(ends) - 1) / (ends[-1] - ends[0]), 1)
        result["step_s"] = [round(b - a, 2) for a, b in zip(ends, ends[1:])]
    for sub in ("checkpoints", "final"):
        shutil.rmtree(out / "run" / sub, ignore_errors=True)
    return result


def step_end_times(name: str, out: Path) -> list[float]:
    if name == "trainer":
        return json.loads((out / "result.json.rank0").read_text())["step_end_times"]
    return RunDir(out / "run").step_end_times()


def search(work: Path, model: Path, data: Path, name: str, args, log) -> list[dict]:
    """Double seq_len from --start while the run stays under the cap (and below --max_len)."""
    return doubling_search(lambda seq_len: measure(work, model, data, name, seq_len, args), args.start, args.max_len,
                           log, name)


SPEED = (("trainer", 1), ("sp2_chunked", 2), ("sp2_chunked", 1))
"""The throughput runs at the common seq_len: (contender, rows per micro-batch). SP=2 with 2 rows per micro-batch
holds as many tokens per rank as the data-parallel runs' one row (2 halves of 2 rows), takes one micro-batch per
step as they do, and so reduces its ZeRO-2 gradients once per step as they do; with 1 row, as in the search, it
takes two micro-batches and two reductions per step."""


def speed_label(name: str, micro: int) -> str:
    return name if name == "trainer" else f"{name}, {micro} row{'s' if micro > 1 else ''} per micro-batch"


def speed(work: Path, model: Path, data: Path, seq_len: int, args, log) -> dict[str, list[dict]]:
    """Tokens/s at `seq_len`: --speed_steps steps per run, the contenders alternating, --speed_repeats rounds."""
    runs: dict[str, list[dict]] = {speed_label(n, m): [] for n, m in SPEED}
    for repeat in range(args.speed_repeats):
        for name, micro in SPEED:
            r = measure(work, model, data, name, seq_len, args, micro=micro, steps=args.speed_steps,
                        tag=f"-speed-m{micro}-r{repeat}")
            runs[speed_label(name, micro)].append(r)
            log(f"  speed {speed_label(name, micro)} at {seq_len:,}, repeat {repeat + 1}: "
                f"{r.get('tokens_per_s', r.get('why'))} tokens/s")
    return runs


def pooled_rate(results: list[dict]) -> float | None:
    rates = [r["tokens_per_s"] for r in results if r.get("tokens_per_s")]
    return sum(rates) / len(rates) if rates and len(rates) == len(results) else None


def longest(results: list[dict]) -> int | None:
    ok = [r["seq_len"] for r in results if r["ok"]]
    return max(ok) if ok else None


def build_report(found: dict[str, list[dict]], args, allocated: dict[str, dict] | None = None,
                 speeds: dict[str, list[dict]] | None = None) -> dict:
    longest_of = {name: longest(rs) for name, rs in found.items()}
    reached = [v for v in longest_of.values() if v]
    common = min(reached) if len(reached) == len(found) else None
    at = {name: next((r for r in rs if r["seq_len"] == common), None) for name, rs in found.items()}
    stopped = {name: (rs[-1]["ok"] and rs[-1]["seq_len"] * 2 > args.max_len) for name, rs in found.items()}
    report = {"longest": longest_of, "search_limit_reached": stopped, "common_seq_len": common,
              "at_common": at, "cap_gb": args.cap_gb, "runs": found, "allocated_like": allocated or {},
              "speed": speeds or {}}
    goals = []
    sp2, trainer = longest_of.get("sp2_chunked"), longest_of.get("trainer")
    if sp2 and trainer:
        limit = " (search limit: at least)" if stopped.get("sp2_chunked") else ""
        goals.append(("longest seq_len, shardtune SP=2 + chunked >= 4 x the Trainer's", sp2 / trainer >= 4,
                      f"{sp2:,}{limit} / {trainer:,} = {sp2 / trainer:.1f} x"))
    even, trainer_runs = (speeds or {}).get(speed_label("sp2_chunked", 2)), (speeds or {}).get("trainer")
    a, b = (pooled_rate(even), pooled_rate(trainer_runs)) if even and trainer_runs else (None, None)
    if a and b:
        by_repeat = ", ".join(f"{x['tokens_per_s'] / y['tokens_per_s']:.2f}" for x, y in zip(even, trainer_runs))
        goals.append((f"tokens/s at seq_len {common:,}, SP=2 (as many tokens per rank and micro-batch as the "
                       "Trainer) vs the Trainer >= 1.0 x", a / b >= 1.0,
                      f"{a:,.0f} / {b:,.0f} = {a / b:.2f} x (by repeat: {by_repeat})"))
    for name in ("sp2_chunked", "sp1_chunked", "sp1_full"):
        r = at.get(name)
        if r and r.get("estimate_gb") and r.get("max_rss_gb"):
            err = r["estimate_gb"] / r["max_rss_gb"] - 1
            alloc = (allocated or {}).get(name) or {}
            also = (f"; with MALLOC_MMAP_THRESHOLD_=65536 the same run peaks at {alloc['max_rss_gb']:.2f} GB "
                    f"({r['estimate_gb'] / alloc['max_rss_gb'] - 1:+.1%})") if alloc.get("max_rss_gb") else ""
            goals.append((f"planner estimate vs measured peak, {name} at {common:,}, within 15 %", abs(err) <= 0.15,
                          f"{r['estimate_gb']:.2f} GB vs {r['max_rss_gb']:.2f} GB ({err:+.1%}){also}"))
    report["goals"] = goals
    return report


def format_section(report: dict, command: str, info: str) -> str:
    lines = [info, "", "```", command, "```", ""]
    lines += ["| contender | longest seq_len under the cap | peak RSS at the common seq_len (GB, any process) | "
              "planner estimate (GB/process) | trained tokens/s there |", "|---|---|---|---|---|"]
    common = report["common_seq_len"]
    for name in CONTENDERS:
        if name not in report["runs"]:
            continue
        best = report["longest"][name]
        mark = " (search limit)" if report["search_limit_reached"][name] else ""
        r = report["at_common"].get(name) or {}
        estimate = "-" if name == "trainer" else (r.get("estimate_gb") or "-")  # shardtune's plan, not the Trainer's
        lines.append(f"| {name} | {f'{best:,}' if best else 'none'}{mark} | {r.get('max_rss_gb', '-')} | "
                     f"{estimate} | {r.get('tokens_per_s', '-')} |")
    if report["allocated_like"]:
        lines += ["", f"The shardtune runs again at seq_len {common}, with MALLOC_MMAP_THRESHOLD_=65536 (RSS follows "
                  "the bytes allocated; glibc's default heap keeps freed blocks below 32 MiB): "
                  + ", ".join(f"{n} {r.get('max_rss_gb', '-')} GB" for n, r in report["allocated_like"].items()) + "."]
    if report.get("speed"):
        rounds = len(next(iter(report["speed"].values())))
        lines += ["", f"Throughput at seq_len {common:,}: the contenders alternating, {rounds} rounds (mean of the "
                  "rounds' trained tokens/s; the search's runs above are one each):", "",
                  "| contender | trained tokens/s | by round |", "|---|---|---|"]
        for label, rs in report["speed"].items():
            rate = pooled_rate(rs)
            lines.append(f"| {label} | {f'{rate:,.1f}' if rate else '-'} | "
                         f"{', '.join(str(r.get('tokens_per_s', '-')) for r in rs)} |")
    lines += ["", f"Common seq_len (the longest every contender reached): {common}. Per seq_len tried:", ""]
    lines += ["| contender | seq_len | result | max RSS (GB) | estimate (GB) | step times (s) | wall (s) |",
              "|---|---|---|---|---|---|---|"]
    for name, rs in report["runs"].items():
        for r in rs:
            result = "ok" if r["ok"] else r["why"]
            estimate = "-" if name == "trainer" else (r["estimate_gb"] or "-")
            lines.append(f"| {name} | {r['seq_len']:,} | {result} | {r.get('max_rss_gb', '-')} | "
                         f"{estimate} | {r.get('step_s', '-')} | {r['wall_s']} |")
    lines += [""] + [f"- {'met' if ok else '**missed**'}: {what}: {value}" for what, ok, value in report["goals"]]
    return "\n".join(lines)


def write_results(section: str) -> None:
    write_section(RESULTS, "Long context", START, END, section)


def parse_args(argv=None) -> argparse.Namespace:
    p = search_parser(__doc__.split("\n\n")[0], "smoke run: cap 1.5 GB, lengths 256..1024", cap_gb=2.5, steps=3)
    p.add_argument("--speed_steps", type=int, default=6, help="steps per throughput run at the common seq_len")
    p.add_argument("--speed_repeats", type=int, default=2, help="rounds of the throughput runs")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    p.add_argument("--work", type=Path, default=None, help="work directory (default: a fresh temporary one)")
    p.add_argument("--no_write", action="store_true", help="print the section instead of writing RESULTS.md")
    p.add_argument("--replay", type=Path, default=None,
                   help="rewrite the RESULTS.md section from a run's report.json (its header line and command kept)")
    args = p.parse_args(argv)
    if args.quick:
        args.cap_gb, args.start, args.max_len = min(args.cap_gb, 1.5), 256, 1024
    return args


def replay(path: Path) -> int:
    """Re-render the section from a saved report (after a change to the table's layout), measuring nothing."""
    saved = json.loads(path.read_text())
    report = {**saved, "goals": [tuple(g) for g in saved["goals"]]}
    head = RESULTS.read_text().split(START, 1)[1].split(END, 1)[0].strip().split("\n")
    info, command = head[0], head[3]
    write_results(format_section(report, command, info))
    print(f"rewrote the long-context section of {RESULTS} from {path}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replay:
        return replay(args.replay)
    started = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - started:6.0f} s] {msg}", flush=True)

    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="shardtune-long-context-"))
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(work / "model", args.vocab)
    data = write_text_rows(work / "docs.jsonl", rows=8, words=int(args.max_len * 1.2))
    log(f"work directory {work}; cap {args.cap_gb:g} GB per process; seq_len {args.start:,}..{args.max_len:,}")
    measure(work, model, data, "sp1_chunked", args.start, args)  # warm-up: DeepSpeed's comm-op build, page cache
    log("warm-up run done (not reported)")
    found = {name: search(work, model, data, name, args, log) for name in args.contenders}
    common = min((longest(rs) or 0) for rs in found.values())
    allocated = {}
    for name in (n for n in args.contenders if n != "trainer" and common):
        allocated[name] = measure(work, model, data, name, common, args, ALLOCATED_LIKE)
        log(f"  {name:12s} seq_len {common:>6,} with MALLOC_MMAP_THRESHOLD_=65536: max RSS "
            f"{allocated[name].get('max_rss_gb', float('nan')):.2f} GB")
    speeds = speed(work, model, data, common, args, log) if common and "trainer" in found else {}
    report = build_report(found, args, allocated, speeds)
    minutes = (time.time() - started) / 60
    from importlib.metadata import version

    info = (f"Measured {_dt.datetime.now():%Y-%m-%d %H:%M} on {machine_words()}, shared with other "
            f"work (load average {os.getloadavg()[0]:.1f} at the end), torch {version('torch')}, deepspeed "
            f"{version('deepspeed')}, transformers {version('transformers')}; {minutes:.1f} min in all. "
            f"Cap {args.cap_gb:g} GB per process; seq_len doubled from {args.start:,} up to {args.max_len:,}, "
            f"{args.steps} steps each, {ROWS_PER_STEP} rows of seq_len tokens per step.")
    command = "python -m bench.long_context " + " ".join(argv if argv is not None else sys.argv[1:])
    section = format_section(report, command.strip(), info)
    (work / "report.json").write_text(json.dumps(report, indent=2, default=str))
    if args.no_write:
        print(section)
    else:
        write_results(section)
        log(f"wrote {RESULTS}")
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
