"""DeepSpeed's JIT-built ops when two Python environments share a $HOME: what each start pays to load them.

    .venv/bin/python -m bench.op_builds              # ~5 min on 2 cores

Each start is a fresh process that forms a 1-rank gloo group through DeepSpeed, whose CPU accelerator loads its
shared-memory comm op as the group forms (on GPUs, FusedAdam and CPUAdam load the same way, and nvcc takes
minutes). Starts alternate between this environment and a second one: a venv of the same base Python with its
own DeepSpeed (a copy) that sees this one's other packages through a .pth file, as a second venv or conda env of
the same user would have. Both modes start from an empty cache folder of the bench's own, so each environment's
first start builds:

- baseline, torch's default folder (<cache>/torch_extensions/py<version>_cpu), what plain DeepSpeed uses;
- shardtune, the folder a rank pins before its group forms (trainer/ops.pin_build_dir).

A start "built" when the op's .so changed under it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from bench._runner import PYTHON, REPO, machine_words

# argv: mode, file store. Prints the seconds init_distributed took (the op's load, and its build if any).
START = """
import json, sys, time
if sys.argv[1] == "shardtune":
    from trainer.ops import pin_build_dir
    pin_build_dir()
import deepspeed, torch.distributed as dist
dist.init_process_group("gloo", init_method=f"file://{sys.argv[2]}", rank=0, world_size=1)
t0 = time.time()
deepspeed.init_distributed(dist_backend="gloo")
print("RESULT " + json.dumps({"load_s": time.time() - t0}))
"""
ORDER = ("this", "other", "this", "other", "this")


def second_environment(where: Path) -> Path:
    """A venv of this one's base Python with DeepSpeed installed in it (a copy: its op sources have paths of their
    own, as in any second environment) and this venv's other packages seen through a .pth file; its python."""
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(where)], check=True)
    site = next(where.glob("lib/python*/site-packages"))
    ours = Path(sysconfig.get_paths()["purelib"])
    shutil.copytree(ours / "deepspeed", site / "deepspeed", symlinks=True)
    for info in ours.glob("deepspeed-*.dist-info"):
        shutil.copytree(info, site / info.name)
    (site / "shared.pth").write_text(f"import site; site.addsitedir({str(ours)!r})\n")
    return where / "bin" / "python"


def builds(cache: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in (cache / "torch_extensions").glob("*/deepspeed_shm_comm/*.so")}


def start(python: Path, mode: str, cache: Path, store: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    env.update(XDG_CACHE_HOME=str(cache), DS_ACCELERATOR="cpu", LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")
    before, t0 = builds(cache), time.time()
    out = subprocess.run([str(python), "-c", START, mode, str(store)], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return {**json.loads(out.stdout.split("RESULT ", 1)[1]), "wall_s": time.time() - t0,
            "built": builds(cache) != before}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pythons = {"this": PYTHON, "other": second_environment(work / "env2")}
        rows = []
        for mode in ("baseline", "shardtune"):
            cache = work / f"cache-{mode}"
            for i, which in enumerate(ORDER):
                r = start(pythons[which], mode, cache, work / f"store-{mode}-{i}")
                rows.append((mode, i + 1, which, r))
                print(f"{mode:9} start {i + 1} ({which:5} environment): op loaded in {r['load_s']:6.1f} s "
                      f"({'built' if r['built'] else 'reused'}; process {r['wall_s']:.1f} s)", flush=True)
    print(f"\n{machine_words()}, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| start | environment | baseline: op load (s) | shardtune: op load (s) |\n|---|---|---|---|")
    for i, which in enumerate(ORDER):
        base, ours = rows[i][3], rows[len(ORDER) + i][3]
        print(f"| {i + 1} | {which} | {base['load_s']:.1f}{' (built)' if base['built'] else ''} | "
              f"{ours['load_s']:.1f}{' (built)' if ours['built'] else ''} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
