"""Models with their own code (config.json's auto_map), as hub models with custom architectures ship: the tiny
Llama's weights behind a subclass that only trust_remote_code loads. FORWARDS says how each treats packed rows."""
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
}


def custom_code_model(tiny_model: Path, out: Path, forward: str = "builders") -> Path:
    shutil.copytree(tiny_model, out)
    (out / "configuration_tinycustom.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass TinyCustomConfig(LlamaConfig):\n"
        "    model_type = 'tinycustom'\n")
    (out / "modeling_tinycustom.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_tinycustom import TinyCustomConfig\n\n\n"
        "class TinyCustomForCausalLM(LlamaForCausalLM):\n    config_class = TinyCustomConfig\n\n" + FORWARDS[forward])
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(model_type="tinycustom", architectures=["TinyCustomForCausalLM"],
               auto_map={"AutoConfig": "configuration_tinycustom.TinyCustomConfig",
                         "AutoModelForCausalLM": "modeling_tinycustom.TinyCustomForCausalLM"})
    (out / "config.json").write_text(json.dumps(cfg))
    return out
