"""Whether a local model directory holds, whole, every weight file transformers will read from it.

A 140 GB model reaches a cluster's shared filesystem by a download or a copy, and either can stop part way or
mix two revisions. transformers finds out only when every rank loads the model, after the job has waited in
the queue, and says so badly: a shard cut short gives safetensors' "incomplete metadata, file not fully covered",
naming no file; a shard from another revision loads without an error, and the tensors it lacks start from random
values with only a log line (measured with transformers 5.25). So `plan` on the login node and every node's
preflight at job start check the files first, from their sizes and safetensors headers alone: no tensor is read,
no torch is imported, and a header is a few tens of KB for a 5 GB shard.

What is checked, for the files transformers' from_pretrained picks in a local directory (config.json's
`transformers_weights`, else model.safetensors, its index, pytorch_model.bin, its index, in that order):
each file exists; a safetensors file is exactly its header's length plus the end of its last tensor; a
pickle checkpoint (torch's zip format) still has the directory a zip keeps at its end; every tensor an index
places in a shard is in that shard's header. What is not: the bytes themselves (a Hugging Face directory
carries no checksums) and hub ids, which the hub's own download verifies.
"""
from __future__ import annotations

import json
import zipfile
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

from launcher.planning.model_size import read_model_config

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
MAX_HEADER = 100_000_000
"""safetensors refuses a header longer than this; a larger length field means the file is not safetensors."""
CUT_SHORT = "cut short: an interrupted download or copy?"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".onnx_data",
                   ".tflite", ".ot", ".npz", ".nemo", ".pdparams")
"""Files of weights, in any framework's format: a repository's top-level files other than these are configs,
tokenizers and code, which a run reads."""


def weight_files_problems(name_or_path: str) -> list[str]:
    """Every problem with the weight files of a local model directory, one line each naming the file; [] for a
    complete one, for a hub id, and for a directory with no weight files at all (a config.json to plan from)."""
    model_dir = Path(name_or_path)
    if not model_dir.is_dir():
        return []
    chosen = _chosen_file(model_dir)
    if chosen is None:
        return []
    if chosen.name.endswith(".index.json"):
        return _index_problems(chosen)
    return [p for p in [_file_problem(chosen)] if p]


def absent_model(name_or_path: str) -> Optional[str]:
    """Why a local model path is not there; None when it is, or for a hub id. An absolute path is a local one
    (the config makes local paths absolute), so one that is missing is a directory this host does not see: for
    `plan` a model to be put there later, for a node at job start a filesystem it does not mount."""
    path = Path(name_or_path)
    return "no such directory on this host" if path.is_absolute() and not path.exists() else None


def absent_weights(name_or_path: str) -> Optional[str]:
    """Why a local model directory cannot be trained from although it is there: it holds no weight files, as the
    snapshot of a hub model that only `plan` or `launch --dry_run` fetched (its config.json); None otherwise. Not
    a problem for planning, which needs only the config: checked where weights are loaded."""
    path = Path(name_or_path)
    if not path.is_dir() or _chosen_file(path) is not None:
        return None
    return ("holds no weight files (a hub model whose config.json alone `plan` or `launch --dry_run` fetched?): "
            "`shardtune launch` downloads them, or `shardtune download CONFIG` on a host with the hub")


def foreign_code(*directories: str) -> dict[str, list[str]]:
    """Code in another hub repository that a local model's or tokenizer's `auto_map` names
    (`org/code--modeling_x.Class`), as {repository: [module files]}. transformers downloads it when the model loads,
    at that repository's default branch (it pins only the model's own code to the model's revision)."""
    found: dict[str, set[str]] = defaultdict(set)
    for directory in directories:
        for name in ("config.json", "tokenizer_config.json"):
            try:
                auto_map = json.loads((Path(directory) / name).read_text()).get("auto_map") or {}
            except (OSError, ValueError, AttributeError):
                continue
            for refs in auto_map.values():
                for ref in refs if isinstance(refs, list) else [refs]:
                    if isinstance(ref, str) and "--" in ref:
                        repo, reference = ref.split("--", 1)
                        found[repo].add(reference.split(".")[0] + ".py")
    return {repo: sorted(modules) for repo, modules in sorted(found.items())}


def _chosen_file(model_dir: Path) -> Optional[Path]:
    config = read_model_config(str(model_dir))
    names = [n for n in (SAFE_WEIGHTS, SAFE_INDEX, PICKLE_WEIGHTS, PICKLE_INDEX) if (model_dir / n).is_file()]
    chosen = chosen_weights(names, config)
    return model_dir / chosen if chosen else None


