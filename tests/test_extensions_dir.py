"""Each Python environment builds DeepSpeed's ops in a folder of its own, per kind of machine: two environments, or
two kinds of node, sharing a $HOME no longer rebuild each other's ops at every switch or load each other's builds.

torch's default folder, <cache>/torch_extensions/py<version>_<cpu|cuXYZ>, is the same for every environment with
that Python, and a build records the absolute paths of its environment's DeepSpeed sources, so ninja rebuilds
whenever the other environment built last (`python -m bench.op_builds` measures it). The second environment here
is a real venv of the same base Python whose packages are this one's (a .pth file adds them). Where a build goes
is read from torch itself (`_get_build_directory`, which creates the folder), under a cache folder of the test's
own.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from torch.utils.cpp_extension import _get_build_directory

from bench.op_builds import second_environment
from launcher.planning.host import machine_kind
from trainer.ops import pin_build_dir

REPO = Path(__file__).resolve().parents[1]

# torch's folder for an op before and after the rank's setting, in the environment whose python runs this.
WHERE = ("import sys; from torch.utils.cpp_extension import _get_build_directory as where; "
         "before = where('op', False); from trainer.ops import pin_build_dir; pin_build_dir(); "
         "print(before); print(where('op', False))")


def build_folders(python: Path, cache: Path) -> tuple[Path, Path]:
    """torch's default folder for an op, and the one a shardtune rank builds it in, as python's environment sees."""
    out = subprocess.run([str(python), "-c", WHERE], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(cache.parent), "XDG_CACHE_HOME": str(cache)})
    assert out.returncode == 0, out.stderr[-3000:]
    before, after = out.stdout.split()
    return Path(before), Path(after)


def test_two_environments_or_two_versions_build_in_two_folders_where_torch_would_share_one(tmp_path, monkeypatch):
    """The second environment's DeepSpeed then becomes another version in place (its metadata says so), as in a
    container image of another version installed at the same path, under the same bind-mounted $HOME."""
    cache = tmp_path / "cache"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    this_default = Path(_get_build_directory("op", False))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "")  # read as unset; monkeypatch removes what pin_build_dir sets
    pin_build_dir()
    this_pinned = Path(_get_build_directory("op", False))

    again_default, again_pinned = build_folders(Path(sys.executable), cache)
    other = second_environment(tmp_path / "env2")
    other_default, other_pinned = build_folders(other, cache)
    metadata = next(other.parent.parent.glob("lib/python*/site-packages/deepspeed-*.dist-info/METADATA"))
    version = next(line for line in metadata.read_text().splitlines() if line.startswith("Version: "))
    metadata.write_text(metadata.read_text().replace(version, f"{version}.post1"))
    upgraded_default, upgraded_pinned = build_folders(other, cache)

    assert other_default == this_default == again_default == upgraded_default  # the problem: torch's is shared
    assert len({this_pinned, other_pinned, upgraded_pinned}) == 3
    assert again_pinned == this_pinned  # stable: later runs of an environment reuse its builds
    for folder in (this_pinned, other_pinned, upgraded_pinned):
        assert folder.name == "op" and folder.parent.parent == cache / "torch_extensions"


def test_a_folder_the_user_chose_is_kept(tmp_path, monkeypatch):
    """A team's prebuilt cache, or a node-local disk, named in $TORCH_EXTENSIONS_DIR."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "team"))
    assert pin_build_dir() == tmp_path / "team"
    assert Path(_get_build_directory("op", False)) == tmp_path / "team" / "op"


def test_another_kind_of_cpu_or_gpu_gets_a_folder_of_its_own_simulated_other_machines():
    """Nodes of one cluster share the $HOME but not the CPU or GPU model. This machine's /proc/cpuinfo against the
    same text with its AVX-512 or AVX2 flags taken away (another CPU generation; ninja would rebuild or, where the
    flags DeepSpeed derives match, load a build that uses instructions the CPU lacks), and two GPU models (from
    the NVIDIA driver's /proc files, which this VM does not have)."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    flags = next(line for line in cpuinfo.splitlines() if line.startswith("flags"))
    wide = next(flag for flag in ("avx512f", "avx2") if f" {flag}" in flags)
    older = cpuinfo.replace(flags, flags.replace(f" {wide}", ""))
    per_core = cpuinfo.replace("cpu MHz", "cpu  MHz").replace("processor\t: 0", "processor\t: 7")
    a100, h100 = ["Model: \t\t NVIDIA A100-SXM4-80GB"], ["Model: \t\t NVIDIA H100 80GB HBM3"]

    assert machine_kind(cpuinfo, []) == machine_kind(per_core, [])  # clock and core numbers are no other machine
    assert machine_kind(cpuinfo, []) != machine_kind(older, [])
    assert len({machine_kind(cpuinfo, []), machine_kind(cpuinfo, a100), machine_kind(cpuinfo, h100)}) == 3


def test_deepspeeds_cpu_optimizer_is_still_built_for_the_cpu_that_builds_it():
    """The premise of a folder per CPU: DeepSpeed compiles CPUAdam (an offloaded optimizer) with -march=native, a
    flag that names no CPU, so nothing in the build tells ninja that another CPU built it."""
    from deepspeed.accelerator import get_accelerator

    assert "-march=native" in get_accelerator().create_op_builder("CPUAdamBuilder").cxx_args()
