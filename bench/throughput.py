r"""Throughput of shardtune against the floor (a minimal DeepSpeed loop) and the peer (the HF Trainer).

    .venv/bin/python bench/throughput.py                       # the full comparison: ~12 min on 2 cores
    .venv/bin/python bench/throughput.py --quick               # a smoke run: one cell, small model, ~40 s
    .venv/bin/python bench/throughput.py --workloads fixed --stages 2 --contenders shardtune minimal \
        --variant nomask=/tmp/copy-with-a-change              # A/B a change made in a copy of the repository

Three contenders, all started as their own process tree with 2 CPU ranks (gloo), all with the
DeepSpeed config shardtune rendered for the run:
  shardtune   `shardtune launch CONFIG zero.stage=S output_dir=... train.max_steps=N`; per-step
              times from OUTPUT_DIR/metrics.jsonl (train.log_every=1)
  minimal     bench/minimal_deepspeed.py: deepspeed.initialize, forward, backward, step
  trainer     bench/hf_trainer.py: transformers.Trainer + DeepSpeed, DataCollatorForSeq2Seq padding
Same tiny Llama (hidden 256, 4 layers, 8 heads), seq 256, micro batch 4, fp32, same seed and
accumulation; the workloads and how "useful" tokens are counted are in bench/_workloads.py.
Contenders alternate (A B C A B C ...) in every cell, so drift of this shared machine hits all alike.

Reported per contender and cell: steady-state tokens/s (positions the model computed, padding
included) and useful tokens/s (loss-carrying positions), each the median of per-step rates after
the warm-up steps, pooled over repeats; time to first step (process start -> first optimizer step
done); peak RSS per rank up to the last training step. Also `shardtune plan` wall time.

The machine is shared: each run records the CPU other processes used while it ran, and a run they
disturbed (more than --max_other_cores) is measured again after the load settles. The table goes to
the `## Throughput` section of bench/RESULTS.md, between markers; the text after them is kept.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import _workloads as W  # noqa: E402
from bench._runner import RunFailed, run_tree  # noqa: E402

CONTENDERS = ("shardtune", "minimal", "trainer")
LABELS = {"shardtune": "shardtune", "minimal": "minimal DeepSpeed", "trainer": "HF Trainer"}
RESULTS = REPO / "bench" / "RESULTS.md"
START, END = "<!-- throughput:start -->", "<!-- throughput:end -->"
TARGETS = {"fixed_vs_minimal": 0.97, "fixed_vs_trainer": 1.05, "variable_useful_vs_trainer": 1.5, "plan_seconds": 0.5}


@dataclass
class Cell:
    """One workload at one ZeRO stage: its inputs for every contender."""

    workload: str
    stage: int
    yaml: Path
    ds_config: Path
    batches: Path
    schedules: dict[str, W.Schedule]
    trainer_data: Path
    runs: dict[str, list[dict]] = field(default_factory=dict)


def python_bin() -> str:
    return sys.executable


def shardtune_bin() -> str:
    return str(Path(sys.executable).parent / "shardtune")


def torchrun(script: str) -> list[str]:
    return [python_bin(), "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={W.WORLD}",
            str(REPO / "bench" / script)]


def child_env(code_dir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["DS_ACCELERATOR"] = "cpu"  # what shardtune's launch.sh exports on a CPU machine
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("WANDB_MODE", None)
    if code_dir is not None:  # a patched copy of shardtune: its launcher and trainer come first on the path
        env["PYTHONPATH"] = os.pathsep.join([str(code_dir)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def kind(contender: str) -> str:
    """shardtune variants (`shardtune:NAME`, from --variant) run like shardtune."""
    return "shardtune" if contender.startswith("shardtune") else contender


def label(contender: str) -> str:
    return f"shardtune ({contender.split(':', 1)[1]})" if ":" in contender else LABELS[contender]


def sh(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env=child_env(), check=True, capture_output=True, text=True, **kw)


# ---------------------------------------------------------------------------------------------- setup

def prepare_cells(args, work: Path, log) -> tuple[list[Cell], dict]:
    model = W.make_model(work / "model", args.quick)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    gb = W.MICRO * args.grad_accum * W.WORLD
    info: dict = {"model": json.loads((model / "config.json").read_text())}
    cells = []
    for wl in args.workloads:
        data = work / "data" / f"{wl}.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        if wl == "fixed":
            W.write_fixed_rows(data, rows=(args.steps + 1) * gb, seed=args.seed)
        else:
            info["chat_lengths"] = W.write_chat_rows(data, rows=max(200, 3 * args.steps * gb), seed=args.seed,
                                                     tokenizer=tok)
        yaml_path = W.shardtune_yaml(work / f"{wl}.yaml", model, data, wl, work / "cache", args.grad_accum, args.seed)
        plan_dir = work / "plans" / f"{wl}-z2"
        sh([shardtune_bin(), "launch", str(yaml_path), "zero.stage=2", f"output_dir={plan_dir}",
            f"train.max_steps={args.steps}", "--dry_run"])
        cfg, tok2, prepared = W.load_prepared(plan_dir)  # builds shardtune's cache entry: no contender pays for it
        packed = prepared.train
        summary = {k: prepared.summary.get(k) for k in ("samples", "sequences", "tokens", "trained_tokens",
                                                         "packing_efficiency")}
        if wl == "fixed":
            summary.update(W.check_fixed(packed))
        info[f"{wl}_data"] = summary
        packed_sched = W.packed_schedule(cfg, packed, args.steps)
        samples = W.unpacked_samples(packed)
        order = (W.trainer_order_fixed(packed_sched) if wl == "fixed"
                 else W.trainer_order_variable(len(samples), args.steps, args.grad_accum, args.seed))
        layout, trainer_sched = W.trainer_layout(samples, order)
        batches = work / "batches" / wl
        batches.mkdir(parents=True, exist_ok=True)
        pad_id = tok2.pad_token_id if tok2.pad_token_id is not None else tok2.eos_token_id
        W.save_minimal_batches(batches, packed, packed_sched, pad_id, with_mask=(wl == "variable"))
        trainer_data = W.save_trainer_dataset(batches / "trainer_rows.json", samples, layout)
        log(f"{wl}: {summary}")
        for stage in args.stages:
            plan_dir = work / "plans" / f"{wl}-z{stage}"
            sh([shardtune_bin(), "launch", str(yaml_path), f"zero.stage={stage}", f"output_dir={plan_dir}",
                f"train.max_steps={args.steps}", "--dry_run"])
            cells.append(Cell(wl, stage, yaml_path, plan_dir / "ds_config.json", batches,
                              {"shardtune": packed_sched, "minimal": packed_sched, "trainer": trainer_sched},
                              trainer_data))
    return cells, info


# ---------------------------------------------------------------------------------------------- runs

def run_contender(cell: Cell, contender: str, rep: int, args, work: Path) -> dict:
    name = f"{cell.workload}-z{cell.stage}-{contender.replace(':', '-')}-r{rep}"
    out = work / "runs" / name
    out.mkdir(parents=True, exist_ok=True)
    code_dir = args.variants.get(contender.split(":", 1)[1]) if ":" in contender else None
    if kind(contender) == "shardtune":
        argv = [shardtune_bin(), "launch", str(cell.yaml), f"zero.stage={cell.stage}", f"output_dir={out / 'run'}",
                f"train.max_steps={args.steps}"]
    elif contender == "minimal":
        argv = torchrun("minimal_deepspeed.py") + ["--model", str(work / "model"), "--ds_config", str(cell.ds_config),
                                                   "--batches", str(cell.batches), "--out", str(out / "result.json"),
                                                   "--seed", str(args.seed)]
    else:
        argv = torchrun("hf_trainer.py") + ["--model", str(work / "model"), "--ds_config", str(cell.ds_config),
                                            "--data", str(cell.trainer_data), "--grad_accum", str(args.grad_accum),
                                            "--steps", str(args.steps), "--seed", str(args.seed),
                                            "--out", str(out / "result.json")]
    load = os.getloadavg()[0]
    for attempt in range(args.retries + 1):
        try:
            done = run_tree(argv, out / "log.txt", code_dir or REPO, child_env(code_dir), timeout=args.timeout)
        except RunFailed as exc:
            # Seen once: the minimal loop at ZeRO-3 aborted in teardown ("terminate called without an active
            # exception") after its last step. A failed run is reported and measured again, never kept.
            if attempt == args.retries:
                raise
            print(f"  {name}: failed ({str(exc).splitlines()[0][:200]}); measuring it again", flush=True)
            shutil.rmtree(out / "run", ignore_errors=True)
            continue
        if args.max_other_cores is None or done.other_cores <= args.max_other_cores or attempt == args.retries:
            break
        print(f"  {name}: other processes used {done.other_cores:.2f} cores during the run; measuring it again",
              flush=True)
        if args.wait_for_load:
            wait_for_idle(args.wait_for_load, args.wait_timeout, lambda m: print(f"  {m}", flush=True))
        shutil.rmtree(out / "run", ignore_errors=True)
    ends = step_end_times(kind(contender), out)
    if len(ends) != args.steps:
        raise RunFailed(f"{name}: {len(ends)} step times, expected {args.steps}")
    if contender == "trainer":
        check_trainer_batches(cell, out)
    if kind(contender) == "shardtune" and not args.keep:
        for sub in ("checkpoints", "final"):
            shutil.rmtree(out / "run" / sub, ignore_errors=True)
    rss = done.peak_rss(until=ends[-1])
    return {"name": name, "load_before": round(load, 2), "other_cores": round(done.other_cores, 3), "attempts": attempt + 1,
            "started": done.started, "wall": round(done.wall, 2),
            "step_end_times": ends, "ttfs": ends[0] - done.started,
            "peak_rss_gb": [round(rss.get(r, 0) / 1e9, 3) for r in range(W.WORLD)],
            **({"own_metrics": shardtune_own_metrics(out)} if kind(contender) == "shardtune" else {})}


def warm_up(cell: Cell, work: Path, log) -> None:
    """One untimed 2-step run before measuring: DeepSpeed JIT-builds its CPU comm op on first use (and
    rebuilds it when another environment built it last, ~30 s on 2 cores) and the page cache is cold;
    whichever contender ran first would pay for both."""
    t0 = time.time()
    run_tree([shardtune_bin(), "launch", str(cell.yaml), f"zero.stage={cell.stage}", f"output_dir={work / 'warmup'}",
              "train.max_steps=2"], work / "warmup.log", REPO, child_env(None), timeout=600)
    shutil.rmtree(work / "warmup", ignore_errors=True)
    log(f"warm-up run (not measured): {time.time() - t0:.0f} s")


def step_end_times(contender: str, out: Path) -> list[float]:
    if contender == "shardtune":
        rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "tokens_per_sec" in r]
        return [r["time"] for r in sorted(rows, key=lambda r: r["step"])]
    if contender == "minimal":
        return json.loads((out / "result.json").read_text())["step_end_times"]
    return json.loads((out / "result.json.rank0").read_text())["step_end_times"]


def shardtune_own_metrics(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "tokens_per_sec" in r]
    return {"tokens_per_sec": [r["tokens_per_sec"] for r in rows], "step_time": [r["step_time"] for r in rows]}


def check_trainer_batches(cell: Cell, out: Path) -> None:
    """The Trainer must have trained on exactly the batches the bench counts tokens for."""
    sched = cell.schedules["trainer"]
    for rank in range(W.WORLD):
        result = json.loads((out / f"result.json.rank{rank}").read_text())
        got = (result["engine"], result["world"], result["zero_stage"])
        if got != ("DeepSpeedEngine", W.WORLD, cell.stage):
            raise RunFailed(f"{out}: the Trainer ran {got}, not a DeepSpeedEngine of world {W.WORLD} at ZeRO-{cell.stage}")
        seen = result["seen"]
        expected = sched.rank_ids(rank)
        if seen[:len(expected)] != expected:
            raise RunFailed(f"{out}: the Trainer's rank {rank} saw other batches than planned "
                            f"(first: {seen[:2]} vs {expected[:2]})")


# ---------------------------------------------------------------------------------------------- numbers

def step_rates(run: dict, sched: W.Schedule, warmup: int) -> dict[str, list[float]]:
    """Per-step rates after warm-up; step k's duration is end[k] - end[k-1]."""
    ends = run["step_end_times"]
    out: dict[str, list[float]] = {"computed": [], "useful": [], "real": []}
    for k in range(max(1, warmup), len(ends)):
        dt = ends[k] - ends[k - 1]
        tokens = sched.step_tokens(k)
        for key in out:
            out[key].append(tokens[key] / dt)
    return out


