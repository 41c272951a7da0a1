"""Memory benchmark: the planner's per-rank estimate against the real trainer's memory, on CPU.

    .venv/bin/python -m bench.memory --markdown      # 2 baselines + 7 variants × 2 allocators, ~15 min on 2 cores
    .venv/bin/python -m bench.memory --variants 2 3 --save m.json
    .venv/bin/python -m bench.memory --replay m.json # recompute the estimates against saved measurements
    .venv/bin/python -m bench.memory --precision bf16 --variants 1 2 3   # mixed precision, fp32 gradient sums
    .venv/bin/python -m bench.memory --variants 1+opt --set zero.overlap_comm=true   # run-config overrides
    .venv/bin/python -m bench.memory --untied --variants 2+opt   # SmolLM2 with an untied head, as large models

Runs `shardtune launch` (2 ranks, torchrun, gloo, fp32 or bf16, micro batch 1, seq_len 128) on SmolLM2-135M-Instruct
(134.5 M parameters, tied embeddings) for ZeRO 0-3 and stages 1-3 with `zero.offload_optimizer: cpu`, one
run at a time, and reads every rank's kernel counters in /proc: once step 1 has been logged (the Adam
moments exist), the peak RSS is reset (`echo 5 > /proc/PID/clear_refs`) and read again when step 3 has
been logged, so the peak covers steps 2 and 3 whole: the steady state of a long run.

Each variant runs twice, because CPU RAM is not a GPU's caching allocator:
- with `MALLOC_MMAP_THRESHOLD_=65536`, glibc maps every block over 64 KiB on its own and unmaps it when
  freed, so RSS follows the bytes allocated, like `max_memory_allocated` on a GPU. This validates the GPU
  estimate (default margins, the measured process runtime instead of `cuda_runtime`).
- with glibc's defaults, freed blocks below its dynamic threshold (up to 32 MiB: activations, per-layer
  gradients) stay in the heap, and the optimizer step's large buffers are mapped on top of them. This is
  what a CPU run really uses; `launcher.planning.memory_plan.CPU_MARGINS` (fragmentation = 100% of the
  transient) is compared with it.

On CPU the device and the host are the same RAM, so a rank's estimate is the device estimate plus this
rank's share of the offloaded optimizer. The runtime is measured: the same trainer on a 1-layer, 64-wide
model with SmolLM2's tokenizer (same imports, gloo, data, DeepSpeed), minus that model's own estimate.
Waits until the 1-minute load average is below --max-load before each run (2 shared cores).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from bench._runner import (
    PYTHON,
    REPO,
    SHARDTUNE,
    RunFailed,
    Tree,
    machine_words,
    proc_status,
    reset_peak_rss,
    run_tree,
    wait_for_quiet,
)
from launcher.contract.config import apply_overrides, validate_config
from launcher.contract.run_dir import RunDir
from launcher.planning.memory import (
    GB,
    Margins,
    MemoryEstimate,
    ZeroSettings,
    estimate_memory,
    optimizer_temporaries,
)
from launcher.planning.memory_plan import CPU_MARGINS, resolved_setup
from launcher.planning.model_size import ModelCounts, counts_from_path

SMOLLM2 = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
DATA = REPO / "examples" / "data" / "demo_train.jsonl"
# name -> (zero.stage, zero.offload_optimizer: cpu); offload needs a ZeRO optimizer, so stage 0 has none.
VARIANTS = {"0": (0, False), "1": (1, False), "2": (2, False), "3": (3, False),
            "1+opt": (1, True), "2+opt": (2, True), "3+opt": (3, True)}
MODES = {"returned": {"MALLOC_MMAP_THRESHOLD_": "65536"}, "glibc": {}}
# The baseline model: SmolLM2's tokenizer and vocabulary, one layer of width 64 (3.2 M parameters).
SKELETON = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 1,
            "num_key_value_heads": 1, "head_dim": 64}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                   "special_tokens_map.json")


@dataclass
class Measurement:
    """Worst rank's bytes from /proc/PID/status for one run."""

    variant: str
    mode: str
    train_peak: int = 0  # VmHWM over steps 2-3
    init_peak: int = 0  # VmHWM from start to the end of step 1 (loading, deepspeed.initialize, first step)
    ds_config: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # the resolved run config the launcher wrote
    seconds: float = 0.0
    load_before: float = 0.0


