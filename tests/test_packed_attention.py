"""Packed samples stay apart with every attention the trainer runs them on: one sdpa call per sample where every
layer is causal, else transformers' masks built from the position ids (sdpa and eager, causal and sliding-window
layers, models that pass the position ids to transformers' mask builders and gpt-oss, which does not).

The reference is each sample run through the same model alone: no packing, no mask, no position ids.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from launcher.contract.run_dir import RunDir
from trainer import separation
from trainer.data.collate import IGNORE, collate
from trainer.data.packing import build_packed

from conftest import losses, shardtune, tiny_config
from moe_models import tiny_moe_config
from remote_models import custom_code_model

LENGTHS = [[20, 12], [5, 17, 10], [30]]
"""Three rows of width 32: two and three samples, and one sample with padding. Samples of 17-30 tokens against
windows of 8: a sliding-window layer that attends past its window differs."""
WINDOW = 8
DENSE = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def tiny(model_type: str, window: int = WINDOW):
    from transformers import AutoConfig

    if model_type in ("gpt_oss", "deepseek_v3"):
        return tiny_moe_config(model_type, vocab_size=100, **({"sliding_window": window} if model_type == "gpt_oss"
                                                              else {}))
    extra = {"llama": {}, "mistral": dict(sliding_window=window), "gemma2": dict(head_dim=16, sliding_window=window),
             "gemma3_text": dict(head_dim=16, sliding_window=window,
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


LONG, SHORT = separation.PER_SAMPLE_FROM, 256
CASES = [  # model, window, data.seq_len, attention asked for -> the kernel the trainer runs, whether it builds masks
    ("llama", None, LONG, "sdpa", separation.PACKED_ATTENTION, False),
    ("deepseek_v3", None, LONG, "sdpa", separation.PACKED_ATTENTION, False),  # MLA: values narrower than queries
    ("mistral", LONG, LONG, "sdpa", separation.PACKED_ATTENTION, False),  # a window no sample outgrows
    ("llama", None, SHORT, "sdpa", "sdpa", False),  # short rows: one batched call, transformers' mask
    ("llama", None, LONG, "eager", "eager", False),
    ("mistral", WINDOW, LONG, "sdpa", "sdpa", False),
    ("gemma3_text", WINDOW, LONG, "sdpa", "sdpa", True),
    ("gemma3_text", WINDOW, LONG, "eager", "eager", True),
    ("gemma2", WINDOW, LONG, "eager", "eager", True),
    ("gpt_oss", WINDOW, LONG, "eager", "eager", True),  # its forward does not pass the position ids to its builders
]


def largest_gap_from_alone(model, how: str) -> float:
    """The largest difference between a token's loss in the packed LENGTHS rows (separation `how`, "additive" as
    the trainer hands it) and its loss with its sample run alone: a second set of rows, samples and padding."""
    data, samples = packed_data()
    batch = collate(data, np.arange(len(LENGTHS)), pad_id=0, separation="mask" if how == "additive" else how,
                    multiple_of=32)
    hook = separation.install_additive_mask(model, torch.float32) if how == "additive" else None
    with torch.no_grad():
        packed = token_losses(model(**batch.model_inputs()).logits, batch.targets)
        gap, k = 0.0, 0
        for row, lens in enumerate(LENGTHS):
            start = 0
            for n in lens:
                alone = torch.as_tensor(samples[k], dtype=torch.long)[None]
                want = token_losses(model(input_ids=alone, use_cache=False).logits[:, :-1], alone[:, 1:])[0]
                gap = max(gap, (packed[row, start:start + n - 1] - want).abs().max().item())
                start, k = start + n, k + 1
    assert k == len(samples)
    if hook is not None:
        hook.remove()
    return gap



@pytest.mark.parametrize("model_type,window,seq_len,asked,kernel,builds_masks", CASES)
def test_packed_losses_equal_each_sample_alone(model_type, window, seq_len, asked, kernel, builds_masks):
    """The kernel is chosen for data.seq_len; the rows here are 32 wide (every kernel is exact at any width)."""
    from transformers import AutoModelForCausalLM

    config = tiny(model_type, window or WINDOW)
    assert separation.attention_kernel(asked, config.to_dict(), seq_len, packing=True, native=True) == kernel
    assert separation.attention_kernel(asked, config.to_dict(), seq_len, packing=False, native=True) == asked
    separation.register_packed_attention()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=kernel).eval()
    how = separation.separation_for(kernel, 1, native=True)
    assert how == ("none" if kernel == separation.PACKED_ATTENTION else "positions")
    assert separation.install_mask_builder(model) == builds_masks if how == "positions" else True
    with torch.no_grad():  # the trainer's own check before the first step passes, with rounding to spare
        found, distances = separation.verify_form(model, lambda inputs: model(**inputs).logits, torch.device("cpu"),
                                                  torch.float32, (how,))
    assert found == how and distances[how] < 1e-5
    data, _ = packed_data()
    assert collate(data, np.arange(len(LENGTHS)), pad_id=0, separation=how, multiple_of=32).attention_mask is None
    assert largest_gap_from_alone(model, how) < 1e-4


def test_the_per_sample_kernel_refuses_a_window_a_sample_outgrows():
    """Loaded by hand on a windowed model (the trainer never picks it there), it fails instead of attending past."""
    from transformers import AutoModelForCausalLM

    separation.register_packed_attention()
    model = AutoModelForCausalLM.from_config(tiny("mistral"), attn_implementation=separation.PACKED_ATTENTION)
    data, _ = packed_data()
    batch = collate(data, np.arange(len(LENGTHS)), pad_id=0, separation="none", multiple_of=32)
    with pytest.raises(ValueError, match="window is 8 tokens"):
        model(**batch.model_inputs())


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


def test_spans_are_reused_for_the_same_tensor_and_found_again_when_it_changes():
    """Every layer asks for the spans of the same position ids: the second ask must not recompute (on a GPU that
    is a host sync per layer), but a tensor changed in place, or an inference tensor, must not get stale spans."""
    positions = torch.tensor([[0, 1, 2, 0, 1]])
    first = separation.sample_spans(positions)
    assert first == [[(0, 3), (3, 5)]]
    assert separation.sample_spans(positions) is first
    positions[0, 3] = 3  # now 0 1 2 3 1: the same object, changed
    assert separation.sample_spans(positions) == [[(0, 4), (4, 5)]]
    with torch.inference_mode():
        frozen = torch.tensor([[0, 1, 0]])
    assert separation.sample_spans(frozen) == [[(0, 2), (2, 3)]]
    assert separation.sample_spans(frozen) == [[(0, 2), (2, 3)]]


def test_a_packed_run_on_the_per_sample_kernel_trains_like_one_on_eager_masks(tmp_path, tiny_model):
    """The trainer end to end on one rank (torchrun, ZeRO-2) at data.seq_len 1,024: sdpa gives the per-sample kernel,
    eager gives transformers' additive masks, two independent ways of keeping the samples apart."""
    runs = {}
    for attention in ("auto", "eager"):
        (tmp_path / attention).mkdir()
        cfg = tiny_config(tmp_path / attention, tiny_model, data={"seq_len": separation.PER_SAMPLE_FROM},
                          train={"max_steps": 3, "compile": False}, launch={"procs_per_node": 1})
        text = yaml.safe_load(cfg.read_text())
        text["model"]["attn_implementation"] = attention  # `model` is tiny_config's own argument
        cfg.write_text(yaml.safe_dump(text))
        runs[attention] = (RunDir(tmp_path / attention / "run"), shardtune("launch", str(cfg)).stderr)
    assert f"attention: {separation.PACKED_ATTENTION}; packed samples are kept apart by one causal sdpa call" \
        in runs["auto"][1]
    assert "attention: eager; packed samples are kept apart by transformers' masks" in runs["eager"][1]
    got, want = losses(runs["auto"][0].path), losses(runs["eager"][0].path)
    assert len(got) == 3 and got == pytest.approx(want, rel=1e-4)


