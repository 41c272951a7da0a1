"""What the machine that plans a run can tell about where it will run, without importing torch.

The plan is a pure function of the run config and these facts; the CLI detects them once
(`HostFacts.detect`) and tests pass their own. Each fact says where it came from, because the
planning machine (a login node) is often not the machine that trains: whatever only the compute
nodes can know is checked again there by the trainer's preflight.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from launcher.backends.slurm import Preemption, partition_preemption, slurm_node_cpus
from launcher.planning.checkpoint_size import free_space


@dataclass(frozen=True)
class FusedAdamStatus:
    """Whether DeepSpeed's FusedAdam can run here: its op is prebuilt, already JIT-built, or buildable."""

    usable: bool
    reason: str


@dataclass(frozen=True)
class HostFacts:
    visible_gpus: int
    """NVIDIA GPUs this process may use: the driver's count, limited by CUDA_VISIBLE_DEVICES."""
    fused_adam: FusedAdamStatus
    slurm_node_cpus: Optional[int] = None
    """CPUs of one node of the partition the job goes to (sinfo), when SLURM answers."""
    cxx: Optional[str] = "c++"
    """The C++ compiler torch.compile's inductor builds CPU kernels with (None: none found)."""
    triton: bool = False
    """Whether triton, which inductor generates GPU kernels for, is installed."""
    preemption: Optional[Preemption] = None
    """How SLURM preempts the partition's jobs, when it gives them a grace time (scontrol)."""
    disk_free: Optional[tuple[str, int]] = None
    """Free bytes on the filesystem of the run's output_dir, and the directory asked (statvfs): a shared
    filesystem looks the same from the compute nodes, whose preflight asks again at job start."""

    @classmethod
    def detect(cls, partition: Optional[str] = None, slurm: bool = False,
               output_dir: Optional[Path] = None) -> HostFacts:
        return cls(visible_gpus(), fused_adam_status(), slurm_node_cpus(partition) if slurm else None,
                   cxx_compiler(), importlib.util.find_spec("triton") is not None,
                   partition_preemption(partition) if slurm else None,
                   free_space(output_dir) if output_dir is not None else None)

    def compile_problem(self, device: str) -> Optional[str]:
        """Why torch.compile cannot build kernels for `device` here (None: it can)."""
        return inductor_problem(device, self.cxx, self.triton)


def inductor_problem(device, cxx: Optional[str], triton: bool) -> Optional[str]:
    """Why inductor cannot build kernels for `device` (a name, or a torch.device such as cuda:3: it equals no
    string) with this compiler and triton (None: it can)."""
    if str(device).partition(":")[0] == "cuda":
        return None if triton else "triton is not installed (inductor generates GPU kernels with it)"
    return None if cxx else ("no C++ compiler (inductor builds CPU kernels with $CXX, g++, c++ or clang++; none "
                             "is on PATH)")


def cxx_compiler(environ: Optional[dict] = None) -> Optional[str]:
    """The C++ compiler inductor would use on CPU: $CXX, then g++, c++, clang++ on PATH."""
    env = os.environ if environ is None else environ
    for name in [env.get("CXX"), "g++", "c++", "clang++"]:
        if name and (found := shutil.which(name)):
            return found
    return None


def driver_gpu_count() -> int:
    """NVIDIA GPUs the driver exposes, from its /proc entries (no torch, no subprocess)."""
    root = Path("/proc/driver/nvidia/gpus")
    return len(list(root.iterdir())) if root.is_dir() else 0


def visible_gpus(environ: Optional[dict] = None, driver_count: Optional[int] = None) -> int:
    """The GPUs CUDA will enumerate: CUDA_VISIBLE_DEVICES, when set, lists them (indices, GPU-/MIG- UUIDs).

    CUDA stops at the first entry that is not a valid device, so "0,-1,1" means one GPU and "" or "-1" none.
    """
    env = os.environ if environ is None else environ
    total = driver_gpu_count() if driver_count is None else driver_count
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return total
    count = 0
    for entry in (e.strip() for e in listed.split(",")):
        valid = entry.startswith(("GPU-", "MIG-")) or (entry.isdigit() and int(entry) < total)
        if not valid:
            break
        count += 1
    return min(count, total)


def _installed_ops(package_dir: Path) -> dict:
    """DeepSpeed's record of the ops it was built with (git_version_info_installed.py), read without importing it."""
    path = package_dir / "git_version_info_installed.py"
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "installed_ops" for t in node.targets):
            try:
                return ast.literal_eval(node.value)
            except ValueError:
                return {}
    return {}