def run_config(name: str, mode: str, model: Path, run_dir: Path, steps: int, seq_len: int,
               precision: str = "fp32", overrides: tuple[str, ...] = ()) -> dict:
    """fp32: one micro-batch per step. bf16: two (global batch 4), so gradients sum in fp32 between them, as the
    launcher renders it for any bf16 run with accumulation (data_types.grad_accum_dtype). `overrides` (`--set`,
    KEY=VALUE as on shardtune's command line) apply to the variants, not to the baseline."""
    stage, offload = VARIANTS.get(name, (2, False))
    raw = {
        "model": {"name_or_path": str(model)},
        "data": {"path": str(DATA), "format": "messages", "seq_len": seq_len},
        "train": {"max_steps": steps, "micro_batch_size": 1, "global_batch_size": 2 if precision == "fp32" else 4,
                  "lr": 1e-5, "seed": 0, "precision": precision},
        "zero": {"stage": stage, "offload_optimizer": "cpu" if offload else "none"},
        "launch": {"nodes": 1, "procs_per_node": 2, "device": "cpu", "env": MODES[mode]},
        "wandb": {"mode": "disabled"},
        "output_dir": str(run_dir),
    }
    return apply_overrides(raw, list(overrides)) if name in VARIANTS else raw


def measure(name: str, mode: str, model: Path, work: Path, steps: int, seq_len: int, max_load: float,
            precision: str = "fp32", overrides: tuple[str, ...] = ()) -> Measurement:
    """One `shardtune launch`, watched by bench._runner: the peak is reset once step 1 is logged, read at step 3."""
    run = RunDir(work / f"run-{name}-{mode}")
    shutil.rmtree(run.path, ignore_errors=True)
    cfg_path = work / f"{name}-{mode}.yaml"
    cfg_path.write_text(yaml.safe_dump(run_config(name, mode, model, run.path, steps, seq_len, precision,
                                                      overrides)))
    load = wait_for_quiet(max_load, 3600, lambda m: print(f"  {m}", file=sys.stderr, flush=True), fail=True)
    result = Measurement(name, mode, load_before=load)

    def watch(tree: Tree) -> None:
        if len(tree.ranks) < 2 or result.train_peak:
            return
        try:
            done = len(run.train_metrics())
        except ValueError:  # a row being written right now
            return
        pids = list(tree.ranks.values())
        if done >= 1 and not result.init_peak:
            result.init_peak = max(proc_status(pid).get("VmHWM", 0) for pid in pids)
            for pid in pids:
                reset_peak_rss(pid)  # VmHWM := current RSS
        elif done >= 3 and result.init_peak:
            result.train_peak = max(proc_status(pid).get("VmHWM", 0) for pid in pids)

    log_path = work / f"{name}-{mode}.log"
    try:
        done = run_tree([str(SHARDTUNE), "launch", str(cfg_path)], log_path, REPO, poll=0.05, watch=watch)
    except RunFailed as exc:
        raise SystemExit(f"{name} ({mode}): {exc}") from None
    result.seconds = done.wall
    if not result.train_peak:
        raise SystemExit(f"{name} ({mode}): steps 2-3 not measured\n{log_path.read_text()[-3000:]}")
    result.ds_config, result.config = run.read_ds_config(), run.read_config()
    shutil.rmtree(run.path, ignore_errors=True)  # a 135M model's checkpoint and export: ~2 GB per run
    return result