REMOTE = [  # the remote code's forward (remote_models.FORWARDS), attention -> the form the trainer must pick
    ("builders", "eager", "positions"),  # the bool mask, which the trainer meant for remote code, masks nothing here
    ("builders", "sdpa", "positions"),
    ("no_positions", "eager", "additive"),
    ("no_positions", "sdpa", "mask"),
    ("no_separation", "sdpa", None),
]


@pytest.mark.parametrize("forward,attention,form", REMOTE)
def test_remote_code_gets_the_form_that_keeps_its_packed_samples_apart(tmp_path, tiny_model, forward, attention,
                                                                        form):
    """verify_form's two 8-token samples pick the form; the LENGTHS rows check it independently: the form
    picked gives every token the loss it has alone, and every form tried before it does not."""
    from transformers import AutoModelForCausalLM

    path = custom_code_model(tiny_model, tmp_path / forward, forward)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, attn_implementation=attention).eval()
    with torch.no_grad():
        found, distances = separation.verify_form(model, lambda inputs: model(**inputs).logits,
                                                         torch.device("cpu"), torch.float32)
    assert found == form
    rejected = separation.FORMS if form is None else separation.FORMS[:separation.FORMS.index(form)]
    assert list(distances) == [*rejected, *([form] if form else [])]
    if form is not None:
        assert largest_gap_from_alone(model, form) < 1e-4
    for how in rejected:
        assert largest_gap_from_alone(model, how) > 1e-2, how