def summarize(cell: Cell, contender: str, warmup: int) -> dict:
    runs = cell.runs.get(contender, [])
    if not runs:
        return {}
    pooled: dict[str, list[float]] = {"computed": [], "useful": [], "real": []}
    per_rep = []
    for run in runs:
        rates = step_rates(run, cell.schedules[kind(contender)], warmup)
        for key in pooled:
            pooled[key] += rates[key]
        per_rep.append(round(statistics.median(rates["useful"])))
        # Steady window as a whole (sum of tokens / time), a cross-check for the median.
        ends = run["step_end_times"]
        k0 = max(1, warmup)
        total = sum(cell.schedules[kind(contender)].step_tokens(k)["useful"] for k in range(k0, len(ends)))
        run["useful_aggregate"] = round(total / (ends[-1] - ends[k0 - 1]))
    return {
        "tokens_per_s": round(statistics.median(pooled["computed"])),
        "useful_per_s": round(statistics.median(pooled["useful"])),
        "useful_per_s_by_repeat": per_rep,
        "useful_aggregate_by_repeat": [r["useful_aggregate"] for r in runs],
        "ttfs_s": round(statistics.median(r["ttfs"] for r in runs), 2),
        "ttfs_by_repeat": [round(r["ttfs"], 2) for r in runs],
        "peak_rss_gb": [max(r["peak_rss_gb"][i] for r in runs) for i in range(W.WORLD)],
        "steady_steps": len(pooled["useful"]),
    }