def _derived_model(out: Path, code: str, *args: str) -> Path:
    """A model made from SmolLM2 by `code` (run with SmolLM2's path, `out` and `args`), with SmolLM2's tokenizer."""
    if not (out / "model.safetensors").is_file():
        subprocess.run([str(PYTHON), "-c", code, str(SMOLLM2), str(out), *args], check=True, cwd=REPO,
                       capture_output=True)
    for name in TOKENIZER_FILES:
        if (SMOLLM2 / name).is_file():
            shutil.copy(SMOLLM2 / name, out / name)
    return out


def make_skeleton(work: Path) -> Path:
    """SmolLM2's tokenizer with a 1-layer, 64-wide random model: the baseline's model without weights to speak of."""
    code = ("import json, sys, torch, transformers\n"
            "cfg = transformers.AutoConfig.from_pretrained(sys.argv[1])\n"
            "for k, v in json.loads(sys.argv[3]).items(): setattr(cfg, k, v)\n"
            "torch.manual_seed(0)\n"
            "model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)\n"
            "model.save_pretrained(sys.argv[2])\n")
    return _derived_model(work / "skeleton", code, json.dumps(SKELETON))


def make_untied(work: Path) -> Path:
    """SmolLM2 with its head untied: a copy of the embedding as its own lm_head (162.8 M parameters). The head's
    gradient is then whole at the start of backward, at the activation peak, as in Llama-3 and most large models,
    instead of at its end."""
    code = ("import sys, torch, transformers\n"
            "model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], tie_word_embeddings=False,\n"
            "                                                          dtype=torch.float32)\n"
            "model.lm_head.weight.data.copy_(model.model.embed_tokens.weight.data)\n"
            "model.save_pretrained(sys.argv[2])\n")
    return _derived_model(work / "untied", code)


def estimate_for(counts: ModelCounts, ran: Measurement, margins: Margins) -> MemoryEstimate:
    """The planner's estimate of what ran: the Setup the launcher's own plan derives from the resolved run config and
    the DeepSpeed config it rendered (the chunked loss, the attention kernel, the stage and buckets it chose)."""
    if not ran.config:
        raise SystemExit(f"{ran.variant} ({ran.mode}): saved before the run config was recorded; measure it again")
    setup = resolved_setup(validate_config(ran.config), ran.ds_config)
    return estimate_memory(counts, setup, ZeroSettings.from_deepspeed(ran.ds_config), margins)


@dataclass
class RankEstimate:
    """A GPU estimate folded onto one CPU rank: device and host are the same RAM, and there is no CUDA."""

    kept: int  # device model states + staging + this rank's share of the offloaded optimizer
    forward_backward: int
    step: int  # the phase after activations: the device's buffers, or the host's AdamW temporaries if offloaded
    fragmentation: int

    @classmethod
    def of(cls, counts: ModelCounts, est: MemoryEstimate) -> RankEstimate:
        d, s = est.device, est.setup
        temps = optimizer_temporaries(counts, s) if s.offload_optimizer else 0
        host = (est.host["offloaded_optimizer"] + est.host["offloaded_params"]) // s.gpus_per_node - temps
        kept = d["params"] + d["gradients"] + d["optimizer_states"] + d["offload_staging"] + host
        # Offloaded, the device's buffers of that phase (a tied head's last gradient) are gone by the host's step.
        step = max(d["optimizer_step_buffers"], temps) if s.offload_optimizer else d["optimizer_step_buffers"]
        return cls(kept, est.forward_backward, step, d["fragmentation"])

    def total(self, runtime: int) -> int:
        return self.kept + max(self.forward_backward, self.step) + self.fragmentation + runtime


def runtime_of(base: Measurement, margins: Margins, skeleton_counts: ModelCounts) -> int:
    own = RankEstimate.of(skeleton_counts, estimate_for(skeleton_counts, base, margins))
    return base.train_peak - own.total(0)


def _gb(b: float) -> str:
    return f"{b / GB:.2f}"


