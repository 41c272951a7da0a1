r"""Sample shardtune's ranks with py-spy in the steady state and say where a step's time goes.

    .venv/bin/pip install py-spy        # the one dev tool this needs
    .venv/bin/python -m bench.throughput --steps 6 --warmup 2 --repeats 1 --contenders minimal \
        --results /tmp/scratch.md     # leaves model, data and configs in its --work directory
    .venv/bin/python -m bench._profile_shardtune --workload fixed     # or variable; --code_dir for a patched copy

It launches `shardtune launch` on the bench's config for --steps steps, waits until --start_after
steps are logged, then records every rank for --duration seconds (py-spy --nonblocking, so the
ranks are never paused) and prints, per rank, the inclusive share of the training loop's samples
spent in each part of the step, and that share as milliseconds per step.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from bench._runner import PYTHON, REPO, SHARDTUNE, Tree, run_tree
from launcher.contract.run_dir import RunDir

# (label, regex on one frame "function (file:line)"), inclusive: a sample counts when any frame matches.
PARTS = [
    ("training loop (Loop.run)", r"^Loop\.run \("),
    ("  batch: collate + copy (Loop.batch)", r"^(Loop\.batch|collate) \("),
    ("  model forward", r"^DeepSpeedEngine\.forward \("),
    ("  loss (token_loss_sum)", r"^token_loss_sum \("),
    ("  engine.backward", r"^DeepSpeedEngine\.backward \("),
    ("  engine.step", r"^DeepSpeedEngine\.step \("),
    ("  log-step metrics (Window.metrics)", r"^_?Window\.metrics \("),
    ("    local_memory", r"^local_memory \("),
    ("  trainer collectives (all_reduce_*, all_gather_*)",
     r"^(all_reduce_sum|all_reduce_max|all_gather_objects|all_gather_floats) \(trainer/distributed"),
    ("  metrics file, progress bar (Session.on_log)", r"^Session\.on_log \("),
    ("  grad norm read", r"get_global_grad_norm \("),
    ("  on_step_end (Session)", r"^Session\.on_step_end \("),
    ("    stop agreement (StopRequest.agreed)", r"^StopRequest\.agreed \("),
    ("  sampler.next_batch", r"^GlobalBatchSampler\.next_batch \("),
]


def summarize(raw: Path) -> tuple[list[tuple[str, int, float]], int, int]:
    counts = collections.Counter()
    total = 0
    compiled = [(name, re.compile(rx)) for name, rx in PARTS]
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        frames = stack.split(";")
        total += n
        for name, rx in compiled:
            if any(rx.search(f) for f in frames):
                counts[name] += n
    loop = counts[PARTS[0][0]] or 1
    return [(name, counts[name], counts[name] / loop) for name, _ in PARTS], loop, total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/shardtune-bench-throughput", help="a bench.throughput work directory")
    p.add_argument("--workload", default="fixed", choices=("fixed", "variable"))
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--start_after", type=int, default=6)
    p.add_argument("--duration", type=int, default=30)
    p.add_argument("--rate", type=int, default=250)
    p.add_argument("--code_dir", help="profile a patched copy of the repository instead")
    p.add_argument("--out", default="/tmp/shardtune-profile")
    p.add_argument("--log_every", type=int, default=1)
    args = p.parse_args()

    py_spy = shutil.which("py-spy", path=str(PYTHON.parent)) or shutil.which("py-spy")
    if not py_spy:
        print("py-spy not found: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    work, out = Path(args.work), Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    run = RunDir(out / "run")
    code = Path(args.code_dir).resolve() if args.code_dir else REPO
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    if args.code_dir:
        env["PYTHONPATH"] = str(code)
    argv = [str(SHARDTUNE), "launch", str(work / f"{args.workload}.yaml"), f"zero.stage={args.stage}",
            f"output_dir={run.path}", f"train.max_steps={args.steps}", f"train.log_every={args.log_every}"]
    spies: dict[int, subprocess.Popen] = {}
    steps: dict[str, int] = {}

    def last_step() -> int:
        try:
            rows = run.train_metrics()
        except ValueError:  # a row being written right now
            return steps.get("last", 0)
        return rows[-1]["step"] if rows else 0

    def watch(tree: Tree) -> bool:
        """Once --start_after steps are logged, record every rank; end the run when the recordings are done."""
        if not spies:
            if last_step() >= args.start_after and len(tree.ranks) == 2:
                steps["first"] = last_step()
                for rank, pid in sorted(tree.ranks.items()):
                    spies[rank] = subprocess.Popen(
                        [py_spy, "record", "--pid", str(pid), "--duration", str(args.duration), "--rate",
                         str(args.rate), "--nonblocking", "--format", "raw", "--output", str(out / f"rank{rank}.txt")],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return False
        if any(spy.poll() is None for spy in spies.values()):
            return False
        steps["last"] = last_step()
        return True

    run_tree(argv, out / "log.txt", code, env, timeout=3600, watch=watch)
    if "last" not in steps:
        print(f"shardtune ended before step {args.start_after} was profiled; see {out / 'log.txt'}", file=sys.stderr)
        return 1
    n_steps = max(1, steps["last"] - steps["first"])
    step_s = args.duration / n_steps
    print(f"{args.workload}, ZeRO-{args.stage}: {n_steps} steps in {args.duration} s sampled "
          f"({step_s * 1000:.0f} ms per step)")
    for rank in sorted(spies):
        rows, loop, total = summarize(out / f"rank{rank}.txt")
        print(f"\nrank {rank}: {loop} samples in the loop ({total} in all)")
        for name, n, share in rows:
            print(f"  {name:<44} {share:7.2%}  {share * step_s * 1000:8.1f} ms/step  ({n})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
