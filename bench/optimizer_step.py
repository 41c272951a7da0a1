"""The optimizer step on CPU: torch's AdamW as DeepSpeed builds it by default (`torch_adam`, per-tensor
update) against its fused kernel (`fused: true`, what shardtune renders), at one thread per rank.

    python -m bench.optimizer_step                # the update alone, on a flat fp32 tensor per size
    python -m bench.optimizer_step --engine       # engine.step() of a real ZeRO-2 engine, 2 gloo ranks

The sizes are the flat partitions a ZeRO rank steps: 1.7M elements is one of 2 ranks' share of the
throughput bench's model (hidden 256, 4 layers: 3.4M parameters). `--engine` runs that model under
torchrun and times `engine.step()` only (the update, the gradient norm and clipping, and ZeRO-2's
all-gather of the updated partitions), after a barrier, median of 35 steps. The baseline is
DeepSpeed's own construction of torch's AdamW (`foreach` left to torch, which on CPU means the
per-tensor loop), as a user gets it from `"torch_adam": true`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench._runner import PYTHON, REPO, machine_words
from bench._workloads import make_model

SIZES = (1_700_000, 3_400_000, 50_000_000)


def time_update(elements: int, fused: bool, repeats: int = 30) -> float:
    """Median seconds of one AdamW step over a flat fp32 tensor of `elements`."""
    import torch

    p = torch.nn.Parameter(torch.randn(elements))
    p.grad = torch.randn(elements)
    opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.01, **({"fused": True} if fused else {}))
    for _ in range(3):
        opt.step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def engine_rank(model_dir: str, fused: bool, steps: int = 40) -> None:
    """One torchrun rank: a ZeRO-2 engine on the throughput bench's model; rank 0 prints engine.step()'s time."""
    import deepspeed
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    deepspeed.init_distributed("gloo")
    model = LlamaForCausalLM.from_pretrained(model_dir)
    params = {"lr": 1e-4, "torch_adam": True, **({"fused": True} if fused else {})}
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 8,
          "optimizer": {"type": "AdamW", "params": params}, "zero_optimization": {"stage": 2},
          "gradient_clipping": 1.0}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    ids = torch.randint(0, 512, (4, 64))
    times = []
    for _ in range(steps):
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        torch.distributed.barrier()
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    if int(os.environ["RANK"]) == 0:
        print(json.dumps({"fused": fused, "params": sum(p.numel() for p in model.parameters()),
                          "step_ms": statistics.median(times[5:]) * 1e3}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", action="store_true", help="time engine.step() of a ZeRO-2 engine on 2 ranks")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per variant (--engine)")
    parser.add_argument("--rank", nargs=2, metavar=("MODEL_DIR", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        return engine_rank(args.rank[0], args.rank[1] == "fused")
    print(f"# {machine_words()}, 1 thread per process")
    if not args.engine:
        import torch

        torch.set_num_threads(1)
        print("| elements | torch AdamW, DeepSpeed's default (ms) | fused (ms) | speed-up |\n|---|---|---|---|")
        for n in SIZES:
            slow, fast = time_update(n, False), time_update(n, True)
            print(f"| {n:,} | {slow * 1e3:.2f} | {fast * 1e3:.2f} | {slow / fast:.1f} × |")
        return
    print("| run | torch AdamW, DeepSpeed's default: engine.step() (ms) | fused (ms) |\n|---|---|---|")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(make_model(Path(tmp) / "model", quick=False))
        for repeat in range(args.repeats):
            row = {}
            for variant in ("unfused", "fused"):
                out = subprocess.run([str(PYTHON), "-m", "torch.distributed.run", "--nproc_per_node=2",
                                      "--master_port=29613", "-m", "bench.optimizer_step", "--rank", model_dir,
                                      variant], cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
                row[variant] = json.loads(next(ln for ln in out.splitlines() if ln.startswith("{")))["step_ms"]
            print(f"| {repeat + 1} | {row['unfused']:.2f} | {row['fused']:.2f} |")


if __name__ == "__main__":
    main()
