"""The trainer's MoE machinery in one process (issue 19): the router aux loss against transformers' own, on
packed 4D masks and under activation checkpointing; ZeRO-3 leaf modules on every known MoE block."""
from __future__ import annotations

import pytest
import torch

from launcher.contract.errors import UserError
from trainer.moe import KNOWN_MOE_BLOCKS, NoRouterAuxLoss, RouterAuxLoss, register_leaf_modules, router_aux_loss

from moe_models import MOE_CONFIGS, tiny_moe_config
from test_chunked_loss import next_token_batch

AUX_FAMILIES = ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "gpt_oss"]
# The block that holds router and experts in each family (read off transformers 5.24's modeling files).
BLOCKS = {"mixtral": "MixtralSparseMoeBlock", "qwen2_moe": "Qwen2MoeSparseMoeBlock",
          "qwen3_moe": "Qwen3MoeSparseMoeBlock", "olmoe": "OlmoeSparseMoeBlock", "gpt_oss": "GptOssMLP",
          "deepseek_v3": "DeepseekV3MoE", "deepseek_v2": "DeepseekV2Moe"}


def tiny_model(model_type: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    # eager attention: gpt-oss has no sdpa path, and the comparison below does not depend on the kernel
    return AutoModelForCausalLM.from_config(tiny_moe_config(model_type, vocab_size=100, **overrides),
                                            attn_implementation="eager")


def padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """3 rows of different lengths, right-padded: the 2D mask transformers' aux loss understands."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (3, 12), generator=g)
    mask = torch.arange(12)[None, :] < torch.tensor([12, 7, 4])[:, None]
    return ids, mask


@pytest.mark.parametrize("model_type", AUX_FAMILIES)
def test_aux_loss_and_its_gradient_equal_transformers(model_type):
    """One rank: our value and gradient are those of `outputs.aux_loss` with output_router_logits=True."""
    ids, mask = padded_batch()
    ours_model, theirs_model = tiny_model(model_type), tiny_model(model_type)
    aux = router_aux_loss(ours_model, 1.0, world=1)
    assert isinstance(aux, RouterAuxLoss) and aux.top_k == MOE_CONFIGS[model_type].get("num_experts_per_tok")
    with aux.recording():
        ours_model(input_ids=ids, attention_mask=mask.long())
    aux.loss_share(mask, micro_steps=1).backward()
    theirs = theirs_model(input_ids=ids, attention_mask=mask.long(), output_router_logits=True).aux_loss
    theirs.backward()
    assert aux.metrics()["aux_loss"] == pytest.approx(theirs.item(), rel=1e-6)
    routers = [n for n, p in ours_model.named_parameters() if ("gate" in n or "router" in n) and p.grad is not None]
    assert routers
    theirs_params = dict(theirs_model.named_parameters())
    for name in routers:
        assert torch.allclose(dict(ours_model.named_parameters())[name].grad, theirs_params[name].grad,
                              rtol=1e-5, atol=1e-8), name


def test_packed_4d_masks_and_checkpoint_recomputation():
    """transformers' own aux loss breaks on the block-diagonal mask packing needs (the crash in the issue);
    ours reads the 2D token mask, and the routers' second run during recomputation is not counted."""
    from trainer.data.collate import collate

    class Packed:  # two rows: one holding two samples (so collate builds the 4D mask), one padded
        def sequence(self, k):
            import numpy as np
            rows = [(np.arange(10) % 90 + 5, np.arange(10), [6, 4]), (np.arange(7) % 90 + 5, np.arange(7), [7])]
            return rows[k]

    batch = collate(Packed(), [0, 1], pad_id=0)
    assert batch.attention_mask is not None and batch.attention_mask.dim() == 4
    assert batch.token_mask.tolist()[1] == [True] * 7 + [False] * 9
    model = tiny_model("mixtral")
    with pytest.raises(RuntimeError, match="must match the size of tensor"):
        model(**batch.model_inputs(), output_router_logits=True)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    aux = router_aux_loss(model, 0.5, world=1)
    calls = []
    model.model.layers[0].mlp.gate.register_forward_hook(lambda *_: calls.append(1))
    with aux.recording():
        out = model(**batch.model_inputs())
    assert len(aux.logits) == 2 and len(calls) == 1  # one per MoE layer
    share = aux.loss_share(batch.token_mask, micro_steps=2)
    (out.logits.float().mean() + share).backward()
    assert len(calls) == 2 and aux.logits == []  # the router ran again in the recomputation, unrecorded
    value = aux.metrics()["aux_loss"]
    assert share.item() == pytest.approx(0.5 * value / 2, rel=1e-6)  # coef × value / micro steps
    assert 1.0 <= value <= 8.0  # a load-balancing loss: top_k = 2 when balanced, E = 8 at worst


def test_coefficient_comes_from_the_model_and_can_be_overridden_or_disabled():
    model = tiny_model("mixtral", router_aux_loss_coef=0.02)
    assert router_aux_loss(model, None, world=2).coef == 0.02
    assert router_aux_loss(model, 0.1, world=2).coef == 0.1
    assert type(router_aux_loss(model, 0.0, world=2)) is NoRouterAuxLoss
    flagged = tiny_model("mixtral", output_router_logits=True)
    router_aux_loss(flagged, 0.0, world=1)
    assert flagged.config.output_router_logits is False  # on, transformers' aux loss crashes packed batches
    deepseek = tiny_model("deepseek_v3")  # balances with router biases: transformers defines no aux loss
    assert type(router_aux_loss(deepseek, None, world=2)) is NoRouterAuxLoss
    with pytest.raises(UserError, match="model.router_aux_loss_coef: 0.01 is not allowed for DeepseekV3ForCausalLM"):
        router_aux_loss(deepseek, 0.01, world=2)


@pytest.mark.parametrize("model_type", sorted(BLOCKS))
def test_every_known_moe_block_becomes_a_zero3_leaf(model_type):
    with torch.device("meta"):
        model = tiny_model(model_type)
    assert register_leaf_modules(model, []) == [BLOCKS[model_type]]
    leaves = [m for m in model.modules() if getattr(m, "_z3_leaf", False)]
    assert len(leaves) == model.config.num_hidden_layers - getattr(model.config, "first_k_dense_replace", 0)
    assert {type(m).__name__ for m in leaves} == {BLOCKS[model_type]}
    assert BLOCKS[model_type] in KNOWN_MOE_BLOCKS


def test_extra_leaf_classes_are_flagged_and_typos_fail():
    with torch.device("meta"):
        model = tiny_model("qwen3_moe")
    assert register_leaf_modules(model, ["Qwen3MoeAttention"]) == ["Qwen3MoeAttention", "Qwen3MoeSparseMoeBlock"]
    assert sum(getattr(m, "_z3_leaf", False) for m in model.modules()) == 4
    with pytest.raises(UserError, match=r"model.moe_leaf_modules: \['Qwen3MoeSparseBlock'\] matches no module .* "
                                        r"Qwen3MoeSparseMoeBlock"):
        register_leaf_modules(model, ["Qwen3MoeSparseBlock"])


@pytest.mark.parametrize("model_type", sorted(MOE_CONFIGS))
def test_the_chunked_loss_is_exact_on_every_known_moe_family(model_type):
    """`train.chunked_loss: auto` chunks the loss of MoE models too: their heads are plain linear layers, and the
    router aux loss is recorded from the routers (trainer/moe.py), not added by the model's forward, so it is the
    same whichever way the LM loss is taken. Checked against the model's own forward to full logits: the loss, and
    every parameter's gradient of loss + aux loss, routers included."""
    from trainer.loss import prepare_loss
    from trainer.model import token_loss_sum

    plain, chunked = tiny_model(model_type), tiny_model(model_type)
    messages = []
    assert prepare_loss(chunked, "auto", messages.append).__name__ == "chunked_loss", messages
    ids, positions, targets = next_token_batch(vocab=100, length=24, prompt=8)
    token_mask = torch.ones_like(ids, dtype=torch.bool)
    objectives = []
    for model, run in ((plain, lambda m: token_loss_sum(m(input_ids=ids, position_ids=positions,
                                                           use_cache=False).logits, targets)),
                       (chunked, lambda m: m(input_ids=ids, position_ids=positions, targets=targets))):
        aux = router_aux_loss(model, None, world=1)
        with aux.recording():
            loss = run(model)
        share = aux.loss_share(token_mask, micro_steps=1)
        (loss if share is None else loss + share).backward()
        objectives.append((loss.item(), aux.metrics().get("aux_loss")))
    assert objectives[1][0] == pytest.approx(objectives[0][0], rel=1e-6)
    assert objectives[1][1] == (None if objectives[0][1] is None else pytest.approx(objectives[0][1], rel=1e-6))
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:  # float rounding only: measured ≤ 7e-7 relative over the families
            assert (q.grad - p.grad).norm() <= 1e-5 * p.grad.norm(), name