GPU_RULES = Margins(pinned_rounding=None)
"""The GPU margins for a run on CPU, which pins nothing: its offloaded buffers take the bytes DeepSpeed asks for."""
HEADERS = ("variant", "ran as", "model states", "staging + host", "fwd/bwd", "step", "runtime", "estimate",
           "measured", "ratio", "CPU estimate", "measured (glibc)", "ratio", "kept by glibc", "init peak")


def table_rows(results: dict, counts: ModelCounts) -> list[list[str]]:
    """One row per variant: the GPU-rules estimate against allocated-like RSS, the CPU margins against default RSS."""
    skel = ModelCounts(**results["skeleton_counts"])
    gpu_rt = runtime_of(Measurement(**results["baseline"]["returned"]), GPU_RULES, skel)
    cpu_rt = runtime_of(Measurement(**results["baseline"]["glibc"]), CPU_MARGINS, skel)
    rows = []
    for name, runs in results["variants"].items():
        ret, lib = Measurement(**runs["returned"]), Measurement(**runs["glibc"])
        gpu = RankEstimate.of(counts, est := estimate_for(counts, ret, GPU_RULES))
        cpu = RankEstimate.of(counts, estimate_for(counts, lib, CPU_MARGINS))
        d = est.device
        rows.append([f"ZeRO-{name}", est.setup.label(), _gb(d["params"] + d["gradients"] + d["optimizer_states"]),
                     _gb(gpu.kept - est.model_states), _gb(gpu.forward_backward), _gb(gpu.step), _gb(gpu_rt),
                     _gb(gpu.total(gpu_rt)), _gb(ret.train_peak), f"{ret.train_peak / gpu.total(gpu_rt):.2f}",
                     _gb(cpu.total(cpu_rt)), _gb(lib.train_peak), f"{lib.train_peak / cpu.total(cpu_rt):.2f}",
                     _gb(lib.train_peak - ret.train_peak), _gb(lib.init_peak)])
    return rows


def table(rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADERS)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(HEADERS), *(line(r) for r in rows)])


def footer(results: dict) -> str:
    """Where the runtimes come from, and how quiet the machine was."""
    skel = ModelCounts(**results["skeleton_counts"])
    base = {mode: Measurement(**m) for mode, m in results["baseline"].items()}
    gpu_rt = runtime_of(base["returned"], GPU_RULES, skel)
    cpu_rt = runtime_of(base["glibc"], CPU_MARGINS, skel)
    loads = [m["load_before"] for runs in [results["baseline"], *results["variants"].values()] for m in runs.values()]
    return (f"runtime per rank: the trainer on the {skel.total / 1e6:.1f} M skeleton peaks at "
            f"{_gb(base['returned'].train_peak)} GB (64 KiB threshold) / {_gb(base['glibc'].train_peak)} GB (glibc), "
            f"minus its own estimate: {_gb(gpu_rt)} / {_gb(cpu_rt)} GB; a process that only imports torch, deepspeed, "
            f"transformers and datasets and joins gloo: {_gb(results['import_only_rss'])} GB. "
            f"{results['when']}, {results['machine']}; 1-min load average before each run "
            f"{min(loads):.2f}-{max(loads):.2f}.")


def markdown(rows: list[list[str]], results: dict) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join([*lines, "", footer(results)])


def import_only_rss(work: Path) -> int:
    """RSS of a process that imports torch, deepspeed, transformers and datasets and joins a 1-rank gloo group."""
    code = ("import resource, sys, torch, deepspeed, transformers, datasets, torch.distributed as d\n"
            "d.init_process_group('gloo', init_method='file://' + sys.argv[1], rank=0, world_size=1)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n")
    out = subprocess.run([str(PYTHON), "-c", code, str(work / "gloo-init")], capture_output=True, text=True,
                         check=True, cwd=REPO)
    return int(out.stdout.strip().splitlines()[-1])


