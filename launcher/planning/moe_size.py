"""Parameter counts of mixture-of-experts models from `config.json`, without torch.

An MoE model stores every expert but routes each token through only `top_k` of them, so one model has
two sizes: the total, which decides memory (every expert has weights, gradients and optimizer states),
and the active part, which decides FLOPs. A dense formula applied to Mixtral-8x7B gives 6.7B where the
model has 46.7B, and a planner that believes it says "fits" for a run that needs seven times the memory.

The formulas below mirror the module shapes of transformers 5.24 for Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE, gpt-oss and DeepSeek-V2/V3 (multi-head latent attention, shared experts, leading dense layers),
and tests/test_moe_size.py checks them to the parameter against the real modules built on the meta
device. Missing keys fall back to the defaults of transformers' configuration classes (DEFAULTS).

Two conventions for "active" exist on model cards, and both are reported:
  active         every parameter a token touches, the input embedding included: Mixtral's 12.9B,
                 Qwen3-30B-A3B's 3.3B, OLMoE's 1.3B;
  active_matmul  the same without the input embedding, a table lookup that costs no FLOPs (with tied
                 embeddings nothing is removed: the shared matrix is the LM head's matmul): gpt-oss-20b's
                 3.6B, DeepSeek-V3's 37B. 6·N·D training FLOPs use this one.

Architectures with experts that have no formula here are never sized by a dense formula: the planner
builds them on the meta device when torch is available (launcher/planning/meta_size.py), or falls back
to `approximate_moe`, which says how far off it may be.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from launcher.contract.errors import ConfigError

# Defaults of the transformers 5.24 configuration classes, for the keys used here.
DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=None, tie_word_embeddings=False,
                    num_experts_per_tok=2, num_local_experts=8),
    "qwen2_moe": dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False,
                      decoder_sparse_step=1, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                      num_experts_per_tok=4, num_experts=60, mlp_only_layers=None, qkv_bias=True),
    "qwen3_moe": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24,
                      num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False,
                      attention_bias=False, decoder_sparse_step=1, moe_intermediate_size=768,
                      num_experts_per_tok=8, num_experts=128, mlp_only_layers=None),
    "olmoe": dict(vocab_size=50304, hidden_size=2048, intermediate_size=2048, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=None, tie_word_embeddings=False,
                  attention_bias=False, num_experts_per_tok=8, num_experts=64),
    "gpt_oss": dict(num_hidden_layers=36, num_local_experts=128, vocab_size=201088, hidden_size=2880,
                    intermediate_size=2880, head_dim=64, num_attention_heads=64, num_key_value_heads=8,
                    tie_word_embeddings=False, num_experts_per_tok=4, attention_bias=True),
    "deepseek_v2": dict(vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, tie_word_embeddings=False, attention_bias=False,
                        mlp_bias=False, first_k_dense_replace=0, kv_lora_rank=512, q_lora_rank=1536,
                        n_routed_experts=64, n_shared_experts=2, qk_nope_head_dim=128, qk_rope_head_dim=64,
                        v_head_dim=128, num_experts_per_tok=None, moe_intermediate_size=1407),
    "deepseek_v3": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                        n_shared_experts=1, n_routed_experts=256, kv_lora_rank=512, q_lora_rank=1536,
                        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, num_experts_per_tok=8,
                        first_k_dense_replace=3, tie_word_embeddings=False, attention_bias=False),
}
MOE_FAMILIES = tuple(DEFAULTS)

# Keys that name the number of routed experts, and the experts per token, across model families.
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "experts_per_token", "moe_top_k", "num_selected_experts")


@dataclass(frozen=True)
class MoeCounts:
    """What only an MoE model has; counts are numbers of parameters (elements)."""

    num_experts: int
    """Routed experts per MoE layer."""
    top_k: Optional[int]
    """Experts each token is routed to (None: unknown, so no active count)."""
    moe_layers: int
    dense_layers: int
    per_expert: int
    """Parameters of one routed expert."""
    expert_intermediate: int
    """MLP width of one routed expert."""
    shared_intermediate: int
    """Summed MLP width of the shared experts every token also passes through (0: none)."""
    active: Optional[int]
    """Parameters one token touches, the input embedding included (Mixtral/Qwen/OLMoE model cards)."""
    active_matmul: Optional[int]
    """`active` without the input embedding lookup: what 6·N·D FLOPs count (gpt-oss/DeepSeek model cards)."""
    block_params: int
    """One MoE block (router, experts, shared experts): what ZeRO-3 gathers at once for a leaf module."""
    counted_by: str = "formula"
    """"formula" (this module), "meta-device" (the model built by transformers) or "approximate"."""
    uncertainty: float = 0.0
    """For "approximate": how far off the total may be, as a fraction (0.25 = ±25 %)."""


@dataclass(frozen=True)
class ModelShape:
    """The numbers every model has, dense or not (the memory model keys activations on them); model_size.ModelCounts
    adds what the planner derives from them. Kept here, below model_size, so the MoE counters can build one."""

    total: int
    embedding: int  # input embedding + the untied lm_head (0 extra when tied)
    largest_tensor: int  # the largest single parameter: ZeRO-3 must gather at least this many elements at once
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool


def _error(problem: str) -> ConfigError:
    return ConfigError([problem], title="cannot size the model")


def _first_int(cfg: dict[str, Any], keys: tuple[str, ...]) -> Optional[int]:
    """The first positive integer among `keys`, looking inside dbrx-style `ffn_config` too."""
    nested = cfg.get("ffn_config") if isinstance(cfg.get("ffn_config"), dict) else {}
    for source in (cfg, nested):
        for key in keys:
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def expert_count(cfg: dict[str, Any]) -> Optional[int]:
    """Routed experts per MoE layer as the config states it, under any of the common key names."""
    return _first_int(cfg, EXPERT_COUNT_KEYS)


def has_experts(cfg: dict[str, Any]) -> bool:
    """True for a mixture-of-experts config: such a model must never be sized by a dense formula."""
    return (expert_count(cfg) or 0) > 1


class _Cfg:
    """config.json values with the family's transformers defaults behind them; errors name the key."""

    def __init__(self, cfg: dict[str, Any], source: str):
        self.cfg, self.source, self.defaults = cfg, source, DEFAULTS[cfg["model_type"]]

    def get(self, key: str) -> Any:
        return self.cfg[key] if key in self.cfg else self.defaults.get(key)

    def int(self, key: str) -> int:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise _error(f"{self.source}: {key} must be a positive integer, got {value!r}")
        return value


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _gated_mlp(h: int, width: int, bias: bool = False) -> int:
    """gate and up (h -> width) and down (width -> h): SwiGLU."""
    return 2 * _linear(h, width, bias) + _linear(width, h, bias)


