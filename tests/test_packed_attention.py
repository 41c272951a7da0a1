"""Packed samples stay apart on every attention the trainer runs them with: sdpa and eager, causal and
sliding-window layers, models that pass position ids to transformers' mask builders and gpt-oss, which does not.

The reference is each sample run through the same model alone: no packing, no mask, no position ids.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer import separation
from trainer.data.collate import IGNORE, collate
from trainer.data.packing import build_packed

from moe_models import tiny_moe_config

LENGTHS = [[20, 12], [5, 17, 10], [30]]
"""Three rows of width 32: two and three samples, and one sample with padding. Samples of 17-30 tokens against
windows of 8: a sliding-window layer that attends past its window differs."""
WINDOW = 8
DENSE = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def tiny(model_type: str):
    from transformers import AutoConfig

    if model_type == "gpt_oss":
        return tiny_moe_config("gpt_oss", vocab_size=100, sliding_window=WINDOW)
    extra = {"llama": {}, "mistral": dict(sliding_window=WINDOW),
             "gemma2": dict(head_dim=16, sliding_window=WINDOW),
             "gemma3_text": dict(head_dim=16, sliding_window=WINDOW,
                                 layer_types=["sliding_attention", "full_attention"])}[model_type]
    return AutoConfig.for_model(model_type, **DENSE, **extra)


def packed_data():
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 100, n) for row in LENGTHS for n in row]
    labels = [i.copy() for i in ids]
    groups, k = [], 0
    for row in LENGTHS:
        groups.append(list(range(k, k + len(row))))
        k += len(row)
    return build_packed(ids, labels, groups), ids


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")


@pytest.mark.parametrize("model_type,attention", [("llama", "sdpa"), ("llama", "eager"), ("mistral", "sdpa"),
                                                  ("gemma3_text", "sdpa"), ("gemma3_text", "eager"),
                                                  ("gemma2", "eager"), ("gpt_oss", "eager")])
def test_packed_losses_equal_each_sample_alone(model_type, attention):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny(model_type), attn_implementation=attention).eval()
    assert separation.separation_for(attention, 1, native=True) == "positions"
    hooked = separation.install(model)
    assert hooked == (model_type in ("gemma3_text", "gemma2", "gpt_oss"))  # the configs that list layer_types
    data, samples = packed_data()
    batch = collate(data, np.arange(len(LENGTHS)), pad_id=0, separation="positions", multiple_of=32)
    assert batch.attention_mask is None
    with torch.no_grad():
        packed = token_losses(model(**batch.model_inputs()).logits, batch.targets)
        compared, k = 0, 0
        for row, lens in enumerate(LENGTHS):
            start = 0
            for n in lens:
                alone = torch.as_tensor(samples[k], dtype=torch.long)[None]
                want = token_losses(model(input_ids=alone).logits[:, :-1], alone[:, 1:])[0]
                torch.testing.assert_close(packed[row, start:start + n - 1], want, atol=2e-5, rtol=2e-5)
                compared += n - 1
                start, k = start + n, k + 1
    assert compared == sum(map(sum, LENGTHS)) - sum(map(len, LENGTHS))


@pytest.mark.parametrize("model_type,attention", [("llama", "eager"), ("mistral", "sdpa"), ("gpt_oss", "eager")])
def test_a_block_diagonal_bool_mask_is_wrong_here(model_type, attention):
    """Control: what collate handed these models before. Eager adds the bool mask to the scores (masking nothing,
    not even the future), and a 4D mask overrides the sliding window."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny(model_type), attn_implementation=attention).eval()
    data, _ = packed_data()
    rows = np.arange(len(LENGTHS))
    with torch.no_grad():
        right = model(**collate(data, rows, 0, separation="positions", multiple_of=32).model_inputs()).logits
        wrong = model(**collate(data, rows, 0, separation="mask", multiple_of=32).model_inputs()).logits
    assert (right - wrong).abs().max() > 1e-2