def time_plan(runs: int) -> list[float]:
    """Wall time of `shardtune plan examples/tiny.yaml --json`, a fresh process each time."""
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        sh([shardtune_bin(), "plan", "examples/tiny.yaml", "--json"])
        out.append(time.perf_counter() - t)
    return out


def build_report(cells: list[Cell], plan_times: list[float], args, info: dict) -> dict:
    rows, verdicts = [], []
    for cell in cells:
        s = {c: summarize(cell, c, args.warmup) for c in args.contenders}
        metric = "tokens_per_s" if cell.workload == "fixed" else "useful_per_s"
        for c in args.contenders:
            if not s[c]:
                continue
            row = {"workload": cell.workload, "stage": cell.stage, "contender": c, **s[c]}
            if kind(c) == "shardtune":
                for ref in ("minimal", "trainer") + (("shardtune",) if c != "shardtune" else ()):
                    if s.get(ref):
                        row[f"vs_{ref}"] = round(s[c][metric] / s[ref][metric], 3)
            rows.append(row)
        st, tr, mi = s.get("shardtune"), s.get("trainer"), s.get("minimal")
        where = f"{cell.workload}, ZeRO-{cell.stage}"
        if st and mi and cell.workload == "fixed":
            r = st[metric] / mi[metric]
            verdicts.append({"target": f"{where}: shardtune >= {TARGETS['fixed_vs_minimal']} x minimal (tokens/s)",
                             "measured": round(r, 3), "met": r >= TARGETS["fixed_vs_minimal"]})
        if st and tr and cell.workload == "fixed":
            r = st[metric] / tr[metric]
            verdicts.append({"target": f"{where}: shardtune >= {TARGETS['fixed_vs_trainer']} x Trainer (tokens/s)",
                             "measured": round(r, 3), "met": r >= TARGETS["fixed_vs_trainer"]})
        if st and tr and cell.workload == "variable":
            r = st[metric] / tr[metric]
            verdicts.append({"target": f"{where}: shardtune >= {TARGETS['variable_useful_vs_trainer']} x Trainer "
                                       "(useful tokens/s)", "measured": round(r, 3),
                             "met": r >= TARGETS["variable_useful_vs_trainer"]})
        if st and tr:
            verdicts.append({"target": f"{where}: time to first step <= Trainer's",
                             "measured": f"{st['ttfs_s']:.1f} s vs {tr['ttfs_s']:.1f} s", "met": st["ttfs_s"] <= tr["ttfs_s"]})
    if plan_times:
        verdicts.append({"target": f"`shardtune plan` < {TARGETS['plan_seconds']} s",
                         "measured": f"median {statistics.median(plan_times):.2f} s, max {max(plan_times):.2f} s",
                         "met": max(plan_times) < TARGETS["plan_seconds"]})
    return {"rows": rows, "targets": verdicts, "plan_seconds": [round(t, 3) for t in plan_times], "info": info,
            "settings": {k: getattr(args, k) for k in ("quick", "workloads", "stages", "repeats", "steps", "warmup",
                                                       "grad_accum", "seed", "contenders")}}


