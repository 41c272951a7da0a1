"""Tiny random mixture-of-experts models built from configs, with the real tokenizer of examples/tiny_model.py.

Small enough that a 2-rank ZeRO-3 run on CPU takes seconds, with enough experts that two ranks' tokens
pick different ones (the situation that hangs ZeRO-3 without leaf modules).
"""
from __future__ import annotations

from pathlib import Path

# Per model_type: the MoE keys of its config (hidden 64, 2 layers, 4 heads / 2 kv heads come from BASE).
MOE_CONFIGS = {
    "mixtral": dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02),
    "qwen3_moe": dict(intermediate_size=128, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                      head_dim=16, norm_topk_prob=True, router_aux_loss_coef=0.02),
    "olmoe": dict(intermediate_size=32, num_experts=32, num_experts_per_tok=1, router_aux_loss_coef=0.01),
    "qwen2_moe": dict(intermediate_size=128, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                      shared_expert_intermediate_size=64, router_aux_loss_coef=0.02),
    "gpt_oss": dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, head_dim=16, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"], router_aux_loss_coef=0.02),
    "deepseek_v3": dict(intermediate_size=128, moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2,
                        n_group=1, topk_group=1, first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=16,
                        q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                        num_key_value_heads=4),
    "deepseek_v2": dict(intermediate_size=128, moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2,
                        first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=None,
                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_key_value_heads=4,
                        topk_method="greedy"),
}
BASE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=4096, tie_word_embeddings=False)


def tiny_moe_config(model_type: str, vocab_size: int = 512, **overrides):
    """A transformers config object for a tiny model of this MoE family."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**BASE, "vocab_size": vocab_size, **MOE_CONFIGS[model_type],
                                               **overrides})


def make_tiny_moe(out_dir: str | Path, model_type: str, seed: int = 0, **overrides) -> Path:
    """Save a random MoE causal LM of this family and the tiny tokenizer to out_dir (a Hugging Face directory)."""
    import torch
    from transformers import AutoModelForCausalLM

    from examples.tiny_model import make_tokenizer, save_with_tokenizer

    out = Path(out_dir)
    tokenizer = make_tokenizer(512)
    config = tiny_moe_config(model_type, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **overrides)
    torch.manual_seed(seed)
    return save_with_tokenizer(AutoModelForCausalLM.from_config(config), tokenizer, out)
