"""gpt-oss's attention sinks on sdpa (trainer/sink_attention.py) against transformers' own eager attention.

The reference is the model's eager attention with transformers' masks built from the position ids (the kernel
every gpt-oss run used before), and each packed sample run alone. The memory it keeps for backward is counted
from the tensors' shapes (launcher/planning/memory.py) and measured as the bytes autograd saves.
"""
from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from test_packed_attention import LENGTHS, WINDOW, largest_gap_from_alone, packed_data

from launcher.contract.config import validate_config
from launcher.planning.memory import sink_attention_bytes
from launcher.planning.model_size import counts_from_config
from trainer import separation
from trainer.data.collate import collate
from trainer.model import load_model
from trainer.sink_attention import register_sink_attention, sink_attention

from conftest import losses, read_metrics, shardtune, tiny_config
from moe_models import make_tiny_moe, tiny_moe_config
from test_e2e_train import final_logits_match_checkpoint

KERNEL = separation.SINK_ATTENTION


def twins(**overrides):
    """The same random tiny gpt-oss twice: transformers' eager attention, and the sink kernel. Its sinks are drawn
    from N(0, 4), large enough that getting one wrong moves every output."""
    from transformers import AutoModelForCausalLM

    register_sink_attention()
    config = tiny_moe_config("gpt_oss", vocab_size=100, sliding_window=WINDOW, **overrides)
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager")
    with torch.no_grad():
        for layer in eager.model.layers:
            layer.self_attn.sinks.normal_(0, 2)
    sinks = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=KERNEL)
    sinks.load_state_dict(eager.state_dict())
    assert separation.install_mask_builder(eager)  # the trainer's "positions" separation for eager gpt-oss
    return eager, sinks


def outputs_and_gradients(model, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train().zero_grad()
    logits = model(**inputs).logits
    (logits.float().square().mean() + logits.float().mean()).backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("rows", ["packed", "one long sample"])
def test_logits_and_every_gradient_equal_transformers_eager_attention(rows):
    """Packed: the LENGTHS rows (samples of 5-30 tokens, some longer than the window of 8). One long sample: 70
    tokens, so the sliding layer runs three blocks of 32 queries with keys reaching back into the block before."""
    eager, sinks = twins()
    if rows == "packed":
        data, _ = packed_data()
        inputs = collate(data, np.arange(len(LENGTHS)), pad_id=0, separation="positions",
                         multiple_of=32).model_inputs()
    else:
        ids = torch.randint(0, 100, (2, 70), generator=torch.Generator().manual_seed(1))
        inputs = {"input_ids": ids, "position_ids": torch.arange(70).expand(2, -1), "use_cache": False}
    want, want_grads = outputs_and_gradients(eager, inputs)
    got, got_grads = outputs_and_gradients(sinks, inputs)
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    assert set(got_grads) == set(want_grads) and any("sinks" in name for name in got_grads)
    for name, grad in want_grads.items():
        assert (got_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max() + 1e-10, name


def test_packed_samples_equal_each_sample_alone_and_the_trainers_check_passes():
    """The kernel reads the samples from the position ids alone ("none": no mask is built)."""
    _, sinks = twins()
    sinks.eval()
    with torch.no_grad():
        found, distances = separation.verify_form(sinks, lambda inputs: sinks(**inputs).logits, torch.device("cpu"),
                                                  torch.float32, ("none",))
    assert found == "none" and distances["none"] < 1e-5
    assert largest_gap_from_alone(sinks, "none") < 1e-4


def test_a_cache_or_missing_position_ids_fail_instead_of_attending_wrongly():
    module = SimpleNamespace(training=False)
    q, k = torch.zeros(1, 4, 3, 16), torch.zeros(1, 2, 5, 16)
    with pytest.raises(ValueError, match="needs position_ids"):
        sink_attention(module, q, k[:, :, :3], k[:, :, :3], None, s_aux=torch.zeros(4))
    with pytest.raises(ValueError, match="cannot attend to a cache"):
        sink_attention(module, q, k, k, None, position_ids=torch.arange(3)[None], s_aux=torch.zeros(4))


def saved_bytes(b: int, s: int, heads: int, kv: int, d: int, window, dtype) -> int:
    """Bytes autograd keeps from one call of the kernel (its inputs excluded), deduplicated by storage."""
    q = torch.randn(b, heads, s, d, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(b, kv, s, d, dtype=dtype, requires_grad=True) for _ in range(2))
    sinks = torch.randn(heads, dtype=dtype, requires_grad=True)
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v, sinks)}
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sink_attention(SimpleNamespace(training=True), q, k, v, None, scaling=d ** -0.5,
                       position_ids=torch.arange(s)[None], s_aux=sinks, sliding_window=window)
    return sum(seen.values())