def test_a_packed_remote_code_run_trains_like_the_same_model_in_transformers_or_refuses(tmp_path, tiny_model):
    """The trainer end to end (torchrun, ZeRO-3, eager attention, packed chat rows): the tiny Llama behind code
    that builds its masks from the attention mask alone trains with the losses transformers' Llama has on the same
    weights. Before, loading the code registered it with transformers, the trainer took it for a model transformers
    implements and handed it the position ids alone, and it trained across samples. Remote code that keeps no
    packed samples apart stops before its first step, naming data.packing, and trains with it off. ZeRO-3: the
    check's forwards are collectives that every rank must run alike."""
    def run(model, name: str, check: bool = True, packing: bool = True, procs: int = 2):
        (tmp_path / name).mkdir()
        cfg = tiny_config(tmp_path / name, model, train={"max_steps": 3, "compile": False}, zero={"stage": 3},
                          data={"packing": packing}, launch={"procs_per_node": procs})
        text = yaml.safe_load(cfg.read_text())
        text["model"].update(attn_implementation="eager", trust_remote_code=True)
        cfg.write_text(yaml.safe_dump(text))
        return RunDir(tmp_path / name / "run"), shardtune("launch", str(cfg), check=check)

    native, _ = run(tiny_model, "native")
    remote, proc = run(custom_code_model(tiny_model, tmp_path / "no_positions", "no_positions"), "remote")
    assert ("attention: eager; packed samples are kept apart by a block-diagonal additive mask "
            "(remote code: checked against each sample alone)") in proc.stderr
    got, want = losses(remote.path), losses(native.path)
    assert len(got) == 3 and got == pytest.approx(want, rel=1e-5)

    refused, proc = run(custom_code_model(tiny_model, tmp_path / "no_separation", "no_separation"), "refused",
                        check=False)
    assert proc.returncode != 0
    assert ("data.packing: true, but TinyCustomForCausalLM lets the samples packed into one row attend to each "
            "other in every form shardtune can hand it (remote code)") in proc.stderr
    assert "Set data.packing: false" in proc.stderr
    assert not refused.checkpoints.exists() or not any(refused.checkpoints.iterdir())
    unpacked, _ = run(tmp_path / "no_separation", "unpacked", packing=False, procs=1)  # the way out the error names
    assert len(losses(unpacked.path)) == 3


def test_remote_code_whose_window_a_sample_can_outgrow_is_tried_on_position_ids_alone():
    """A mask handed in overrides a sliding window (test_a_block_diagonal_bool_mask_is_wrong_here, on Mistral),
    and two 8-token probe samples cannot outgrow one: only the model's own masks, from the position ids, keep its
    window. flash-attention reads only its varlen arguments."""
    assert separation.remote_forms("mask", {"sliding_window": 8}, 128) == ("positions",)
    assert separation.remote_forms("mask", {"sliding_window": 128}, 128) == separation.FORMS
    assert separation.remote_forms("mask", {"sliding_window": 8, "use_sliding_window": False}, 128) == \
        separation.FORMS
    assert separation.remote_forms("varlen", {"sliding_window": 8}, 128) == ("varlen",)


MAMBA2 = dict(mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16, mamba_chunk_size=16)
"""Mamba-2 mixers sized to DENSE: their defaults (128 heads, state 256, chunks of 256 positions that a 32-token row
is padded to) made each forward on CPU's reference path ~1.6 s. A 16-position chunk keeps the state passed from
chunk to chunk inside a row."""

