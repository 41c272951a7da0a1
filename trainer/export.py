"""Turn any shardtune checkpoint into a plain Hugging Face model directory.

The fp32 weights are assembled from every ZeRO shard by DeepSpeed's own zero_to_fp32 logic, on
the CPU of one process: no GPU and not the original number of processes. The model skeleton is
built on the meta device (no memory, no random init), the weights are assigned into it, tied
weights are re-tied, and save_pretrained writes safetensors next to the checkpoint's config and
tokenizer (with its chat template).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from launcher.contract.run_dir import HF, MANIFEST
from trainer.checkpoint import CheckpointError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fp32_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint, whatever its ZeRO stage and world size."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if any(ckpt.glob("*optim_states.pt")):
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    # ZeRO stage 0 keeps the whole module in the model-states file (a DeepSpeed pickle).
    states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, dtype: str = "auto") -> Path:
    """Write a Hugging Face model directory from a checkpoint; the directory appears only when complete."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt, out = Path(ckpt), Path(out_dir)
    if not (ckpt / MANIFEST).is_file():
        raise CheckpointError(f"{ckpt} is not a complete shardtune checkpoint (no {MANIFEST})")
    config = AutoConfig.from_pretrained(ckpt / HF)
    if dtype not in ("auto", *DTYPES):
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    if dtype == "auto":
        target = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        target = getattr(torch, target) if isinstance(target, str) else target
    else:
        target = DTYPES[dtype]
    state = fp32_state_dict(ckpt)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta or unexpected:
        raise RuntimeError(f"checkpoint {ckpt} does not match its model: missing {still_meta[:5]}, unexpected {unexpected[:5]}")
    model = model.to(target)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for item in (ckpt / HF).iterdir():
        if item.name not in ("config.json",) and not (tmp / item.name).exists():
            shutil.copy2(item, tmp / item.name)
    (tmp / "shardtune_export.json").write_text(json.dumps({"checkpoint": str(ckpt), "dtype": str(target)}) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
