"""Models with their own code (config.json's auto_map), as hub models with custom architectures ship: the tiny
Llama's weights behind a subclass that only trust_remote_code loads. FORWARDS says how each treats packed rows
and where its attention runs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

FORWARDS = {
    # transformers 5's own code: its mask builders find packed samples in the position ids and use a 4D mask
    # handed in as it is (eager attention adds it to the scores).
    "builders": "",
    # Older code that builds its masks from the attention mask alone: without one it attends across the row.
    "no_positions": ("    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):\n"
                     "        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)\n"),
    # Code that neither reads position ids nor takes a mask: causal over the whole row, whatever it is handed.
    "no_separation": ("    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):\n"
                      "        return super().forward(input_ids=input_ids, **kwargs)\n"),
    # Code with its own attention (causal sdpa over whatever it is given), not transformers' attention functions.
    "own_attention": ("    def __init__(self, config):\n"
                      "        super().__init__(config)\n"
                      "        for layer in self.model.layers:\n"
                      "            layer.self_attn.forward = types.MethodType(own_attention, layer.self_attn)\n"),
    # transformers' Llama whose MLPs write down, at every call, whether the model is in training mode and grad is on.
    "records": ("    def __init__(self, config):\n"
                "        super().__init__(config)\n"
                "        for layer in self.model.layers:\n"
                "            layer.mlp.forward = types.MethodType(recorded(type(layer.mlp).forward), layer.mlp)\n"),
}
RECORDS = """import os
import types

import torch


def recorded(forward):
    def wrapper(self, *args, **kwargs):
        with open(f"{os.environ['SHARDTUNE_TEST_RECORD']}.{os.getpid()}", "a") as fh:
            fh.write(f"{int(self.training)} {int(torch.is_grad_enabled())}\\n")
        return forward(self, *args, **kwargs)
    return wrapper
"""
OWN_ATTENTION = """import types

import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv


def own_attention(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
    q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
    k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling)
    return self.o_proj(out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)), None
"""


def custom_code_model(tiny_model: Path, out: Path, forward: str = "builders") -> Path:
    shutil.copytree(tiny_model, out)
    (out / "configuration_tinycustom.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass TinyCustomConfig(LlamaConfig):\n"
        "    model_type = 'tinycustom'\n")
    (out / "modeling_tinycustom.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_tinycustom import TinyCustomConfig\n\n"
        + {"own_attention": OWN_ATTENTION, "records": RECORDS}.get(forward, "") + "\n\n"
        "class TinyCustomForCausalLM(LlamaForCausalLM):\n    config_class = TinyCustomConfig\n\n" + FORWARDS[forward])
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(model_type="tinycustom", architectures=["TinyCustomForCausalLM"],
               auto_map={"AutoConfig": "configuration_tinycustom.TinyCustomConfig",
                         "AutoModelForCausalLM": "modeling_tinycustom.TinyCustomForCausalLM"})
    (out / "config.json").write_text(json.dumps(cfg))
    return out