def _gqa_attention(h: int, heads: int, kv: int, hd: int, qkv_bias: bool, o_bias: bool) -> int:
    return _linear(h, heads * hd, qkv_bias) + 2 * _linear(h, kv * hd, qkv_bias) + _linear(heads * hd, h, o_bias)


def _mla_attention(c: _Cfg, h: int, heads: int) -> tuple[int, list[int]]:
    """DeepSeek's multi-head latent attention with its low-rank norms; (parameters, weight matrix sizes)."""
    q_rank, kv_rank = c.get("q_lora_rank"), c.int("kv_lora_rank")
    nope, rope, v = c.int("qk_nope_head_dim"), c.int("qk_rope_head_dim"), c.int("v_head_dim")
    bias = bool(c.get("attention_bias"))
    qk = nope + rope
    if q_rank is None:
        q, q_mats = _linear(h, heads * qk, False), [h * heads * qk]
    else:  # q_a_proj, q_a_layernorm, q_b_proj
        q = _linear(h, q_rank, bias) + q_rank + _linear(q_rank, heads * qk, False)
        q_mats = [h * q_rank, q_rank * heads * qk]
    kv = _linear(h, kv_rank + rope, bias) + kv_rank + _linear(kv_rank, heads * (nope + v), False)
    o = _linear(heads * v, h, bias)
    return q + kv + o, q_mats + [h * (kv_rank + rope), kv_rank * heads * (nope + v), heads * v * h]


def _layer_kinds(c: _Cfg, num_experts: int) -> list[bool]:
    """For each decoder layer: is it an MoE layer? The rule each transformers implementation applies."""
    mt, layers = c.cfg["model_type"], c.int("num_hidden_layers")
    if mt in ("qwen2_moe", "qwen3_moe"):
        only, step = c.get("mlp_only_layers") or [], c.get("decoder_sparse_step") or 1
        return [i not in only and num_experts > 0 and (i + 1) % step == 0 for i in range(layers)]
    if mt in ("deepseek_v2", "deepseek_v3"):  # transformers reads first_k_dense_replace only (not moe_layer_freq)
        first_dense = c.get("first_k_dense_replace") or 0
        return [i >= first_dense for i in range(layers)]
    return [True] * layers