def format_table(report: dict) -> str:
    refs = ["vs_minimal", "vs_trainer"] + (["vs_shardtune"] if any("vs_shardtune" in r for r in report["rows"]) else [])
    head = ("| workload | ZeRO | contender | tokens/s | useful tokens/s | " + " | ".join(r.replace("_", " ").replace(
        "trainer", "Trainer") for r in refs) + " | time to first step (s) | peak RSS rank 0 / 1 (GB) |")
    lines = [head, "|" + "---|" * (7 + len(refs))]
    for r in report["rows"]:
        ratios = " | ".join(f"{r[k]:.3f}" if k in r else "" for k in refs)
        lines.append(f"| {r['workload']} | {r['stage']} | {label(r['contender'])} | {r['tokens_per_s']:,} | "
                     f"{r['useful_per_s']:,} | {ratios} | {r['ttfs_s']:.1f} | "
                     f"{r['peak_rss_gb'][0]:.2f} / {r['peak_rss_gb'][1]:.2f} |")
    return "\n".join(lines)


def format_targets(report: dict) -> str:
    return "\n".join(f"- {'met' if v['met'] else '**missed**'}: {v['target']}: {v['measured']}" for v in report["targets"])


def write_results(path: Path, report: dict, command: str, others: list[float], elapsed: float, measured: float) -> None:
    info = report["info"]
    s = report["settings"]
    redone = sum(run["attempts"] > 1 for cell in report["runs"].values() for runs in cell.values() for run in runs)
    m = info["model"]
    gb = W.MICRO * s["grad_accum"] * W.WORLD
    lines = [
        START,
        f"Measured {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} on {platform.machine()} Linux, "
        f"{os.cpu_count()} cores shared with other work, Python {platform.python_version()}, "
        f"{library_versions()}; {elapsed / 60:.1f} min in all ({measured / 60:.1f} min measuring, the rest setup "
        f"and waiting for a quiet machine). CPU used by other processes during a run: "
        f"{min(others):.2f}-{max(others):.2f} cores (median {statistics.median(others):.2f}) of 2"
        + (f"; {redone} run(s) were disturbed by other work and measured again." if redone else "."),
        "",
        "```",
        command,
        "```",
        "",
        f"Model: Llama hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, {m['num_attention_heads']} heads, "
        f"vocab {m['vocab_size']}; 2 CPU ranks (gloo), fp32, seq {W.SEQ_LEN}, micro batch {W.MICRO}, "
        f"accumulation {s['grad_accum']} (global batch {gb} rows); {s['steps']} steps per run, the first "
        f"{s['warmup']} not counted; {s['repeats']} repeat(s) per contender, alternating.",
    ]
    if "fixed_data" in info:
        lines.append(f"Fixed: every sequence one sample of exactly {W.SEQ_LEN} tokens, all labels trained "
                     f"({W.SEQ_LEN - 1} loss positions per row); all three train the same rows at the same step on the "
                     "same rank (checked for the Trainer from what its collator received).")
    if "chat_lengths" in info:
        c, v = info["chat_lengths"], info.get("variable_data", {})
        lines.append(f"Variable: chat rows of median {c['median']} tokens (p10 {c['p10']}, p90 {c['p90']}, max "
                     f"{c['max']}), loss on the assistant turn; shardtune packs them "
                     f"({v.get('packing_efficiency', 0):.1%} of positions real) and the minimal loop trains on "
                     "the same packed batches; the Trainer pads each batch of 4 samples to its longest.")
    lines += ["", "tokens/s counts every position computed (padding included); useful tokens/s counts "
              "loss-carrying positions. Ratios compare tokens/s on fixed data and useful tokens/s on variable data.",
              "", format_table(report), "", format_targets(report), END]
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = "\n".join(lines)
    if START in text and END in text:
        text = text[:text.index(START)] + block + text[text.index(END) + len(END):]
    elif "## Throughput" in text:
        at = text.index("## Throughput")
        nl = text.index("\n", at) + 1
        text = text[:nl] + "\n" + block + "\n" + text[nl:]
    else:
        text = text.rstrip("\n") + "\n\n## Throughput\n\n" + block + "\n"
    path.write_text(text)