def nvcc_path() -> Optional[str]:
    """The CUDA compiler a JIT build would use: $CUDA_HOME/bin/nvcc, then nvcc on PATH, then /usr/local/cuda."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    return "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None


def machine_kind(cpuinfo: str, gpu_models: list[str]) -> str:
    """A short name for what a JIT build of an op depends on besides its environment: the CPU and the GPUs.

    DeepSpeed compiles its CPU optimizers (CPUAdam for an offloaded optimizer, FusedAdam on CPU) with
    -march=native, a flag that reads the same on every CPU: ninja would load an op built on one CPU generation on
    another (SIGILL where the newer one's instructions were used), or rebuild it at every switch where the defines
    DeepSpeed derives from the CPU's flags differ. Its JIT CUDA builds target the visible GPUs' compute capability,
    so a GPU model change rebuilds them. The CPU is /proc/cpuinfo's distinct model name and flags lines (Features
    and CPU part on ARM); the GPUs are the NVIDIA driver's model names.
    """
    cpu = [line for line in cpuinfo.splitlines() if line.startswith(("model name", "flags", "Features", "CPU part"))]
    seen = "\n".join(list(dict.fromkeys(cpu)) + sorted(gpu_models))
    return hashlib.sha256(seen.encode()).hexdigest()[:8]


@functools.cache
def _this_machine_kind() -> str:
    """machine_kind of this host, read once per process (the stale-lock sweep asks at every poll)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = platform.processor()
    gpus = []
    for info in Path("/proc/driver/nvidia/gpus").glob("*/information"):
        try:
            gpus += [line for line in info.read_text().splitlines() if line.startswith("Model:")]
        except OSError:
            continue
    return machine_kind(cpuinfo, gpus)


def extensions_dir(environ: Optional[dict] = None) -> Path:
    """The directory this Python environment's DeepSpeed ops are JIT-built into on this kind of machine:
    $TORCH_EXTENSIONS_DIR if set, else <cache>/torch_extensions/shardtune-py<version>-<environment>-<machine>, named
    by hashes of the environment's path and versions (_environment_stem) and of the machine (machine_kind).

    torch's default, <cache>/torch_extensions/py<version>_<cpu|cuXYZ> (<cache>: $XDG_CACHE_HOME or ~/.cache), is
    shared by every environment of a user with that Python and CUDA, and by every node that mounts the $HOME. A
    build there records the absolute paths of its environment's DeepSpeed sources, so two venvs or conda envs
    sharing a $HOME rebuild each other's ops at every switch, with every rank of the node waiting: ~30 s for the CPU
    comm op, minutes of nvcc for a CUDA op (bench/RESULTS.md). The trainer points torch here before any op loads
    (trainer/ops.pin_build_dir).
    """
    environ = os.environ if environ is None else environ
    if environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(environ["TORCH_EXTENSIONS_DIR"])
    stem = _environment_stem(environ)
    return stem.with_name(f"{stem.name}-{_this_machine_kind()}")


def _environment_stem(environ: dict) -> Path:
    """The stem every build folder of this environment starts with (one per machine kind).

    The environment is its path and its torch and DeepSpeed versions: container images mount the same $HOME
    and install at the same path (/opt/conda, say), and ninja would load a build made against another image's
    DeepSpeed whose sources look no newer than it. An upgrade in place moves to a new folder as well.
    """
    cache = Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache / "torch_extensions" / f"shardtune-{python}-{_environment_tag()}"


@functools.cache
def _environment_tag() -> str:
    """The hash of this environment's path and versions, read once per process."""
    seen = [os.path.realpath(sys.prefix)]
    for package in ("torch", "deepspeed"):
        try:
            seen.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            seen.append(f"{package} absent")
    return hashlib.sha256("\n".join(seen).encode()).hexdigest()[:12]


def _cuda_build_of(op: str) -> Optional[Path]:
    """The directory of an earlier JIT build of a DeepSpeed op for CUDA that this environment's ranks would load.

    The planning host (a login node) is often another kind of machine than the GPU nodes, so every machine's folder
    of this environment counts. DeepSpeed's CPU accelerator builds an op of the same name (`make install` does),
    which is no CUDA kernel: a CUDA build has an object compiled from a .cu source (torch names it *.cuda.o).
    """
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        roots = [extensions_dir()]
    else:
        stem = _environment_stem(os.environ)
        roots = sorted(stem.parent.glob(f"{stem.name}-*"))
    for build in (root / op for root in roots):
        if any(build.glob(f"{op}*.so")) and any(build.glob("*.cuda.o")):
            return build
    return None


def fused_adam_status() -> FusedAdamStatus:
    """Can DeepSpeed's FusedAdam be loaded here without failing after the model has loaded?"""
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.submodule_search_locations:
        return FusedAdamStatus(False, "deepspeed is not installed on this machine")
    package = Path(list(spec.submodule_search_locations)[0])
    if _installed_ops(package).get("fused_adam"):
        return FusedAdamStatus(True, "DeepSpeed was installed with its fused_adam op prebuilt")
    built = _cuda_build_of("fused_adam")
    if built is not None:
        return FusedAdamStatus(True, f"fused_adam was JIT-built before ({built})")
    nvcc = nvcc_path()
    if nvcc:
        return FusedAdamStatus(True, f"fused_adam can be JIT-built with {nvcc}")
    return FusedAdamStatus(False, "DeepSpeed's fused_adam op is not prebuilt and no CUDA compiler (nvcc) was "
                                  "found to build it")