def count_moe(cfg: dict[str, Any], source: str = "config.json") -> tuple[ModelShape, MoeCounts]:
    """Exact counts for a model_type in MOE_FAMILIES, from its config.json alone."""
    mt = cfg.get("model_type")
    if mt not in DEFAULTS:
        raise _error(f"{source}: model_type {mt!r} has no MoE formula; formulas exist for {', '.join(MOE_FAMILIES)}")
    c = _Cfg(cfg, source)
    h, vocab, layers, heads = (c.int("hidden_size"), c.int("vocab_size"), c.int("num_hidden_layers"),
                               c.int("num_attention_heads"))
    kv = c.get("num_key_value_heads") or heads
    tied = bool(c.get("tie_word_embeddings"))
    bias = bool(c.get("attention_bias"))
    # head_dim: Mixtral and gpt-oss fall back to h/heads when it is null; the Qwen/OLMoE configs only when absent.
    hd = (c.get("head_dim") if mt in ("mixtral", "gpt_oss") else cfg.get("head_dim")) or h // heads
    inter = c.int("intermediate_size")
    shared_width, shared, dense_mlp, router = 0, 0, _gated_mlp(h, inter), None
    if mt == "mixtral":
        experts, width = c.int("num_local_experts"), inter
        attention = _gqa_attention(h, heads, kv, hd, False, False)
    elif mt == "qwen2_moe":
        experts, width = c.int("num_experts"), c.int("moe_intermediate_size")
        attention = _gqa_attention(h, heads, kv, hd, bool(c.get("qkv_bias")), False)
        shared_width = c.int("shared_expert_intermediate_size")
        shared = _gated_mlp(h, shared_width) + h  # + shared_expert_gate (h -> 1)
    elif mt == "qwen3_moe":
        experts, width = c.int("num_experts"), c.int("moe_intermediate_size")
        attention = _gqa_attention(h, heads, kv, hd, bias, bias) + 2 * hd  # q_norm, k_norm over head_dim
    elif mt == "olmoe":
        experts, width = c.int("num_experts"), inter
        # q_norm over the whole query width (h), k_norm over the key width (h / heads · kv heads)
        attention = _gqa_attention(h, heads, kv, hd, bias, bias) + h + (h // heads) * kv
    elif mt == "gpt_oss":
        experts, width = c.int("num_local_experts"), inter
        attention = _gqa_attention(h, heads, kv, hd, bias, bias) + heads  # + one attention sink per head
        router = experts * h + experts  # the router has a bias
    else:  # deepseek_v2, deepseek_v3
        experts, width = c.int("n_routed_experts"), c.int("moe_intermediate_size")
        attention, attention_mats = _mla_attention(c, h, heads)
        mlp_bias = bool(c.get("mlp_bias")) if mt == "deepseek_v2" else False
        shared_width = width * c.int("n_shared_experts")
        shared = _gated_mlp(h, shared_width, mlp_bias)
        dense_mlp = _gated_mlp(h, inter, mlp_bias)
    top_k = c.get("num_experts_per_tok")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 0 < top_k <= experts:
        raise _error(f"{source}: num_experts_per_tok must be an integer from 1 to the {experts} experts, got {top_k!r}")
    # gpt-oss experts carry biases on both projections; everyone else's are bias-free SwiGLU.
    per_expert = 2 * h * width + 2 * width + width * h + h if mt == "gpt_oss" else 3 * h * width
    router = experts * h if router is None else router

    kinds = _layer_kinds(c, experts)
    n_moe = sum(kinds)
    n_dense = layers - n_moe
    block = router + experts * per_expert + shared
    embedding = vocab * h
    head = 0 if tied else vocab * h
    total = embedding + head + h + layers * (attention + 2 * h) + n_moe * block + n_dense * dense_mlp
    active = total - n_moe * (experts - top_k) * per_expert

    # The largest single tensor: transformers 5 fuses each layer's experts into one 3D gate_up_proj
    # (E, 2·I, h), usually the biggest thing ZeRO-3 ever gathers (7.5B elements in DeepSeek-V3).
    if mt in ("deepseek_v2", "deepseek_v3"):
        tensors = [embedding, *attention_mats]
    else:
        tensors = [embedding, h * heads * hd, h * kv * hd]
    if n_moe:
        tensors += [experts * 2 * width * h, shared_width * h]
    if n_dense:
        tensors.append(inter * h)
    shape = ModelShape(total=total, embedding=embedding + head, largest_tensor=max(tensors), hidden_size=h,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv if "deepseek" not in mt else heads,
                       head_dim=hd if "deepseek" not in mt else c.int("qk_nope_head_dim") + c.int("qk_rope_head_dim"),
                       intermediate_size=inter, vocab_size=vocab, tied_embeddings=tied)
    moe = MoeCounts(num_experts=experts, top_k=top_k, moe_layers=n_moe, dense_layers=n_dense, per_expert=per_expert,
                    expert_intermediate=width, shared_intermediate=shared_width, active=active,
                    active_matmul=active - (0 if tied else embedding), block_params=block if n_moe else 0)
    return shape, moe


def approximate_moe(cfg: dict[str, Any], source: str = "config.json") -> tuple[ModelShape, MoeCounts]:
    """A generic MoE layout for configs no formula covers and no meta-device build could count.

    Grouped-query attention, SwiGLU experts of `moe_intermediate_size` (else `intermediate_size`), a
    router, shared experts when the config names them, and dense leading layers when it says so. The
    largest unknown is the expert itself: with two matrices instead of three (a plain MLP) the experts
    are a third smaller, so `uncertainty` is a third of the experts' share of the total plus 5 % for
    attention and norm variants.
    """
    def need(*keys: str) -> int:
        value = _first_int(cfg, keys)
        if value is None:
            raise _error(f"{source}: missing {' or '.join(keys)}; cannot size this mixture-of-experts model")
        return value

    h, layers, heads, vocab = (need("hidden_size", "d_model"), need("num_hidden_layers", "n_layers"),
                               need("num_attention_heads", "n_heads"), need("vocab_size"))
    experts = need(*EXPERT_COUNT_KEYS)
    top_k = _first_int(cfg, TOP_K_KEYS)
    kv = _first_int(cfg, ("num_key_value_heads",)) or heads
    hd = _first_int(cfg, ("head_dim",)) or h // heads
    inter = _first_int(cfg, ("intermediate_size", "ffn_hidden_size")) or 4 * h
    width = _first_int(cfg, ("moe_intermediate_size", "expert_intermediate_size", "ffn_hidden_size")) or inter
    shared_width = (_first_int(cfg, ("shared_expert_intermediate_size",))
                    or (_first_int(cfg, ("n_shared_experts", "num_shared_experts")) or 0) * width)
    n_dense = min(layers, _first_int(cfg, ("first_k_dense_replace",)) or len(cfg.get("mlp_only_layers") or []))
    n_moe = layers - n_dense
    tied = bool(cfg.get("tie_word_embeddings", False))
    per_expert = 3 * h * width
    block = experts * h + experts * per_expert + 3 * h * shared_width
    embedding, head = vocab * h, 0 if tied else vocab * h
    attention = 2 * h * heads * hd + 2 * h * kv * hd
    total = embedding + head + h + layers * (attention + 2 * h) + n_moe * block + n_dense * 3 * h * inter
    active = None if top_k is None else total - n_moe * (experts - top_k) * per_expert
    uncertainty = round(n_moe * experts * h * width / total + 0.05, 2)
    shape = ModelShape(total=total, embedding=embedding + head,
                       largest_tensor=max(embedding, experts * 2 * width * h, h * heads * hd), hidden_size=h,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=hd, intermediate_size=inter,
                       vocab_size=vocab, tied_embeddings=tied)
    moe = MoeCounts(num_experts=experts, top_k=top_k, moe_layers=n_moe, dense_layers=n_dense, per_expert=per_expert,
                    expert_intermediate=width, shared_intermediate=shared_width, active=active,
                    active_matmul=None if active is None else active - (0 if tied else embedding),
                    block_params=block, counted_by="approximate", uncertainty=uncertainty)
    return shape, moe


def moe_mlp_activation_bytes(moe: MoeCounts, hidden: int, tokens: int, e: int) -> int:
    """Bytes an MoE block keeps for backward, measured on transformers' grouped_mm experts (tests/test_moe_size.py).

    Each of the t·k routed copies of a token keeps its sorted input and the down projection's output
    (2·h), the gate/up output, the activation and their product (4·I), all in the activation dtype;
    the router keeps fp32 probabilities (4·E per token) and ~40 bytes per routed copy of top-k values,
    indices and the sort permutation. Shared experts are a dense SwiGLU every token passes (4·e·I_shared),
    plus the output they are scaled or summed into (e·h).
    """
    k = moe.top_k or moe.num_experts  # unknown routing: assume the worst, every expert
    routed = e * k * (2 * hidden + 4 * moe.expert_intermediate) + 4 * moe.num_experts + 40 * k
    shared = (4 * e * moe.shared_intermediate + e * hidden) if moe.shared_intermediate else 0
    return tokens * (routed + shared)
