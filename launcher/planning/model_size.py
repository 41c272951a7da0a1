"""Parameter counts from a Hugging Face `config.json` alone, so the planner never needs weights or torch.

The count is exact for the decoder-only families whose module layout we mirror below (checked against
transformers' own modules built on the meta device in tests/test_memory.py) and for the mixture-of-experts
families of moe_size.py. Any other model with experts is counted by building it on the meta device
(meta_size.py), never by a dense formula. Anything else gets a documented approximation flagged
`exact=False`, so callers can say "about" instead of lying.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

from launcher.contract.errors import ConfigError
from launcher.planning.meta_size import count_on_meta_device
from launcher.planning.moe_size import MOE_FAMILIES, ModelShape, MoeCounts, approximate_moe, count_moe, has_experts


@dataclass(frozen=True)
class ModelCounts(ModelShape):
    """What the memory model needs to know about a network: its shape (ModelShape: total, embedding, the largest
    tensor, widths) and what the planner derives; every count is a number of elements."""

    per_layer: int  # one decoder layer (the mean over layers where MoE and dense layers mix)
    exact: bool = True
    architecture: str = "unknown"  # HF model_type; memory.py keys its activation layouts on it
    note: str = ""
    moe: Optional[MoeCounts] = None  # set for mixture-of-experts models
    sliding_window: Optional[int] = None  # the window of its sliding-window layers (attention_window)

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def active(self) -> int:
        """Parameters one token touches (memory needs `total`, FLOPs this); `total` for dense models."""
        return self.moe.active if self.moe is not None and self.moe.active is not None else self.total

    @property
    def mlp_width(self) -> int:
        """MLP width one token passes through: top-k experts plus shared ones in an MoE layer, or the dense
        layers' width where that is larger; the activation estimate scales with it."""
        if self.moe is None:
            return self.intermediate_size
        routed = (self.moe.top_k or self.moe.num_experts) * self.moe.expert_intermediate + self.moe.shared_intermediate
        return max(routed, self.intermediate_size if self.moe.dense_layers else 0)

    @property
    def gather_unit(self) -> int:
        """Elements ZeRO-3 fetches at once: the largest tensor, or a whole MoE block (a leaf module)."""
        return max(self.largest_tensor, self.moe.block_params if self.moe is not None else 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Family:
    """The knobs that differ between the supported families, with the HF config-class defaults."""

    qkv_bias: Optional[bool]  # None: read `attention_bias` (applies to q, k, v and o)
    o_bias: Optional[bool]
    mlp_bias_key: bool  # Llama only: `mlp_bias` puts biases on gate, up and down
    norms_per_layer: int
    qk_norm: bool
    tie_default: bool
    head_dim_default: Optional[int]  # None: hidden_size // num_attention_heads
    kv_heads_default: Optional[int]  # None: num_attention_heads
    fused_mlp: bool = False  # Phi-3 stores gate and up as one tensor (matters for the largest tensor)
    fused_qkv: bool = False


# Defaults copied from transformers' configuration_*.py (v5): they only matter for a config.json that
# leaves a field out, which save_pretrained never does, but hand-written fixtures do.
FAMILIES: dict[str, _Family] = {
    "llama": _Family(None, None, True, 2, False, False, None, None),
    "mistral": _Family(False, False, False, 2, False, False, None, 8),
    "qwen2": _Family(True, False, False, 2, False, False, None, 32),
    "qwen3": _Family(None, None, False, 2, True, False, 128, 32),
    "gemma": _Family(None, None, False, 2, False, True, 256, 16),
    "gemma2": _Family(None, None, False, 4, False, True, 256, 4),
    "gemma3_text": _Family(None, None, False, 4, True, True, 256, 4),
    "phi3": _Family(False, False, False, 2, False, False, None, None, fused_mlp=True, fused_qkv=True),
}

# Vocabulary assumed when only a parameter count is known: it sizes the logits buffer and the
# embedding (the largest tensor), so a modern-sized one errs on the safe side.
ASSUMED_VOCAB = 128_256


def _error(problem: str) -> ConfigError:
    return ConfigError([problem], title="cannot size the model")


def _need(cfg: dict[str, Any], *keys: str, source: str) -> int:
    """The first of `keys` present in the config, as a positive int; the error names what was looked for."""
    for key in keys:
        value = cfg.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise _error(f"{source}: {key} must be a positive integer, got {value!r}")
            return value
    raise _error(f"{source}: missing {' or '.join(keys)}; cannot size the model")


def _exact_counts(cfg: dict[str, Any], model_type: str, source: str) -> ModelCounts:
    fam = FAMILIES[model_type]
    h = _need(cfg, "hidden_size", source=source)
    layers = _need(cfg, "num_hidden_layers", source=source)
    heads = _need(cfg, "num_attention_heads", source=source)
    inter = _need(cfg, "intermediate_size", source=source)
    vocab = _need(cfg, "vocab_size", source=source)
    kv = cfg.get("num_key_value_heads") or fam.kv_heads_default or heads
    hd = cfg.get("head_dim") or fam.head_dim_default or h // heads
    tied = bool(cfg.get("tie_word_embeddings", fam.tie_default))
    attn_bias = bool(cfg.get("attention_bias", False))
    qkv_bias = attn_bias if fam.qkv_bias is None else fam.qkv_bias
    o_bias = attn_bias if fam.o_bias is None else fam.o_bias
    mlp_bias = bool(cfg.get("mlp_bias", False)) if fam.mlp_bias_key else False

    q, k = heads * hd, kv * hd
    attention = h * (q + 2 * k) + q * h + (q + 2 * k if qkv_bias else 0) + (h if o_bias else 0)
    attention += 2 * hd if fam.qk_norm else 0
    mlp = 3 * h * inter + ((2 * inter + h) if mlp_bias else 0)
    per_layer = attention + mlp + fam.norms_per_layer * h
    embedding = vocab * h * (1 if tied else 2)
    total = layers * per_layer + embedding + h  # + final norm
    qkv_tensors = [h * (q + 2 * k)] if fam.fused_qkv else [h * q, h * k]
    mlp_tensors = [2 * h * inter] if fam.fused_mlp else [h * inter]
    largest = max([vocab * h, q * h, *qkv_tensors, *mlp_tensors])
    return ModelCounts(
        total=total, embedding=embedding, per_layer=per_layer,
        largest_tensor=largest, hidden_size=h, num_layers=layers, num_heads=heads, num_kv_heads=kv,
        head_dim=hd, intermediate_size=inter, vocab_size=vocab, tied_embeddings=tied,
        exact=True, architecture=model_type,
    )


def _approximate_counts(cfg: dict[str, Any], model_type: str, source: str) -> ModelCounts:
    """12·L·h² + V·h (Kaplan et al. 2020): attention 4h² and a 4h-wide MLP 8h² per layer, plus the embedding.

    Good to a few percent for classic GPT-style layouts; the error grows with gated MLPs whose width
    is not 8/3·h, or with GQA. An untied lm_head adds another V·h (HF's base default is tied).
    """
    h = _need(cfg, "hidden_size", "n_embd", "d_model", source=source)
    layers = _need(cfg, "num_hidden_layers", "n_layer", "num_layers", source=source)
    heads = _need(cfg, "num_attention_heads", "n_head", "num_heads", source=source)
    vocab = _need(cfg, "vocab_size", source=source)
    inter = cfg.get("intermediate_size") or cfg.get("n_inner") or cfg.get("ffn_dim") or 4 * h
    tied = bool(cfg.get("tie_word_embeddings", True))
    per_layer = 12 * h * h
    embedding = vocab * h * (1 if tied else 2)
    total = layers * per_layer + embedding
    return ModelCounts(
        total=total, embedding=embedding, per_layer=per_layer,
        largest_tensor=max(vocab * h, h * inter), hidden_size=h, num_layers=layers, num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads, head_dim=h // heads,
        intermediate_size=inter, vocab_size=vocab, tied_embeddings=tied, exact=False,
        architecture=model_type or "unknown",
        note=f"model_type {model_type!r} has no exact layout here; used 12·L·h² + V·h "
             f"(exact for: {', '.join(sorted(FAMILIES))})",
    )


def _size(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def moe_summary(total: int, moe: MoeCounts) -> str:
    """One line on what an MoE's two sizes mean for the plan."""
    layers = f"{moe.moe_layers} MoE layers" + (f" + {moe.dense_layers} dense" if moe.dense_layers else "")
    routing = f"{moe.top_k} of {moe.num_experts} experts per token" if moe.top_k else f"{moe.num_experts} experts"
    if moe.active is None:
        return f"mixture of experts ({routing}, {layers}): memory counts all {_size(total)} parameters"
    return (f"mixture of experts ({routing}, {layers}): memory counts all {_size(total)} parameters, "
            f"FLOPs the {_size(moe.active_matmul)} a token multiplies ({_size(moe.active)} active with "
            f"the input embedding)")


def approximate_moe_reason(counts: ModelCounts) -> Optional[str]:
    """Why a fit verdict on these counts would be a guess (an MoE only sized by the generic layout), else None."""
    if counts.moe is None or counts.moe.counted_by != "approximate":
        return None
    return (f"{counts.architecture!r} is a mixture of experts whose size is only approximate "
            f"({counts.total / 1e9:.2f}B parameters, may be off by ±{counts.moe.uncertainty:.0%})")


def _from_moe(shape: ModelShape, moe: MoeCounts, model_type: str, exact: bool, note: str = "") -> ModelCounts:
    note = "; ".join(part for part in (note, moe_summary(shape.total, moe)) if part)
    per_layer = (shape.total - shape.embedding - shape.hidden_size) // shape.num_layers
    return ModelCounts(**asdict(shape), per_layer=per_layer, exact=exact, architecture=model_type, note=note, moe=moe)


def _unknown_moe(cfg: dict[str, Any], model_type: str, source: str) -> ModelCounts:
    """An MoE layout without a formula here: built on the meta device if we can, else a flagged approximation."""
    found = count_on_meta_device(cfg)
    if found.shape is not None:
        note = (f"counted exactly by building {model_type!r} on the meta device with transformers "
                f"{found.version} (no formula here; formulas for: {', '.join(MOE_FAMILIES)})")
        return _from_moe(found.shape, found.moe, model_type, exact=True, note=note)
    shape, moe = approximate_moe(cfg, source)
    note = (f"mixture of experts {model_type!r} has no formula here and could not be built on the meta device "
            f"({found.reason}); used a generic MoE layout that may be off by ±{moe.uncertainty:.0%}: "
            f"launch.gpu_memory_gb checks refuse it unless launch.force_approximate_fit is set")
    return _from_moe(shape, moe, model_type, exact=False, note=note)


def attention_window(model_config: dict[str, Any]) -> Optional[int]:
    """The window of the model's sliding-window layers (None: it has none, or they are switched off)."""
    window = model_config.get("sliding_window")
    return None if not window or model_config.get("use_sliding_window") is False else int(window)


ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention", "attention"}


def state_layers(model_config: dict[str, Any]) -> Optional[str]:
    """What in a model's config says some of its layers are not attention but carry state along the sequence
    (recurrent, convolution, linear-attention or state-space layers), or None. Such layers run on from one packed
    sample into the next whatever the attention mask (the trainer measures it before the first step)."""
    for field in ("layer_types", "block_types"):
        kinds = sorted(set(model_config.get(field) or []) - ATTENTION_LAYER_TYPES)
        if kinds:
            return f"{field} {', '.join(kinds)}"
    keys = sorted(k for k in model_config if k.startswith(("mamba_", "ssm_", "linear_", "conv")) or k == "state_size")
    if keys:
        return f"{keys[0]} in its config"
    return "a recurrent model" if model_config.get("model_type") in ("rwkv", "xlstm") else None


def outgrown_window(window: Optional[int], seq_len: int) -> Optional[int]:
    """The window, when a sample of seq_len tokens can outgrow it; None when every layer attends to whole samples."""
    return window if window is not None and window < seq_len else None


def counts_from_config(cfg: dict[str, Any], source: str = "config.json") -> ModelCounts:
    """Exact counts for the supported families, the 12·L·h² approximation for anything else.

    Models with experts never get the dense approximation: without a formula they are counted on the
    meta device (when torch and transformers are importable), else flagged approximate with a bound.
    """
    if not isinstance(cfg, dict):
        raise _error(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    counts = _counts_of(cfg, source)
    window = attention_window(cfg)
    return counts if window is None else _replace(counts, sliding_window=window)


def _counts_of(cfg: dict[str, Any], source: str) -> ModelCounts:
    model_type = str(cfg.get("model_type", ""))
    if model_type in MOE_FAMILIES:
        shape, moe = count_moe(cfg, source)
        return _from_moe(shape, moe, model_type, exact=True)
    if model_type in FAMILIES:
        return _exact_counts(cfg, model_type, source)
    if has_experts(cfg):
        return _unknown_moe(cfg, model_type, source)
    text = cfg.get("text_config")
    if isinstance(text, dict) and "hidden_size" not in cfg:
        # Multimodal wrappers (Gemma3, Llava, ...): the language model dominates; the vision tower is left out.
        inner = counts_from_config(text, source=f"{source} text_config")
        return _replace(inner, exact=False, note=f"text_config of {model_type!r} only; vision tower not counted")
    return _approximate_counts(cfg, model_type, source)


def _replace(c: ModelCounts, **changes: Any) -> ModelCounts:
    return replace(c, **changes)


def config_json_of(path: str | Path) -> Path:
    """A model directory's config.json, or the path itself when it names the file."""
    p = Path(path).expanduser()
    return p / "config.json" if p.is_dir() else p


def load_config_json(path: str | Path) -> tuple[dict[str, Any], str]:
    """Accept a model directory or the config.json itself; errors say which path was tried."""
    file = config_json_of(path)
    if not file.is_file():
        hint = "a directory containing config.json or a path to a config.json"
        raise _error(f"--model: {str(path)!r} is not {hint} ({file} does not exist)")
    try:
        return json.loads(file.read_text()), str(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _error(f"--model: {file} is not valid JSON: {exc}") from None


def parameter_count(model_cfg: Optional[dict[str, Any]]) -> Optional[int]:
    """The model's parameter count from its config.json (bucket sizes, checkpoint sizes); None when it cannot be
    sized."""
    if model_cfg is None:
        return None
    try:
        return counts_from_config(model_cfg).total
    except ConfigError:
        return None


def read_model_config(name_or_path: str) -> Optional[dict[str, Any]]:
    """The model's config.json when it is on local disk; None for hub ids (hub_snapshot fetches theirs first) and
    unreadable files."""
    file = config_json_of(name_or_path)
    if not (file.is_file() and file.suffix == ".json"):
        return None
    try:
        return load_config_json(file)[0]
    except ConfigError:
        return None


def counts_from_path(path: str | Path) -> ModelCounts:
    """Counts for a local model directory or config.json."""
    cfg, source = load_config_json(path)
    return counts_from_config(cfg, source)


def counts_from_params(n: float, vocab_size: int = ASSUMED_VOCAB) -> ModelCounts:
    """A plausible Llama-shaped model of `n` parameters, for `--params=N` without a config.

    Model states only need `n`, which is kept exactly. Activations need a shape, so we invent one:
    12·L·h² = n − V·h with the depth/width ratio h ≈ 128·L of Llama/Mistral (4096/32, 5120/40),
    h rounded to a multiple of 128, 32 heads of 128 (so heads = h/128), MLP width 8/3·h, tied.
    """
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n < 1e6:
        raise _error(f"--params: must be a parameter count of at least 1e6 (e.g. 7.5e9), got {n!r}")
    total = int(round(n))
    h = max(256, int(round((total * 128 / 12) ** (1 / 3) / 128)) * 128)
    while h > 256 and vocab_size * h > total / 3:  # tiny models: keep the embedding a minority
        h -= 128
    embedding = vocab_size * h
    layers = max(1, round((total - embedding) / (12 * h * h)))
    per_layer = max(0, (total - embedding) // layers)
    inter = int(8 * h / 3 / 128 + 0.5) * 128 or h
    return ModelCounts(
        total=total, embedding=embedding, per_layer=per_layer,
        largest_tensor=max(embedding, h * inter), hidden_size=h, num_layers=layers, num_heads=h // 128,
        num_kv_heads=h // 128, head_dim=128, intermediate_size=inter, vocab_size=vocab_size,
        tied_embeddings=True, exact=False, architecture="params-only",
        note=f"only --params given: shape for activations assumed (h={h}, L={layers}, V={vocab_size}, "
             f"MLP {inter}); pass --model for an exact count",
    )