@pytest.mark.parametrize("b,s,heads,kv,d,window,dtype,sp", [
    (2, 64, 4, 2, 16, None, torch.float32, 1),  # a full layer: one call per row
    (2, 64, 4, 2, 16, 8, torch.float32, 1),  # two blocks of 32 queries
    (1, 300, 8, 2, 64, 16, torch.bfloat16, 1),  # 64 pads to 72; five blocks, the last short
    (2, 30, 4, 2, 16, 64, torch.float32, 1),  # a window longer than the sample: one call, as a full layer
    (1, 128, 8, 4, 16, 16, torch.float32, 2),  # SP=2: a rank's call, the whole rows with 4 heads over 2 kv heads
    (1, 128, 8, 2, 16, None, torch.float32, 4),  # SP=4 over 2 kv heads: each rank gets one, replicated
])
def test_what_it_keeps_for_backward_is_what_the_plan_counts(b, s, heads, kv, d, window, dtype, sp):
    config = {"model_type": "gpt_oss", "hidden_size": heads * d, "num_attention_heads": heads, "head_dim": d,
              "num_key_value_heads": kv, "sliding_window": window, "num_hidden_layers": 1, "vocab_size": 100,
              "intermediate_size": 8, "num_local_experts": 2, "num_experts_per_tok": 1}
    e = 2 if dtype == torch.bfloat16 else 4
    o_proj_input = e * b * (s // sp) * heads * d
    planned = sink_attention_bytes(counts_from_config(config), b, s, e, sp) - o_proj_input
    # Under SP DeepSpeed hands the kernel the whole rows for heads / N query heads and max(1, kv / N) kv heads.
    assert saved_bytes(b, s, heads // sp, max(1, kv // sp), d, window, dtype) == planned


def test_its_memory_grows_with_the_sequence_not_with_heads_times_its_square():
    """Doubling the sequence doubles what the kernel keeps (on a full layer), where eager attention's s² scores per
    head quadruple. At 512 tokens and 16 heads it already keeps a tenth of eager's."""
    config = tiny_moe_config("gpt_oss", vocab_size=100, num_attention_heads=16, num_key_value_heads=2, head_dim=16)
    counts = counts_from_config({**config.to_dict(), "sliding_window": None})
    kept = {s: saved_bytes(1, s, 16, 2, 16, None, torch.float32) for s in (256, 512)}
    assert 1.9 < kept[512] / kept[256] < 2.1
    eager_scores = 16 * 512 * 512 * (4 + 4)  # fp32: the softmax and its copy per head (memory.layer_activation_bytes)
    assert kept[512] < eager_scores / 10
    assert sink_attention_bytes(counts, 1, 512, 4) - 4 * 512 * 16 * 16 == kept[512]


def test_auto_loads_gpt_oss_with_the_sink_kernel_and_eager_when_asked(tmp_path):
    """transformers refuses sdpa for gpt-oss; `auto` picks the sink kernel, and eager stays available."""
    model_dir = make_tiny_moe(tmp_path / "gpt-oss", "gpt_oss")
    for asked, loaded in (("auto", KERNEL), ("eager", "eager")):
        raw = yaml.safe_load(tiny_config(tmp_path, model_dir, train={"precision": "fp32"}).read_text())
        raw["model"]["attn_implementation"] = asked
        model = load_model(validate_config(raw), {"zero_optimization": {"stage": 2}}, torch.device("cpu"))
        assert model.config._attn_implementation == loaded


def tiny_gpt_oss_with_strong_sinks(out: Path) -> Path:
    """make_tiny_moe's gpt-oss (windows of 16 tokens), its sinks redrawn from N(0, 4): at init they are near 0,
    where giving a head another head's sink would hardly change a loss."""
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_moe(out, "gpt_oss")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 2)
    model.save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three 2-rank runs of 3 steps on the same global batch of 4 packed rows of 64 tokens: eager and the sink
    kernel (ZeRO-3, 2 rows per rank), and the sink kernel under sequence parallelism (ZeRO-2, SP=2: both ranks
    hold halves of the same 4 rows)."""
    base = tmp_path_factory.mktemp("gpt-oss")
    model_dir = tiny_gpt_oss_with_strong_sinks(base / "model")
    out = {"model": model_dir}
    for name, attention, micro, stage, sp in (("eager", "eager", 2, 3, 1), ("auto", "auto", 2, 3, 1),
                                              ("sp", "auto", 4, 2, 2)):
        (base / name).mkdir()
        cfg = tiny_config(base / name, model_dir, data={"seq_len": 64},
                          train={"max_steps": 3, "compile": False, "precision": "fp32", "micro_batch_size": micro,
                                 "grad_accum_steps": None, "global_batch_size": 4, "sequence_parallel": sp},
                          zero={"stage": stage})
        raw = yaml.safe_load(cfg.read_text())
        raw["model"]["attn_implementation"] = attention
        cfg.write_text(yaml.safe_dump(raw))
        proc = shardtune("launch", str(cfg))
        out[name] = base / name / "run"
        out[f"{name}_log"] = proc.stdout + proc.stderr
    return out


def test_a_packed_gpt_oss_run_trains_like_eager_and_exports_a_plain_model(runs):
    """The sink kernel and transformers' eager attention, two independent implementations, give the same losses;
    final/ loads in a fresh process without shardtune's kernel and equals the checkpoint."""
    assert f"attention: {KERNEL}; packed samples are kept apart by one sdpa call per packed sample, the sinks as " \
           "a key (checked against each sample alone)" in runs["auto_log"]
    got, want = losses(runs["auto"]), losses(runs["eager"])
    assert len(got) == 3 and got == pytest.approx(want, rel=1e-4)
    final_logits_match_checkpoint(runs["auto"], runs["model"])


def test_sequence_parallel_splits_gpt_oss_by_heads_with_each_ranks_sinks_and_windows(runs):
    """Under SP each rank attends the whole rows with half of the heads: it must take those heads' sinks, and
    apply the windows itself (Ulysses hands the kernel no mask). Loss and gradient norm equal the data-parallel
    run's; a rank taking the other half's sinks, or the windows dropped, would be off from the first step."""
    assert "split over 2 ranks" in runs["sp_log"]
    for name in ("loss", "grad_norm"):
        sp = {r["step"]: r[name] for r in read_metrics(runs["sp"]) if name in r}
        dp = {r["step"]: r[name] for r in read_metrics(runs["auto"]) if name in r}
        assert sorted(sp) == [1, 2, 3]
        for step in sp:
            assert sp[step] == pytest.approx(dp[step], rel=1e-5, abs=0), (name, step, sp[step], dp[step])
