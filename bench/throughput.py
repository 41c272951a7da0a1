r"""Throughput of shardtune against the floor (a minimal DeepSpeed loop) and the peer (the HF Trainer).

    .venv/bin/python -m bench.throughput                  # the full comparison: ~30 min on 2 cores
    .venv/bin/python -m bench.throughput --quick          # a smoke run: one cell, small model, ~1 min
    .venv/bin/python -m bench.throughput --workloads fixed --stages 2 --contenders shardtune minimal \
        --ab overlap=zero.overlap_comm=true               # A/B a setting against shardtune's default
    .venv/bin/python -m bench.throughput --variant nomask=/tmp/copy-with-a-change   # ... or a patched copy

Four contenders, each started as its own process tree with 2 CPU ranks (gloo):
  shardtune     `shardtune launch CONFIG zero.stage=S output_dir=... train.max_steps=N`; per-step times
                from the run directory's metrics (train.log_every=1)
  minimal       bench/minimal_deepspeed.py (deepspeed.initialize, forward, backward, step) with the
                DeepSpeed config a person writes by hand: batch sizes, AdamW and the stage, everything
                else DeepSpeed's default. The floor: shardtune / minimal measures shardtune's choices.
  minimal_same  the same loop with the DeepSpeed config shardtune rendered for the run: shardtune /
                minimal_same measures only what shardtune does around the step (its loop's overhead).
  trainer       bench/hf_trainer.py: transformers.Trainer + DeepSpeed with the hand-written config,
                DataCollatorForSeq2Seq padding
Same tiny Llama (hidden 256, 4 layers, 8 heads), seq 256, micro batch 4, fp32, same seed and
accumulation; the workloads and how "useful" tokens are counted are in bench/_workloads.py.
Contenders alternate in every cell, in mirrored order (A B C D D C B A ...), so a shared machine that speeds up
or slows down during a cell favours no contender, and in the order minimal, shardtune, trainer, minimal_same, so
shardtune always runs next to the two it is judged against.

Reported per contender and cell: steady-state tokens/s (positions the model computed, padding
included) and useful tokens/s (loss-carrying positions), each the median of per-step rates after
the warm-up steps, pooled over repeats; MFU computed by hand (model FLOPs from first principles over
the measured step time, against the peak shardtune probed); time to first step (process start ->
first optimizer step done); peak RSS per rank up to the last training step. shardtune's own `mfu`
metric is checked against the hand computation. Also `shardtune plan` wall time.

`--ab NAME=SPEC` adds a contender `shardtune:NAME`: shardtune with the overrides in SPEC, separated by
spaces: `section.field=value` for the run config, `ds:dotted.key=value` for a key of the DeepSpeed
config (given to shardtune as its `zero.config`, so the value wins over shardtune's default).
`--hidden`/`--layers` size the model in the same proportions, to see whether a ratio holds as kernels grow
(the targets are set for the default 256 x 4).

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
from typing import Optional

import yaml

from bench import _workloads as W
from bench._runner import PYTHON, REPO, SHARDTUNE, RunFailed, machine_words, run_tree, wait_for_quiet, write_section
from launcher.contract.run_dir import RunDir
from launcher.planning.host import extensions_dir

CONTENDERS = ("shardtune", "minimal", "minimal_same", "trainer")
LABELS = {"shardtune": "shardtune", "minimal": "minimal loop, DeepSpeed defaults",
          "minimal_same": "minimal loop, shardtune's ds_config", "trainer": "HF Trainer, DeepSpeed defaults"}
RESULTS = REPO / "bench" / "RESULTS.md"
START, END = "<!-- throughput:start -->", "<!-- throughput:end -->"
LONG_RUN_STEPS = 1000
"""The run length shardtune's `auto` settings are planned for. The benchmark measures the steady state of a real
fine-tune, and a real fine-tune's length decides `train.compile: auto` (launcher.planning.compile_choice); the run
itself stops after --steps steps."""
TARGETS = {"fixed_vs_minimal": 0.97, "fixed_vs_trainer": 1.0, "fixed_vs_trainer_goal": 1.05,
           "variable_useful_vs_trainer": 2.0, "plan_seconds": 0.5, "mfu_relative_error": 1e-6}


@dataclass
class Cell:
    """One workload at one ZeRO stage: its inputs for every contender."""

    workload: str
    stage: int
    yaml: Path
    ds_config: Path
    """The DeepSpeed config shardtune rendered for this cell."""
    handwritten: Path
    """The DeepSpeed config a person writes by hand (bench/_workloads.handwritten_ds_config)."""
    batches: Path
    schedules: dict[str, W.Schedule]
    trainer_data: Path
    compiled: bool = False
    """What shardtune's `train.compile: auto` picks for this cell in a run of LONG_RUN_STEPS steps."""
    ab_overrides: dict[str, list[str]] = field(default_factory=dict)
    """--ab NAME -> the shardtune overrides it runs with in this cell (a DeepSpeed key becomes a zero.config)."""
    runs: dict[str, list[dict]] = field(default_factory=dict)


