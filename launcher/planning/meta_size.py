"""Exact counts of models no formula covers, by letting transformers build them on the meta device.

A mixture-of-experts model must never be sized by a dense formula (it would be off by up to 20×), so
for a model_type that has experts but no formula in moe_size.py the planner asks transformers: the
model is built on torch's meta device (shapes only, no memory, well under a minute even for 671B) and
its parameters are summed. That needs torch and transformers, which the login node may not have and
which the planner never imports itself: the build runs in a child process, `python -m
launcher.planning.meta_size` with the config on stdin, and the planner falls back to a flagged
approximation when the child cannot run. Remote code (`auto_map`) is never executed here.

`expert_blocks` walks a live module tree for its MoE blocks; the trainer uses the same walk for FLOPs,
so the planner's and the trainer's notion of "active" cannot drift apart.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any, Optional

from launcher.planning.moe_size import TOP_K_KEYS, ModelShape, MoeCounts, expert_count

CHILD_TIMEOUT_S = 180
# Keys that make from_config reach for a quantizer or remote code; neither changes a parameter's shape.
_DROP = ("quantization_config", "auto_map", "architectures")


@dataclass(frozen=True)
class ExpertBlock:
    """One MoE block found in a module tree (the parent of a child named `experts`)."""

    name: str
    class_name: str
    num_experts: int
    top_k: Optional[int]
    expert_params: int
    """All routed experts of the block."""
    block_params: int
    """The whole block: router, experts, shared experts."""

    @property
    def inactive_params(self) -> int:
        """Expert parameters a token does not visit: (E − k) of E experts (all of them if k is unknown: 0)."""
        if self.top_k is None:
            return 0
        return self.expert_params * (self.num_experts - self.top_k) // self.num_experts


def _numel(param) -> int:
    """Full size of a parameter, also when ZeRO-3 has partitioned it away (`ds_numel`)."""
    return getattr(param, "ds_numel", None) or param.numel()


def _params(module) -> int:
    return sum(_numel(p) for p in module.parameters())


def _top_k(block, experts, config) -> Optional[int]:
    """Experts per token: the block's, its router's, the experts module's, else the config's."""
    for owner in (block, getattr(block, "gate", None), getattr(block, "router", None), experts):
        for attr in ("top_k", "num_experts_per_tok"):
            value = getattr(owner, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    if config is None:
        return None
    for key in TOP_K_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def expert_blocks(model, config=None) -> list[ExpertBlock]:
    """Every MoE block of a live (or meta, or ZeRO-3 partitioned) model, outermost first.

    An MoE block is the parent of a child named `experts`: true of every transformers MoE model and of
    the remote-code ones we know (per-expert ModuleLists included). The count of experts is the fused
    module's `num_experts`, else the ModuleList's length, else the config's.
    """
    found: list[ExpertBlock] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        experts = getattr(module, "_modules", {}).get("experts")
        if experts is None:
            continue
        count = getattr(experts, "num_experts", None)
        if not isinstance(count, int):
            count = len(experts) if hasattr(experts, "__len__") else None
        if not count and config is not None:
            count = expert_count(config.to_dict() if hasattr(config, "to_dict") else dict(config))
        if not count:
            continue
        inside.append(f"{name}.experts." if name else "experts.")
        found.append(ExpertBlock(name=name, class_name=type(module).__name__, num_experts=count,
                                 top_k=_top_k(module, experts, config), expert_params=_params(experts),
                                 block_params=_params(module)))
    return found


@dataclass(frozen=True)
class MetaCount:
    shape: Optional[ModelShape]
    moe: Optional[MoeCounts]
    version: str = ""
    reason: str = ""
    """Why there is no count (shape None): missing libraries, an unknown model_type, a failed build."""


def missing_library() -> Optional[str]:
    """torch or transformers when one is not importable here (looked up without importing it), else None."""
    return next((lib for lib in ("torch", "transformers") if importlib.util.find_spec(lib) is None), None)


def count_on_meta_device(cfg: dict[str, Any]) -> MetaCount:
    """Counts of the model `cfg` describes, built by transformers in a child process; cached per config."""
    missing = missing_library()
    if missing is not None:
        return MetaCount(None, None, reason=f"{missing} is not installed here")
    return _cached(json.dumps({k: v for k, v in cfg.items() if k not in _DROP}, sort_keys=True))


@functools.lru_cache(maxsize=16)
def _cached(cfg_json: str) -> MetaCount:
    try:
        proc = subprocess.run([sys.executable, "-m", "launcher.planning.meta_size"], input=cfg_json,
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return MetaCount(None, None, reason=f"building it on the meta device took over {CHILD_TIMEOUT_S} s")
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        # transformers' "Unrecognized model identifier: x. Should contain one of <300 names>" needs only its start
        return MetaCount(None, None, reason=f"transformers could not build it: {last.split('. ')[0][:200]}")
    out = json.loads(lines[-1])
    return MetaCount(ModelShape(**out["shape"]), MoeCounts(**out["moe"]), version=out["version"])


def _count_in_this_process(cfg: dict[str, Any]) -> dict[str, Any]:
    """The child's work: build on the meta device, walk the modules, return plain numbers."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    params = list(model.parameters())  # tied tensors once
    total = sum(p.numel() for p in params)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    untied_head = 0 if head is None or head.weight is embed else head.weight.numel()
    blocks = expert_blocks(model, text)
    if not blocks:
        raise SystemExit(f"{type(model).__name__} has no module with an `experts` child")
    h = text.hidden_size
    heads = text.num_attention_heads
    known_k = all(b.top_k is not None for b in blocks)
    active = total - sum(b.inactive_params for b in blocks) if known_k else None
    first = max(blocks, key=lambda b: b.block_params)
    per_expert = first.expert_params // first.num_experts
    layers = text.num_hidden_layers
    shape = ModelShape(total=total, embedding=embed.numel() + untied_head,
                       largest_tensor=max(p.numel() for p in params), hidden_size=h, num_layers=layers,
                       num_heads=heads, num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                       head_dim=getattr(text, "head_dim", None) or h // heads,
                       intermediate_size=getattr(text, "intermediate_size", None) or 4 * h,
                       vocab_size=text.vocab_size, tied_embeddings=untied_head == 0)
    # Widths for the activation estimate: a SwiGLU expert has 3·h·I parameters; what else the block holds
    # besides the router (E·h) is taken as shared experts of the same kind.
    shared = max(0, first.block_params - first.expert_params - first.num_experts * h)
    moe = MoeCounts(num_experts=first.num_experts, top_k=first.top_k, moe_layers=len(blocks),
                    dense_layers=max(0, layers - len(blocks)), per_expert=per_expert,
                    expert_intermediate=max(1, per_expert // (3 * h)), shared_intermediate=shared // (3 * h),
                    active=active, block_params=first.block_params, counted_by="meta-device",
                    active_matmul=None if active is None else active - (embed.numel() if untied_head else 0))
    return {"shape": asdict(shape), "moe": asdict(moe), "version": transformers.__version__}


def main() -> None:
    cfg = json.loads(sys.stdin.read())
    print(json.dumps(_count_in_this_process(cfg)))


if __name__ == "__main__":
    main()