HYBRIDS = {  # model_type: what carries state along a packed row whatever the mask (transformers 5.25)
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"], head_dim=16),  # gated delta rule
    "lfm2": dict(layer_types=["conv", "full_attention"]),  # short convolutions
    "falcon_h1": dict(MAMBA2, mamba_d_ssm=128),  # Mamba-2 heads beside the attention of every layer
    "jamba": {},  # Mamba layers
    "bamba": MAMBA2,
    "granitemoehybrid": MAMBA2,
}


@pytest.mark.parametrize("model_type", HYBRIDS)
def test_layers_that_carry_state_along_a_packed_row_fail_the_check_before_training(model_type):
    """transformers implements these, and their attention reads the position ids, but their recurrent,
    convolution or linear-attention layers run on along the row into the next sample. The LENGTHS rows confirm
    each leak independently: losses stray more than 1e-4 from each sample alone (the exact models above: <2e-5)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **DENSE, **HYBRIDS[model_type])).eval()
    with torch.no_grad():
        found, distances = separation.verify_form(model, lambda inputs: model(**inputs).logits, torch.device("cpu"),
                                                  torch.float32, ("positions",))
    assert found is None and distances["positions"] > separation.agreement(torch.float32)
    assert largest_gap_from_alone(model, "positions") > 1e-4


def test_a_packed_run_of_a_model_with_state_space_layers_stops_and_trains_unpacked(tmp_path, tiny_model):
    """The trainer end to end on one rank (torchrun, ZeRO-2): a tiny Bamba (Mamba-2 layers, transformers' own
    class) with the tiny tokenizer. Packed, it stops before its first step, naming data.packing (before, it trained
    across samples); with data.packing: false it trains."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = tmp_path / "bamba"
    config = AutoConfig.for_model("bamba", **{**DENSE, **MAMBA2, "vocab_size": 512})
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tiny_model / name).exists():
            shutil.copy(tiny_model / name, model_dir / name)

    def run(name: str, packing: bool):
        (tmp_path / name).mkdir()
        # One step of one micro-batch: Mamba-2's reference path on CPU is slow.
        cfg = tiny_config(tmp_path / name, model_dir, train={"max_steps": 1, "warmup_steps": 0, "grad_accum_steps": 1,
                                                              "compile": False},
                          data={"packing": packing}, launch={"procs_per_node": 1})
        return RunDir(tmp_path / name / "run"), shardtune("launch", str(cfg), check=False)

    packed, proc = run("packed", True)
    assert proc.returncode != 0
    assert ("data.packing: true, but BambaForCausalLM lets the samples packed into one row attend to each other: "
            "some of its layers carry state along the row") in proc.stderr
    assert not packed.checkpoints.exists() or not any(packed.checkpoints.iterdir())
    unpacked, proc = run("unpacked", False)
    assert proc.returncode == 0 and len(losses(unpacked.path)) == 1


def test_the_plan_warns_about_layers_that_carry_state_before_the_job_queues(tmp_path, tiny_model):
    """Torch-free, from config.json: every hybrid above is recognised and no model of CASES is; a plan for a Bamba
    warns about packing, and about sequence parallelism when asked for."""
    from transformers import AutoConfig

    from launcher.contract.config import validate_config
    from launcher.planning.model_size import state_layers
    from launcher.planning.plan import build_plan

    assert all(state_layers(AutoConfig.for_model(kind, **DENSE, **extra).to_dict()) for kind, extra in HYBRIDS.items())
    assert not any(state_layers(tiny(kind).to_dict()) for kind in {case[0] for case in CASES})
    AutoConfig.for_model("bamba", **{**DENSE, "vocab_size": 512}).save_pretrained(tmp_path / "bamba")
    raw = yaml.safe_load(tiny_config(tmp_path, tmp_path / "bamba").read_text())
    warned = " ".join(build_plan(validate_config(raw)).warnings)
    assert "bamba has layers that are not attention (mamba_chunk_size in its config)" in warned
    assert "stops with data.packing: true (set it to false)" in warned and "sequence_parallel" not in warned
    raw["train"]["sequence_parallel"] = 2
    assert "data.packing: true (set it to false) and train.sequence_parallel: 2 (set it to 1)" in \
        " ".join(build_plan(validate_config(raw)).warnings)
    raw["data"]["packing"], raw["train"]["sequence_parallel"] = False, 1
    assert not any("not attention" in w for w in build_plan(validate_config(raw)).warnings)