def torchrun(module: str) -> list[str]:
    return [str(PYTHON), "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={W.WORLD}", "-m", module]


def child_env(code_dir: Optional[Path] = None) -> dict[str, str]:
    env = dict(os.environ)
    env["DS_ACCELERATOR"] = "cpu"  # what shardtune's launch.sh exports on a CPU machine
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("WANDB_MODE", None)
    # The baselines too load the DeepSpeed ops `make install` built in this environment's own folder (shardtune's
    # choice, trainer/ops.py): where an op was built is no contender's throughput.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    if code_dir is not None:  # a patched copy of shardtune: its launcher and trainer come first on the path
        env["PYTHONPATH"] = os.pathsep.join([str(code_dir)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def kind(contender: str) -> str:
    """shardtune variants (`shardtune:NAME`, from --variant or --ab) run like shardtune."""
    return "shardtune" if contender.startswith("shardtune") else contender


def run_order(contenders: list[str]) -> list[str]:
    """shardtune between the floor and the Trainer: the runs each verdict compares are neighbours in time (this VM's
    speed drifts over minutes), with A/B variants after them and the loop-overhead row last."""
    rank = {"minimal": 0, "shardtune": 1, "trainer": 2, "minimal_same": 4}
    return sorted(contenders, key=lambda c: rank.get(c, 3))


def label(contender: str) -> str:
    return f"shardtune ({contender.split(':', 1)[1]})" if ":" in contender else LABELS[contender]


def sh(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env=child_env(), check=True, capture_output=True, text=True, **kw)


# ---------------------------------------------------------------------------------------------- setup

def ab_overrides(spec: str, ds_config: Path, out: Path) -> list[str]:
    """shardtune overrides for one --ab spec; `ds:` keys are set in a copy of the cell's rendered DeepSpeed config."""
    overrides, ds_keys = [], {}
    for item in spec.split():
        if item.startswith("ds:"):
            key, _, value = item[3:].partition("=")
            ds_keys[key] = yaml.safe_load(value)
        else:
            overrides.append(item)
    if ds_keys:
        ds = json.loads(ds_config.read_text())
        for dotted, value in ds_keys.items():
            *parents, leaf = dotted.split(".")
            node = ds
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        out.write_text(json.dumps(ds, indent=2) + "\n")
        overrides.append(f"zero.config={out}")
    return overrides


def prepare_cells(args, work: Path, log) -> tuple[list[Cell], dict]:
    model = W.make_model(work / "model", args.quick, args.hidden, args.layers)
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
        sh([str(SHARDTUNE), "launch", str(yaml_path), "zero.stage=2", f"output_dir={plan_dir}",
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
            sh([str(SHARDTUNE), "launch", str(yaml_path), f"zero.stage={stage}", f"output_dir={plan_dir}",
                f"train.max_steps={args.steps if args.quick else LONG_RUN_STEPS}", "--dry_run"])  # quick: as it runs
            handwritten = work / "plans" / f"handwritten-z{stage}.json"
            handwritten.write_text(json.dumps(W.handwritten_ds_config(stage, args.grad_accum), indent=2) + "\n")
            ds_config = RunDir(plan_dir).ds_config_file
            cell = Cell(wl, stage, yaml_path, ds_config, handwritten, batches,
                        {"shardtune": packed_sched, "minimal": packed_sched, "minimal_same": packed_sched,
                         "trainer": trainer_sched}, trainer_data,
                        compiled=RunDir(plan_dir).read_config()["train"]["compile"] is True)
            for name, spec in args.ab.items():
                ab_json = work / "plans" / f"ab-{name}-{wl}-z{stage}.json"
                cell.ab_overrides[name] = ab_overrides(spec, ds_config, ab_json)
            cells.append(cell)
    return cells, info


# ---------------------------------------------------------------------------------------------- runs

def argv_for(cell: Cell, contender: str, out: Path, args, work: Path, steps: int) -> list[str]:
    if kind(contender) == "shardtune":
        name = contender.split(":", 1)[1] if ":" in contender else None
        return [str(SHARDTUNE), "launch", str(cell.yaml), f"zero.stage={cell.stage}",
                f"output_dir={RunDir(out / 'run').path}", f"train.max_steps={steps}",
                f"train.compile={str(cell.compiled).lower()}", *cell.ab_overrides.get(name, [])]
    if contender in ("minimal", "minimal_same"):
        ds = cell.handwritten if contender == "minimal" else cell.ds_config
        return torchrun("bench.minimal_deepspeed") + [
            "--model", str(work / "model"), "--ds_config", str(ds), "--batches", str(cell.batches),
            "--out", str(out / "result.json"), "--seed", str(args.seed), "--max_steps", str(steps)]
    return torchrun("bench.hf_trainer") + [
        "--model", str(work / "model"), "--ds_config", str(cell.handwritten), "--data", str(cell.trainer_data),
        "--grad_accum", str(args.grad_accum), "--steps", str(steps), "--seed", str(args.seed),
        "--out", str(out / "result.json")]


def run_contender(cell: Cell, contender: str, rep: int, args, work: Path) -> dict:
    name = f"{cell.workload}-z{cell.stage}-{contender.replace(':', '-')}-r{rep}"
    out = work / "runs" / name
    out.mkdir(parents=True, exist_ok=True)
    run = RunDir(out / "run")
    code_dir = args.variants.get(contender.split(":", 1)[1]) if ":" in contender else None
    argv = argv_for(cell, contender, out, args, work, args.steps)
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
            shutil.rmtree(run.path, ignore_errors=True)
            continue
        if args.max_other_cores is None or done.other_cores <= args.max_other_cores or attempt == args.retries:
            break
        print(f"  {name}: other processes used {done.other_cores:.2f} cores during the run; measuring it again",
              flush=True)
        if args.wait_for_load:
            wait_for_quiet(args.wait_for_load, args.wait_timeout, lambda m: print(f"  {m}", flush=True))
        shutil.rmtree(run.path, ignore_errors=True)
    ends = step_end_times(kind(contender), out)
    if len(ends) != args.steps:
        raise RunFailed(f"{name}: {len(ends)} step times, expected {args.steps}")
    if contender == "trainer":
        check_trainer_batches(cell, out)
    if contender in ("minimal", "trainer"):
        check_optimizer(out, contender)
    own = shardtune_own_metrics(run) if kind(contender) == "shardtune" else None
    if kind(contender) == "shardtune" and not args.keep:
        shutil.rmtree(run.checkpoints, ignore_errors=True)
        shutil.rmtree(run.final, ignore_errors=True)
    rss = done.peak_rss(until=ends[-1])
    return {"name": name, "load_before": round(load, 2), "other_cores": round(done.other_cores, 3),
            "attempts": attempt + 1, "started": done.started, "wall": round(done.wall, 2),
            "step_end_times": ends, "ttfs": ends[0] - done.started,
            "peak_rss_gb": [round(rss.get(r, 0) / 1e9, 3) for r in range(W.WORLD)],
            **({"own_metrics": own} if own is not None else {})}


def warm_up(cell: Cell, work: Path, args, log) -> None:
    """Untimed 2-step runs of shardtune and the hand-written config before measuring: DeepSpeed JIT-builds its
    CPU comm op and (for its default AdamW) its FusedAdam op on first use (~30 s each on 2 cores, where `make
    install` did not) and the page cache is cold; whichever contender ran first would pay."""
    t0 = time.time()
    for contender in ("shardtune", "minimal"):
        out = work / "warmup" / contender
        out.mkdir(parents=True, exist_ok=True)
        run_tree(argv_for(cell, contender, out, args, work, steps=2), out / "log.txt", REPO, child_env(None),
                 timeout=1200)
    shutil.rmtree(work / "warmup", ignore_errors=True)
    log(f"warm-up runs (not measured): {time.time() - t0:.0f} s")


def step_end_times(contender: str, out: Path) -> list[float]:
    if contender == "shardtune":
        return RunDir(out / "run").step_end_times()
    if contender in ("minimal", "minimal_same"):
        return json.loads((out / "result.json").read_text())["step_end_times"]
    return json.loads((out / "result.json.rank0").read_text())["step_end_times"]


def shardtune_own_metrics(run: RunDir) -> dict:
    """shardtune's own per-step numbers (log_every=1: one row per step), and the peak it measured or looked up."""
    rows = sorted(run.train_metrics(), key=lambda r: r["step"])
    first = run.read_metrics()[0] if run.read_metrics() else {}
    return {"tokens_per_sec": [r["tokens_per_sec"] for r in rows], "step_time": [r["step_time"] for r in rows],
            "total_tokens_per_sec": [r["total_tokens_per_sec"] for r in rows],
            "mfu": [r.get("mfu") for r in rows], "peak_tflops": first.get("peak_tflops"),
            "peak_tflops_source": first.get("peak_tflops_source")}


def check_trainer_batches(cell: Cell, out: Path) -> None:
    """The Trainer must have trained on exactly the batches the bench counts tokens for."""
    sched = cell.schedules["trainer"]
    for rank in range(W.WORLD):
        result = json.loads((out / f"result.json.rank{rank}").read_text())
        got = (result["engine"], result["world"], result["zero_stage"])
        if got != ("DeepSpeedEngine", W.WORLD, cell.stage):
            raise RunFailed(f"{out}: the Trainer ran {got}, not a DeepSpeedEngine of world {W.WORLD} "
                            f"at ZeRO-{cell.stage}")
        seen = result["seen"]
        expected = sched.rank_ids(rank)
        if seen[:len(expected)] != expected:
            raise RunFailed(f"{out}: the Trainer's rank {rank} saw other batches than planned "
                            f"(first: {seen[:2]} vs {expected[:2]})")


def check_optimizer(out: Path, contender: str) -> None:
    """The hand-written config must have run DeepSpeed's own AdamW (FusedAdam), not torch's."""
    path = out / ("result.json" if contender == "minimal" else "result.json.rank0")
    inner = json.loads(path.read_text()).get("inner_optimizer")
    if inner is not None and inner != "FusedAdam":
        raise RunFailed(f"{out}: DeepSpeed's default AdamW should be FusedAdam, the run used {inner}")


# ---------------------------------------------------------------------------------------------- numbers

def hand_flops(model_config: dict, tokens: int, square_lengths: int) -> float:
    """Model FLOPs of training on `tokens` tokens in samples with Σ n² = square_lengths, from config.json alone.

    Written from first principles, apart from trainer/flops.py, to check shardtune's `mfu` against it:
    a weight a token meets costs 2 FLOPs forward (multiply, add) and 4 backward (gradients of input and
    weight), for every parameter but the input embedding (a lookup; the LM head counts). Attention's
    QK^T and AV cost 4 · width · n² forward for a sample of n tokens without a mask, 12 · width · n²
    with backward; causal attention does half of it: 6 · width · n² per layer (README, "FLOPs and MFU").
    """
    h, layers, vocab = model_config["hidden_size"], model_config["num_hidden_layers"], model_config["vocab_size"]
    heads = model_config["num_attention_heads"]
    kv_heads = model_config.get("num_key_value_heads") or heads
    head_dim = model_config.get("head_dim") or h // heads
    inter = model_config["intermediate_size"]
    per_layer = (h * heads * head_dim + 2 * h * kv_heads * head_dim + heads * head_dim * h  # q, k, v, o
                 + 3 * h * inter  # gate, up, down
                 + 2 * h)  # the two RMSNorm weights
    lm_head = vocab * h
    weights = layers * per_layer + h + lm_head  # + the final norm; the input embedding is a lookup
    return 6.0 * weights * tokens + 6.0 * layers * heads * head_dim * square_lengths


def step_rates(run: dict, sched: W.Schedule, warmup: int) -> dict[str, list[float]]:
    """Per-step rates after warm-up; step k's duration is end[k] - end[k-1]."""
    ends = run["step_end_times"]
    out: dict[str, list[float]] = {"computed": [], "useful": [], "real": [], "seconds": []}
    for k in range(max(1, warmup), len(ends)):
        dt = ends[k] - ends[k - 1]
        tokens = sched.step_tokens(k)
        for key in ("computed", "useful", "real"):
            out[key].append(tokens[key] / dt)
        out["seconds"].append(dt)
    return out


def hand_mfu(run: dict, sched: W.Schedule, warmup: int, model_config: dict, peak: Optional[float]) -> Optional[float]:
    """Median over steady steps of model FLOPs / step time / world / peak (the peak shardtune probed)."""
    if not peak:
        return None
    ends = run["step_end_times"]
    values = []
    for k in range(max(1, warmup), len(ends)):
        t = sched.step_tokens(k)
        values.append(hand_flops(model_config, t["real"], t["square_lengths"]) / (ends[k] - ends[k - 1])
                      / W.WORLD / 1e12 / peak)
    return statistics.median(values)


def check_own_mfu(run: dict, sched: W.Schedule, model_config: dict) -> Optional[float]:
    """Largest relative difference, over all steps, between shardtune's `mfu` row and hand FLOPs / its step time."""
    own = run.get("own_metrics") or {}
    peak = own.get("peak_tflops")
    if not peak or not own.get("mfu"):
        return None
    worst = 0.0
    for k, (mfu, seconds) in enumerate(zip(own["mfu"], own["step_time"])):
        t = sched.step_tokens(k)
        expected = hand_flops(model_config, t["real"], t["square_lengths"]) / seconds / W.WORLD / 1e12 / peak
        worst = max(worst, abs(mfu - expected) / expected if mfu is not None else float("inf"))
    return worst


def summarize(cell: Cell, contender: str, warmup: int, model_config: dict, peak: Optional[float]) -> dict:
    runs = cell.runs.get(contender, [])
    if not runs:
        return {}
    sched = cell.schedules[kind(contender)]
    pooled: dict[str, list[float]] = {"computed": [], "useful": [], "real": []}
    per_rep = []
    for run in runs:
        rates = step_rates(run, sched, warmup)
        for key in pooled:
            pooled[key] += rates[key]
        per_rep.append(round(statistics.median(rates["useful"])))
        # Steady window as a whole (sum of tokens / time), a cross-check for the median.
        ends = run["step_end_times"]
        k0 = max(1, warmup)
        total = sum(sched.step_tokens(k)["useful"] for k in range(k0, len(ends)))
        run["useful_aggregate"] = round(total / (ends[-1] - ends[k0 - 1]))
    mfus = [m for run in runs if (m := hand_mfu(run, sched, warmup, model_config, peak)) is not None]
    out = {
        "tokens_per_s": round(statistics.median(pooled["computed"])),
        "useful_per_s": round(statistics.median(pooled["useful"])),
        "useful_per_s_by_repeat": per_rep,
        "useful_aggregate_by_repeat": [r["useful_aggregate"] for r in runs],
        "mfu": round(statistics.median(mfus), 4) if mfus else None,
        "ttfs_s": round(statistics.median(r["ttfs"] for r in runs), 2),
        "ttfs_by_repeat": [round(r["ttfs"], 2) for r in runs],
        "peak_rss_gb": [max(r["peak_rss_gb"][i] for r in runs) for i in range(W.WORLD)],
        "steady_steps": len(pooled["useful"]),
    }
    if kind(contender) == "shardtune":
        errors = [e for run in runs if (e := check_own_mfu(run, sched, model_config)) is not None]
        own = [m for run in runs for m in run["own_metrics"]["mfu"][max(1, warmup):] if m is not None]
        out["own_mfu"] = round(statistics.median(own), 4) if own else None
        out["own_mfu_max_relative_error"] = max(errors) if errors else None
        out["peak_tflops"] = [run["own_metrics"]["peak_tflops"] for run in runs]
        out["peak_tflops_source"] = runs[0]["own_metrics"]["peak_tflops_source"]
    return out


def time_plan(runs: int) -> list[float]:
    """Wall time of `shardtune plan examples/tiny.yaml --json`, a fresh process each time."""
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        sh([str(SHARDTUNE), "plan", "examples/tiny.yaml", "--json"])
        out.append(time.perf_counter() - t)
    return out


def verdict(target: str, measured, met: bool) -> dict:
    return {"target": target, "measured": measured, "met": met}


def ratio_verdict(target: str, ours: dict, theirs: dict, metric: str, threshold: float) -> dict:
    """Judged on the pooled medians; each repeat's own ratio (its runs are neighbours in the mirrored order) is
    shown next to it, so a reader sees how far one repeat's noise moves the ratio."""
    r = ours[metric] / theirs[metric]
    per_repeat = [a / b for a, b in zip(ours["useful_per_s_by_repeat"], theirs["useful_per_s_by_repeat"])]
    shown = f"{r:.3f} (by repeat: {', '.join(f'{x:.3f}' for x in per_repeat)})" if len(per_repeat) > 1 else round(r, 3)
    return verdict(target, shown, r >= threshold)


def build_report(cells: list[Cell], plan_times: list[float], args, info: dict) -> dict:
    rows, verdicts = [], []
    model_config = info["model"]
    for cell in cells:
        own_peaks = [run["own_metrics"]["peak_tflops"] for run in cell.runs.get("shardtune", [])]
        peak = statistics.median([p for p in own_peaks if p]) if any(own_peaks) else None
        s = {c: summarize(cell, c, args.warmup, model_config, peak) for c in args.contenders}
        metric = "tokens_per_s" if cell.workload == "fixed" else "useful_per_s"
        for c in args.contenders:
            if not s[c]:
                continue
            row = {"workload": cell.workload, "stage": cell.stage, "contender": c, **s[c]}
            if kind(c) == "shardtune":
                for ref in ("minimal", "minimal_same", "trainer") + (("shardtune",) if c != "shardtune" else ()):
                    if s.get(ref):
                        row[f"vs_{ref}"] = round(s[c][metric] / s[ref][metric], 3)
            rows.append(row)
        st, tr, mi = s.get("shardtune"), s.get("trainer"), s.get("minimal")
        where = f"{cell.workload}, ZeRO-{cell.stage}"
        unit = "tokens/s" if cell.workload == "fixed" else "useful tokens/s"
        if st and mi and cell.workload == "fixed":
            verdicts.append(ratio_verdict(f"{where}: shardtune >= {TARGETS['fixed_vs_minimal']} x the minimal loop "
                                          f"with DeepSpeed's defaults ({unit})", st, mi, metric,
                                          TARGETS["fixed_vs_minimal"]))
        if st and tr and cell.workload == "fixed":
            verdicts.append(ratio_verdict(f"{where}: shardtune >= {TARGETS['fixed_vs_trainer']} x Trainer ({unit})",
                                          st, tr, metric, TARGETS["fixed_vs_trainer"]))
            verdicts.append(ratio_verdict(f"{where}: goal, shardtune >= {TARGETS['fixed_vs_trainer_goal']} x Trainer "
                                          f"({unit})", st, tr, metric, TARGETS["fixed_vs_trainer_goal"]))
        if st and tr and cell.workload == "variable":
            verdicts.append(ratio_verdict(f"{where}: shardtune >= {TARGETS['variable_useful_vs_trainer']} x Trainer "
                                          f"({unit})", st, tr, metric, TARGETS["variable_useful_vs_trainer"]))
        if st and tr and not cell.compiled:  # compiled: the first steps include compiling, by design
            verdicts.append(verdict(f"{where}: time to first step <= Trainer's",
                                    f"{st['ttfs_s']:.1f} s vs {tr['ttfs_s']:.1f} s", st["ttfs_s"] <= tr["ttfs_s"]))
        if st:
            err = st.get("own_mfu_max_relative_error")
            verdicts.append(verdict(f"{where}: shardtune's own `mfu` = hand FLOPs / its step time / probed peak "
                                    f"(within {TARGETS['mfu_relative_error']:g})",
                                    "no mfu reported" if err is None else f"max relative difference {err:.1e}",
                                    err is not None and err <= TARGETS["mfu_relative_error"]))
    if plan_times:
        verdicts.append(verdict(f"`shardtune plan` < {TARGETS['plan_seconds']} s",
                                f"median {statistics.median(plan_times):.2f} s, max {max(plan_times):.2f} s",
                                max(plan_times) < TARGETS["plan_seconds"]))
    return {"rows": rows, "targets": verdicts, "plan_seconds": [round(t, 3) for t in plan_times], "info": info,
            "compiled_stages": sorted({cell.stage for cell in cells if cell.compiled}),
            "settings": {k: getattr(args, k) for k in ("quick", "workloads", "stages", "repeats", "steps", "warmup",
                                                       "grad_accum", "seed", "contenders")}}


def format_table(report: dict) -> str:
    refs = ["vs_minimal", "vs_minimal_same", "vs_trainer"]
    refs += ["vs_shardtune"] if any("vs_shardtune" in r for r in report["rows"]) else []
    names = {"vs_minimal": "vs minimal (defaults)", "vs_minimal_same": "vs minimal (same config)",
             "vs_trainer": "vs Trainer", "vs_shardtune": "vs shardtune"}
    head = ("| workload | ZeRO | contender | tokens/s | useful tokens/s | " + " | ".join(names[r] for r in refs)
            + " | MFU | time to first step (s) | peak RSS rank 0 / 1 (GB) |")
    lines = [head, "|" + "---|" * (8 + len(refs))]
    for r in report["rows"]:
        ratios = " | ".join(f"{r[k]:.3f}" if k in r else "" for k in refs)
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else ""
        lines.append(f"| {r['workload']} | {r['stage']} | {label(r['contender'])} | {r['tokens_per_s']:,} | "
                     f"{r['useful_per_s']:,} | {ratios} | {mfu} | {r['ttfs_s']:.1f} | "
                     f"{r['peak_rss_gb'][0]:.2f} / {r['peak_rss_gb'][1]:.2f} |")
    return "\n".join(lines)


def format_targets(report: dict) -> str:
    return "\n".join(f"- {'met' if v['met'] else '**missed**'}: {v['target']}: {v['measured']}"
                     for v in report["targets"])


def peak_note(report: dict) -> str:
    peaks = [p for r in report["rows"] if kind(r["contender"]) == "shardtune" for p in r.get("peak_tflops", []) if p]
    sources = {r.get("peak_tflops_source") for r in report["rows"] if r.get("peak_tflops_source")}
    if not peaks:
        return "shardtune reported no peak, so no MFU."
    return (f"MFU: model FLOPs (6 per weight and token, plus causal attention) over the measured step time, per "
            f"rank, against the peak shardtune {'probed' if sources == {'probe'} else 'used'} at start-up "
            f"({min(peaks) * 1000:.0f}-{max(peaks) * 1000:.0f} GFLOP/s per rank over its runs; source: "
            f"{', '.join(sorted(sources))}); the same peak for every contender of a cell.")


def write_results(path: Path, report: dict, command: str, others: list[float], elapsed: float,
                  measured: float) -> None:
    info = report["info"]
    s = report["settings"]
    redone = sum(run["attempts"] > 1 for cell in report["runs"].values() for runs in cell.values() for run in runs)
    m = info["model"]
    gb = W.MICRO * s["grad_accum"] * W.WORLD
    lines = [
        f"Measured {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} on {machine_words()}, "
        f"shared with other work, Python {platform.python_version()}, "
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
        f"{s['warmup']} not counted; {s['repeats']} repeat(s) per contender, alternating in mirrored order "
        f"({'; '.join(map(label, run_order(s['contenders'])))}; then back) so that shardtune runs next to the floor "
        "and the Trainer.",
        f"Contenders: shardtune with its defaults for a fine-tune of {LONG_RUN_STEPS} steps (`train.compile: auto` "
        f"then compiles at ZeRO {', '.join(map(str, report.get('compiled_stages', []))) or '(none)'}: those rows "
        "are compiled and their time to first step includes compiling); the minimal loop (deepspeed.initialize, "
        "forward, backward, step) "
        "with the DeepSpeed config a person writes by hand (batch sizes, AdamW, the stage; everything else "
        "DeepSpeed's default: **the floor**, shardtune / it measures shardtune's choices) and with the config "
        "shardtune rendered (shardtune / it measures only shardtune's loop overhead); the HF Trainer with the "
        "hand-written config.",
    ]
    if "fixed_data" in info:
        lines.append(f"Fixed: every sequence one sample of exactly {W.SEQ_LEN} tokens, all labels trained "
                     f"({W.SEQ_LEN - 1} loss positions per row); all contenders train the same rows at the same "
                     "step on the same rank (checked for the Trainer from what its collator received).")
    if "chat_lengths" in info:
        c, v = info["chat_lengths"], info.get("variable_data", {})
        lines.append(f"Variable: chat rows of median {c['median']} tokens (p10 {c['p10']}, p90 {c['p90']}, max "
                     f"{c['max']}), loss on the assistant turn; shardtune packs them "
                     f"({v.get('packing_efficiency', 0):.1%} of positions real) and the minimal loops train on "
                     "the same packed batches; the Trainer pads each batch of 4 samples to its longest.")
    lines += ["", "tokens/s counts every position computed (padding included); useful tokens/s counts "
              "loss-carrying positions. Ratios compare tokens/s on fixed data and useful tokens/s on variable data. "
              + peak_note(report),
              "", format_table(report), "", format_targets(report)]
    write_section(path, "Throughput", START, END, "\n".join(lines))


def library_versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("torch", "deepspeed", "transformers", "accelerate"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: fixed data, ZeRO-2, small model, few steps")
    p.add_argument("--workloads", nargs="+", choices=("fixed", "variable"))
    p.add_argument("--hidden", type=int, default=W.HIDDEN,
                   help=f"model width (a multiple of 32; targets are set at {W.HIDDEN})")
    p.add_argument("--layers", type=int, default=W.LAYERS, help=f"decoder layers (targets are set at {W.LAYERS})")
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
    p.add_argument("--wait_for_load", type=float,
                   help="before starting, wait until the 1-minute load average is below this")
    p.add_argument("--wait_timeout", type=float, default=600.0, help="give up waiting for a low load after this (s)")
    p.add_argument("--max_other_cores", type=float,
                   help="redo a run when other processes used more CPU than this during it "
                        "(default 0.15; none with --quick)")
    p.add_argument("--retries", type=int, default=5, help="how often a disturbed run is redone before it is kept")
    p.add_argument("--keep", action="store_true", help="keep checkpoints of the shardtune runs")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                   help="also run shardtune from a patched copy of the repository at DIR (A/B of a change)")
    p.add_argument("--ab", action="append", default=[], metavar="NAME=SPEC",
                   help="also run shardtune with overrides: 'section.field=value' and 'ds:dotted.key=value' items, "
                        "separated by spaces (A/B of a setting)")
    args = p.parse_args(argv)
    try:
        args.variants = {k: Path(v).resolve() for k, v in (item.split("=", 1) for item in args.variant)}
        args.ab = dict(item.split("=", 1) for item in args.ab)
    except ValueError:
        p.error("--variant takes NAME=DIR and --ab takes NAME=SPEC")
    args.contenders = list(args.contenders) + [f"shardtune:{k}" for k in [*args.variants, *args.ab]]
    quick = args.quick
    defaults = {"workloads": ["fixed"] if quick else ["fixed", "variable"], "stages": [2] if quick else [2, 3],
                "repeats": 1 if quick else 3, "steps": 4 if quick else 16, "warmup": 1 if quick else 4,
                "plan_runs": 2 if quick else 5, "max_other_cores": None if quick else 0.15}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.hidden < 32 or args.hidden % 32 or args.layers < 1:
        p.error(f"--hidden {args.hidden} must be a positive multiple of 32 (head dim 32) and --layers {args.layers} "
                f"at least 1")
    if args.warmup >= args.steps - 1:
        p.error(f"--warmup {args.warmup} leaves no steady steps of --steps {args.steps}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python -m bench.throughput " + " ".join(sys.argv[1:] if argv is None else argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - started:6.0f} s] {msg}", flush=True)

    cells, info = prepare_cells(args, work, log)
    if not args.quick:  # a quick run's numbers are not judged: it need not even out the first contender's start
        warm_up(cells[0], work, args, log)
    if args.wait_for_load:
        wait_for_quiet(args.wait_for_load, args.wait_timeout, log)
    measuring = time.time()
    plan_times = time_plan(args.plan_runs)
    log(f"shardtune plan: {', '.join(f'{t:.2f}' for t in plan_times)} s")
    others = []
    order = run_order(args.contenders)
    for cell in cells:
        for rep in range(args.repeats):
            for contender in (order if rep % 2 == 0 else order[::-1]):
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