def chosen_weights(names: Iterable[str], config: Optional[dict]) -> Optional[str]:
    """The file from_pretrained starts from among a model's top-level file names, in its order for a local
    directory and for a hub repository alike (transformers 5 modeling_utils); None when there is none."""
    explicit = config.get("transformers_weights") if isinstance(config, dict) else None
    if isinstance(explicit, str):
        return explicit
    present = set(names)
    return next((n for n in (SAFE_WEIGHTS, SAFE_INDEX, PICKLE_WEIGHTS, PICKLE_INDEX) if n in present), None)


def files_read(names: Iterable[str], config: Optional[dict], index: Optional[dict]) -> list[str]:
    """Which of a repository's files from_pretrained and the tokenizer read: every top-level file that is not a
    weight file, the chosen weight file, and the shards its index names (`index`: the parsed index, when the
    chosen file is one). Many repositories also carry weights no loader reads here: Llama's `original/` copy
    (as large as the model), Mistral's consolidated.safetensors, gguf, onnx and flax files."""
    names = list(names)
    chosen = chosen_weights(names, config)
    wanted = {n for n in names if "/" not in n and not n.endswith(WEIGHT_SUFFIXES)}
    if chosen:
        wanted.add(chosen)
        if chosen.endswith(".index.json") and isinstance(index, dict):
            wanted.update(shards_of(index))
    return sorted(wanted)


def shards_of(index: dict) -> dict[str, list[str]]:
    """The tensors an index places in each shard file."""
    shards: dict[str, list[str]] = defaultdict(list)
    for tensor, shard in index["weight_map"].items():
        shards[shard].append(tensor)
    return shards


def _index_problems(index_file: Path) -> list[str]:
    try:
        shards = shards_of(json.loads(index_file.read_text()))
    except FileNotFoundError:
        return [f"{index_file.name} is missing"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return [f"{index_file.name} is not an index of shards ({type(exc).__name__}: {exc}): damaged, or cut short"]
    problems = [_file_problem(index_file.parent / shard, tensors) for shard, tensors in sorted(shards.items())]
    return [p for p in problems if p]


def _file_problem(file: Path, tensors: tuple[str, ...] | list[str] = ()) -> Optional[str]:
    """Why `file` cannot be the whole weight file it should be (holding `tensors`, when an index names them)."""
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        return f"{file.name} is missing"
    except OSError as exc:
        return f"{file.name} cannot be read ({exc})"
    if file.name.endswith(".safetensors"):
        return _safetensors_problem(file, size, tensors)
    return _pickle_problem(file, size)


def _safetensors_problem(file: Path, size: int, tensors: tuple[str, ...] | list[str]) -> Optional[str]:
    if size < 8:
        return f"{file.name} is {size} bytes, too short for a safetensors header ({CUT_SHORT})"
    try:
        with open(file, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            if length > MAX_HEADER:
                return f"{file.name} does not start with a safetensors header (its length field reads {length:,})"
            if 8 + length > size:
                return f"{file.name} is {size:,} bytes, shorter than its own header ({8 + length:,}; {CUT_SHORT})"
            header = json.loads(fh.read(length))
        described = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in described.values()), default=0)
    except OSError as exc:
        return f"{file.name} cannot be read ({exc})"
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return f"{file.name}'s header is not a safetensors header: damaged, or not a safetensors file"
    whole = 8 + length + end
    if size != whole:
        why = CUT_SHORT if size < whole else "bytes after its last tensor: damaged, or not written by safetensors"
        return f"{file.name} is {size:,} bytes, its header describes {whole:,} ({why})"
    absent = sorted(set(tensors) - set(described))
    if absent:
        return (f"{file.name} lacks {len(absent)} of the {len(set(tensors))} tensors the index places in it (e.g. "
                f"{', '.join(absent[:3])}): a shard of another revision or another model? transformers would start "
                f"them from random values")
    return None


def _pickle_problem(file: Path, size: int) -> Optional[str]:
    """torch.save's zip format keeps its table of contents at the end of the file, so a file cut short lacks it.
    Files in torch's legacy (pre-1.6) format are not zips and are passed as they are."""
    try:
        with open(file, "rb") as fh:
            is_zip_format = fh.read(4) == b"PK\x03\x04"
        if size == 0:
            return f"{file.name} is empty ({CUT_SHORT})"
        if is_zip_format:
            zipfile.ZipFile(file).close()
    except zipfile.BadZipFile:
        return f"{file.name} is {size:,} bytes and has lost the table a torch.save file ends with ({CUT_SHORT})"
    except OSError as exc:
        return f"{file.name} cannot be read ({exc})"
    return None