def collect(args, work: Path) -> dict:
    """Run the baselines and the variants, one at a time, and return everything measured (JSON-able)."""
    if not (SMOLLM2 / "config.json").is_file():
        subprocess.run([str(PYTHON), "-m", "examples.demo_model", str(SMOLLM2)], check=True, cwd=REPO)
    skeleton = make_skeleton(work)
    model = make_untied(work) if args.untied else SMOLLM2
    results = {"model": "SmolLM2-135M, untied" if args.untied else "SmolLM2-135M",
               "counts": counts_from_path(model).to_dict(),
               "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "machine": f"{platform.node()}, {machine_words()}, Python "
                          f"{platform.python_version()}, glibc {platform.libc_ver()[1]}",
               "seq_len": args.seq_len, "steps": args.steps, "precision": args.precision, "set": args.set,
               "import_only_rss": import_only_rss(work),
               "skeleton_counts": counts_from_path(skeleton).to_dict(), "baseline": {}, "variants": {}}
    for mode in MODES:
        base = measure("baseline", mode, skeleton, work, args.steps, args.seq_len, args.max_load, args.precision)
        results["baseline"][mode] = asdict(base)
        print(f"baseline ({mode}): {_gb(results['baseline'][mode]['train_peak'])} GB", flush=True)
    for name in args.variants:
        results["variants"][name] = {}
        for mode in MODES:
            m = measure(name, mode, model, work, args.steps, args.seq_len, args.max_load, args.precision,
                        tuple(args.set))
            results["variants"][name][mode] = asdict(m)
            print(f"ZeRO-{name} ({mode}): {_gb(m.train_peak)} GB over steps 2-3, {_gb(m.init_peak)} GB up to step 1, "
                  f"{m.seconds:.0f} s, load {m.load_before:.2f}", flush=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=4,
                    help="optimizer steps (>= 4: steps 2-3 are measured, then the save)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16 runs two micro-batches per step, so its gradients sum in fp32")
    ap.add_argument("--max-load", type=float, default=1.0, help="wait until the 1-min load average is below this")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one, removed)")
    ap.add_argument("--save", type=Path, default=None, help="write the measurements as JSON")
    ap.add_argument("--replay", type=Path, default=None, help="skip running: compare with saved measurements")
    ap.add_argument("--markdown", action="store_true", help="also print the table as Markdown for RESULTS.md")
    ap.add_argument("--untied", action="store_true",
                    help="train SmolLM2 with its head untied (a copy of the embedding), as large models are")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="run-config overrides for the variants, e.g. zero.overlap_comm=true (as a GPU run renders)")
    args = ap.parse_args()
    if args.steps < 4:
        ap.error("--steps must be at least 4: step 1 allocates the optimizer, steps 2-3 are measured, the save follows")
    if args.replay:
        results = json.loads(args.replay.read_text())
    else:
        work = args.work or Path(tempfile.mkdtemp(prefix="shardtune-bench-memory-"))
        work.mkdir(parents=True, exist_ok=True)
        try:
            results = collect(args, work)
        finally:
            if args.work is None:
                shutil.rmtree(work, ignore_errors=True)
        if args.save:
            args.save.write_text(json.dumps(results, indent=1) + "\n")
    if "counts" in results:  # recorded since --untied
        counts = ModelCounts(**results["counts"])
    else:
        counts = counts_from_path(SMOLLM2 if (SMOLLM2 / "config.json").is_file()
                                  else REPO / "tests" / "data" / "model_configs" / "smollm2_135m.json")
    rows = table_rows(results, counts)
    precision = results.get("precision", "fp32")
    batch = "global batch 2" if precision == "fp32" else "global batch 4 (fp32 gradient sums)"
    if results.get("set"):
        batch += f", variants with {' '.join(results['set'])}"
    print(f"\n{results.get('model', 'SmolLM2-135M')} ({counts.total:,} parameters), 2 ranks, {precision}, "
          f"micro batch 1, {batch}, "
          f"seq_len {results['seq_len']}; "
          f"GB = 1e9 bytes per rank, worst rank; {results['when']}, {results['machine']}")
    print(table(rows))
    print(footer(results))
    if args.markdown:
        print()
        print(markdown(rows, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