def library_versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("torch", "deepspeed", "transformers", "accelerate"))


def wait_for_idle(max_load: float, give_up_s: float, log) -> None:
    start = time.time()
    while os.getloadavg()[0] >= max_load:
        if time.time() - start > give_up_s:
            log(f"load average still {os.getloadavg()[0]:.2f} after {give_up_s:.0f} s; measuring anyway")
            return
        log(f"1-minute load average {os.getloadavg()[0]:.2f} >= {max_load}; waiting")
        time.sleep(30)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: fixed data, ZeRO-2, small model, few steps")
    p.add_argument("--workloads", nargs="+", choices=("fixed", "variable"))
    p.add_argument("--stages", nargs="+", type=int, choices=(1, 2, 3))
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--repeats", type=int)
    p.add_argument("--steps", type=int, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, help="first steps left out of the steady state")
    p.add_argument("--grad_accum", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plan_runs", type=int, help="times to run `shardtune plan`")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per run before it counts as hung")
    p.add_argument("--work", default="/tmp/shardtune-bench-throughput", help="scratch directory (recreated)")
    p.add_argument("--results", help="markdown file to write the section into (default: bench/RESULTS.md, "
                                     "not written by --quick unless given)")
    p.add_argument("--json", help="also write the raw report here")
    p.add_argument("--wait_for_load", type=float, help="before starting, wait until the 1-minute load average is below this")
    p.add_argument("--wait_timeout", type=float, default=600.0, help="give up waiting for a low load after this (s)")
    p.add_argument("--max_other_cores", type=float,
                   help="redo a run when other processes used more CPU than this during it (default 0.15; none with --quick)")
    p.add_argument("--retries", type=int, default=5, help="how often a disturbed run is redone before it is kept")
    p.add_argument("--keep", action="store_true", help="keep checkpoints of the shardtune runs")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                   help="also run shardtune from a patched copy of the repository at DIR (A/B of a change)")
    args = p.parse_args(argv)
    try:
        args.variants = {k: Path(v).resolve() for k, v in (item.split("=", 1) for item in args.variant)}
    except ValueError:
        p.error("--variant takes NAME=DIR")
    args.contenders = list(args.contenders) + [f"shardtune:{k}" for k in args.variants]
    quick = args.quick
    defaults = {"workloads": ["fixed"] if quick else ["fixed", "variable"], "stages": [2] if quick else [2, 3],
                "repeats": 1 if quick else 2, "steps": 4 if quick else 16, "warmup": 1 if quick else 4,
                "plan_runs": 2 if quick else 5, "max_other_cores": None if quick else 0.15}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.warmup >= args.steps - 1:
        p.error(f"--warmup {args.warmup} leaves no steady steps of --steps {args.steps}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python bench/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - started:6.0f} s] {msg}", flush=True)

    cells, info = prepare_cells(args, work, log)
    warm_up(cells[0], work, log)
    if args.wait_for_load:
        wait_for_idle(args.wait_for_load, args.wait_timeout, log)
    measuring = time.time()
    plan_times = time_plan(args.plan_runs)
    log(f"shardtune plan: {', '.join(f'{t:.2f}' for t in plan_times)} s")
    others = []
    for cell in cells:
        for rep in range(args.repeats):
            for contender in args.contenders:
                run = run_contender(cell, contender, rep, args, work)
                others.append(run["other_cores"])
                cell.runs.setdefault(contender, []).append(run)
                rates = step_rates(run, cell.schedules[kind(contender)], args.warmup)
                log(f"{run['name']}: {statistics.median(rates['computed']):,.0f} tokens/s, "
                    f"{statistics.median(rates['useful']):,.0f} useful/s, first step after {run['ttfs']:.1f} s, "
                    f"wall {run['wall']:.0f} s (other processes used {run['other_cores']:.2f} cores)")
    report = build_report(cells, plan_times, args, info)
    report["runs"] = {f"{c.workload}-z{c.stage}": c.runs for c in cells}
    report["others"] = others
    print()
    print(format_table(report))
    print()
    print(format_targets(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    results = Path(args.results) if args.results else (None if args.quick else RESULTS)
    if results is not None:
        write_results(results, report, command, others, time.time() - started, time.time() - measuring)
        print(f"\nwrote {results}")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
