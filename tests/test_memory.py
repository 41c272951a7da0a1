"""Memory planner: exact parameter counts, ZeRO model states, activations measured on the real modules,
the automatic choice, and the `shardtune estimate` command (issue 7)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import weakref
from dataclasses import replace
from pathlib import Path

import pytest

from launcher.contract.errors import ConfigError
from launcher.planning import memory
from launcher.planning.estimate import estimate_command
from launcher.planning.fastest_fit import VARIANTS, DoesNotFit, choose_configuration
from launcher.planning.memory import (
    Margins,
    Setup,
    ZeroSettings,
    estimate_memory,
    layer_activation_bytes,
    logits_bytes,
    model_state_bytes,
    norm_elements,
    offload_buffers,
    optimizer_temporaries,
)
from launcher.planning.model_size import counts_from_config, counts_from_params, counts_from_path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "data" / "model_configs"
AS_ASKED = Margins(pinned_rounding=None)
"""Host buffers at the bytes DeepSpeed asks for: as on CPU, where nothing is pinned. The power-of-two rounding of pinned
buffers on GPUs has tests of its own (test_pinned_*)."""

# Published parameter counts (model cards / safetensors metadata), tied embeddings counted once.
KNOWN_COUNTS = {
    "llama3_8b": 8_030_261_248,
    "smollm2_135m": 134_515_008,
    "qwen2_0_5b": 494_032_768,
    "mistral_7b": 7_241_732_096,
    "gemma_2b": 2_506_172_416,
    "gemma2_2b": 2_614_341_888,
    "gemma3_1b": 999_885_952,
    "phi3_mini_4k": 3_821_079_552,
    "qwen3_0_6b": 596_049_920,
}


def run_estimate(capsys, **kwargs) -> dict:
    assert estimate_command(json=True, **kwargs) == 0
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("name", sorted(KNOWN_COUNTS))
def test_parameter_count_is_exact_for_known_models(name):
    counts = counts_from_path(CONFIGS / f"{name}.json")
    assert counts.exact
    assert counts.total == KNOWN_COUNTS[name]
    assert counts.embedding == counts.vocab_size * counts.hidden_size * (1 if counts.tied_embeddings else 2)


def test_llama3_8b_from_a_model_directory(tmp_path, capsys):
    shutil.copy(CONFIGS / "llama3_8b.json", tmp_path / "config.json")
    out = run_estimate(capsys, model=str(tmp_path), gpus=8)
    assert out["params"] == 8_030_261_248
    assert abs(out["params"] - 8.03e9) / 8.03e9 < 0.01
    assert out["params_exact"] is True
    counts = counts_from_path(tmp_path)
    assert (counts.hidden_size, counts.num_layers, counts.num_heads, counts.num_kv_heads) == (4096, 32, 32, 8)
    assert counts.embedding == 2 * 128256 * 4096  # untied: embedding and lm_head
    assert counts.largest_tensor == 128256 * 4096


def test_tied_embeddings_and_biases_change_the_count():
    base = json.loads((CONFIGS / "smollm2_135m.json").read_text())
    tied = counts_from_config(base)
    untied = counts_from_config({**base, "tie_word_embeddings": False})
    assert untied.total - tied.total == 49152 * 576
    biased = counts_from_config({**base, "attention_bias": True, "mlp_bias": True})
    q, kv, h, inter = 576, 192, 576, 1536
    assert biased.total - tied.total == 30 * ((q + 2 * kv + h) + (2 * inter + h))


def test_unknown_architecture_is_approximate_and_says_so():
    counts = counts_from_path(CONFIGS / "gpt2.json")
    assert not counts.exact and "12·L·h²" in counts.note
    assert abs(counts.total - 124_439_808) / 124_439_808 < 0.02  # GPT-2 small's real count


def test_params_only_keeps_the_count_and_is_flagged():
    counts = counts_from_params(7.5e9)
    assert counts.total == 7_500_000_000 and not counts.exact
    assert counts.hidden_size % 128 == 0 and counts.num_layers > 0


def test_missing_field_names_the_field():
    with pytest.raises(ConfigError, match="hidden_size"):
        counts_from_config({"model_type": "llama", "num_hidden_layers": 2})


@pytest.fixture(scope="module")
def hf():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return torch, transformers


def build(hf, cfg: dict, **kwargs):
    torch, transformers = hf
    config = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    return transformers.AutoModelForCausalLM.from_config(config, **kwargs)


SYNTHETIC_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 100, "head_dim": 24,
                   "attention_bias": True, "mlp_bias": True}


@pytest.mark.parametrize("name", sorted(KNOWN_COUNTS) + ["synthetic_llama_biases"])
def test_count_matches_transformers_modules(hf, name):
    """The whole model built on the meta device: our arithmetic against the real module layout."""
    torch, _ = hf
    cfg = SYNTHETIC_LLAMA if name.startswith("synthetic") else json.loads((CONFIGS / f"{name}.json").read_text())
    with torch.device("meta"):
        model = build(hf, cfg)
    tensors = list(model.parameters())  # shared (tied) tensors are listed once
    counts = counts_from_config(cfg)
    assert counts.total == sum(p.numel() for p in tensors)
    assert counts.largest_tensor == max(p.numel() for p in tensors)


# ---------------------------------------------------------------- model states (ZeRO paper, Table 1)


def test_zero_paper_table_1(capsys):
    out = run_estimate(capsys, params=7.5e9, gpus=64)
    expected = {"0": 120.0, "1": 31.4, "2": 16.6, "3": 1.88}
    for stage, gb in expected.items():
        got = out["stages"][stage]["model_states_gb"]
        assert abs(got - gb) / gb < 0.02, (stage, got, gb)


def test_fp32_master_copy_only_under_zero_and_offload_moves_states_to_the_host():
    psi, n = 1_000_000_000, 8
    fp32 = model_state_bytes(psi, Setup(stage=0, world_size=n, gpus_per_node=8, dtype="fp32"))
    assert fp32 == {"params": 4 * psi, "gradients": 4 * psi, "optimizer_states": 8 * psi}
    fp32_1 = model_state_bytes(psi, Setup(stage=1, world_size=n, gpus_per_node=8, dtype="fp32"))
    assert fp32_1["optimizer_states"] == 12 * psi // n  # ZeRO clones its partition as master even in fp32
    counts = counts_from_params(psi)
    off = estimate_memory(counts, Setup(stage=3, world_size=n, gpus_per_node=8, offload_optimizer=True,
                                        offload_params=True), margins=AS_ASKED)
    assert off.model_states == 0
    # fp32 master + 2 moments + fp32 grads, and the bf16 gradient partition, per rank
    assert off.host["offloaded_optimizer"] == 8 * (16 + 2) * psi // n
    assert off.host["offloaded_params"] == 8 * 2 * psi // n
    plain = estimate_memory(counts, Setup(stage=3, world_size=n, gpus_per_node=8))
    assert plain.model_states == 16 * psi // n and plain.host["offloaded_optimizer"] == 0
    assert off.device_total < plain.device_total


def test_fp32_gradient_sums_are_counted_where_deepspeed_keeps_them():
    """With bf16 and accumulation the launcher renders data_types.grad_accum_dtype: fp32, and DeepSpeed 0.19 keeps
    the sums in fp32: at stage 1 a whole fp32 copy besides the bf16 gradients (BF16_Optimizer's
    fp32_groups_gradients_flat, zeros_like the flat bf16 group, bf16_optimizer.py:191), at stages 2-3 fp32
    partitions (stage 2's compact partition buffer; stage3.py:790 grad_partitions_flat_buffer). Uncounted, the plan
    chose ZeRO-1 for Llama-3-8B on 8 × 80 GB at 4Ψ = 32 GB per GPU less than it needs."""
    psi, n = 1_000_000_000, 8
    grads = {stage: model_state_bytes(psi, Setup(stage=stage, world_size=n, gpus_per_node=8, dtype="bf16",
                                                 fp32_accumulation=True))["gradients"] for stage in range(4)}
    assert grads == {0: 2 * psi, 1: (2 + 4) * psi, 2: 4 * psi // n, 3: 4 * psi // n}
    off = Setup(stage=2, world_size=n, gpus_per_node=8, dtype="bf16", fp32_accumulation=True, offload_optimizer=True)
    assert model_state_bytes(psi, off)["gradients"] == 4 * psi // n  # the compact fp32 partition stays on the device
    assert model_state_bytes(psi, replace(off, stage=3))["gradients"] == 0  # stage 3 keeps its sums on the host
    assert model_state_bytes(psi, replace(off, fp32_accumulation=False))["gradients"] == 0  # straight to the host
    fp16 = Setup(stage=1, world_size=n, gpus_per_node=8, dtype="fp16", fp32_accumulation=True)
    assert model_state_bytes(psi, fp16)["gradients"] == 4 * psi + 4 * psi // n  # grad_accum, no fp16 copy kept
    fp32 = Setup(stage=1, world_size=n, gpus_per_node=8, dtype="fp32", fp32_accumulation=True)
    assert model_state_bytes(psi, fp32)["gradients"] == 4 * psi  # already fp32: nothing extra
    counts = counts_from_path(CONFIGS / "llama3_8b.json")
    for micro, accumulation, extra in ((1, 8, 4 * counts.total), (8, 1, 0)):
        choice = choose_configuration(counts, 8, 400.0, 2048, 64, "bf16", stage=1, micro_batch_size=micro,
                                      activation_checkpointing=True, offload_optimizer=False, offload_params=False,
                                      gpus_per_node=8)
        assert choice.setup.fp32_accumulation is (accumulation > 1)
        assert model_state_bytes(counts.total, choice.setup)["gradients"] == 2 * counts.total + extra


def test_zero3_gathers_a_whole_decoder_layer_when_its_layers_are_leaf_modules():
    """A compiled model's decoder layers are ZeRO-3 leaf modules: the gather unit is a layer, not its largest matrix.

    Mistral-7B's layer outweighs its largest tensor (the 32k × 4096 embedding), so the unit moves. The layer by
    hand from config.json: q and o 4096², k and v 4096 × 1024 (8 of 32 heads), three 4096 × 14336 MLP matrices,
    two norms."""
    counts = counts_from_path(CONFIGS / "mistral_7b.json")
    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    embedding = 32000 * 4096
    assert layer > embedding
    setup = Setup(stage=3, world_size=8, gpus_per_node=8)
    per_tensor = estimate_memory(counts, setup)
    whole = estimate_memory(counts, replace(setup, whole_layers=True))
    assert per_tensor.device["gradient_in_flight"] == embedding * 2  # bf16
    assert whole.device["gradient_in_flight"] == layer * 2
    zero = ZeroSettings()
    assert whole.device["zero3_live_params"] == max(zero.max_live_parameters, layer + zero.prefetch_bucket_size) * 2
    assert estimate_memory(counts, replace(setup, stage=2, whole_layers=True)).device == \
        estimate_memory(counts, replace(setup, stage=2)).device  # below ZeRO-3 nothing is gathered


def test_buckets_follow_deepspeed_settings():
    counts = counts_from_path(CONFIGS / "llama3_8b.json")
    setup = Setup(stage=2, world_size=8, gpus_per_node=8)
    default = estimate_memory(counts, setup)
    assert default.device["reduce_buckets"] == 500_000_000 * 2  # DeepSpeed default, one bf16 buffer
    rendered = {"zero_optimization": {"reduce_bucket_size": 4096 * 4096, "overlap_comm": True,
                                      "stage3_prefetch_bucket_size": "auto"}}
    zero = ZeroSettings.from_deepspeed(rendered)
    assert zero.prefetch_bucket_size == 50_000_000  # "auto" keeps DeepSpeed's default
    assert estimate_memory(counts, setup, zero).device["reduce_buckets"] == 2 * 4096 * 4096 * 2
    z3 = estimate_memory(counts, Setup(stage=3, world_size=8, gpus_per_node=8))
    assert z3.device["zero3_live_params"] == 1_000_000_000 * 2  # stage3_max_live_parameters, bf16
    assert z3.device["gradient_in_flight"] == counts.largest_tensor * 2  # the lm_head's gradient, whole
    z1 = estimate_memory(counts, Setup(stage=1, world_size=8, gpus_per_node=8))
    assert z1.device["zero3_live_params"] == 0 and z1.device["gradient_in_flight"] == 0  # all kept whole anyway


def test_deepspeed_buffers_by_stage_and_offload():
    """The buffers read from DeepSpeed 0.19's ZeRO code (and measured on CPU by bench/memory.py)."""
    counts = counts_from_path(CONFIGS / "llama3_8b.json")
    psi, big, n = counts.total, counts.largest_tensor, 8

    def est(**kw):
        return estimate_memory(counts, Setup(world_size=n, gpus_per_node=8, **kw), margins=AS_ASKED)

    z1, z2, z3 = est(stage=1), est(stage=2), est(stage=3)
    norm = 8 * min(big, psi // n)  # the gradient norm's fp64 copy of the head's, before the step's own buffers
    assert z1.device["optimizer_step_buffers"] == max(2 * psi // n, norm)  # the bf16 partition beside full grads
    assert z2.device["optimizer_step_buffers"] == max(4 * psi // n, norm)  # its fp32 copy for the master weights
    assert z3.device["optimizer_step_buffers"] == 4 * psi // n
    off = est(stage=2, offload_optimizer=True)
    assert off.device["offload_staging"] == 2 * big  # temp_grad_buffer_for_gpu_offload, for the whole run
    assert off.device["optimizer_step_buffers"] == 0 and off.device["gradients"] == 0
    assert off.host["offloaded_optimizer"] == 8 * ((16 + 2) * psi // n + 2 * big)
    assert est(stage=3, offload_optimizer=True).device["offload_staging"] == 0
    assert off.device_total == off.model_states + off.device["offload_staging"] + off.forward_backward \
        + off.device["fragmentation"] + off.device["cuda_runtime"]


def test_torch_adamw_temporaries_only_for_the_torch_optimizer():
    counts = counts_from_path(CONFIGS / "smollm2_135m.json")
    psi, n = counts.total, 2
    fused = estimate_memory(counts, Setup(stage=2, world_size=n, gpus_per_node=2, dtype="fp32"))
    torch_ = estimate_memory(counts, Setup(stage=2, world_size=n, gpus_per_node=2, dtype="fp32", optimizer="torch"))
    norm = 8 * counts.largest_tensor  # the gradient norm's fp64 copy of the embedding's: the fused step's only one
    assert fused.device["optimizer_step_buffers"] == norm  # fp32: the gradient partition needs no fp32 copy
    assert torch_.device["optimizer_step_buffers"] == 2 * 4 * psi // n  # sqrt(v) and its quotient
    z0 = estimate_memory(counts, Setup(stage=0, world_size=n, gpus_per_node=2, dtype="fp32", optimizer="torch"))
    assert z0.device["optimizer_step_buffers"] == 4 * psi  # the all-reduce flattening outweighs 2 × the embedding
    off = estimate_memory(counts, Setup(stage=2, world_size=n, gpus_per_node=2, dtype="fp32", optimizer="torch",
                                        offload_optimizer=True))
    # The step runs on the host; the device's phase after activations holds the tied head's last gradient and its
    # fp64 copy for the norm.
    assert off.device["optimizer_step_buffers"] == 4 * counts.largest_tensor + norm
    with pytest.raises(ConfigError, match="optimizer: must be one of fused, torch, got 'sgd'"):
        estimate_memory(counts, Setup(stage=2, world_size=n, gpus_per_node=2, optimizer="sgd"))


# Peak RSS per rank (GB) of the real trainer on CPU, SmolLM2-135M, 2 ranks, fp32, micro batch 1, seq_len 128,
# with MALLOC_MMAP_THRESHOLD_=65536 so RSS follows the bytes allocated: bench/memory.py, bench/RESULTS.md.
MEASURED_ON_CPU = {(0, False): 3.14, (1, False): 2.63, (2, False): 2.63, (3, False): 2.65,
                   (2, True): 3.13, (3, True): 2.90}
MEASURED_RUNTIME_GB = 0.38  # the same trainer on a model without weights to speak of


@pytest.mark.parametrize("stage,offload", sorted(MEASURED_ON_CPU))
def test_estimate_matches_the_trainer_measured_on_cpu(stage, offload):
    """GPU rules on one CPU rank: device and host share the RAM, the step's temporaries run where the optimizer is."""
    counts = counts_from_path(CONFIGS / "smollm2_135m.json")
    setup = Setup(stage=stage, world_size=2, gpus_per_node=2, micro_batch_size=1, seq_len=128, dtype="fp32",
                  offload_optimizer=offload, optimizer="torch")
    zero = ZeroSettings(reduce_bucket_size=576 * 576, prefetch_bucket_size=int(0.9 * 576 * 576), overlap_comm=False)
    est = estimate_memory(counts, setup, zero, AS_ASKED)  # a CPU run pins nothing
    d = est.device
    temps = optimizer_temporaries(counts, setup) if offload else 0
    kept = est.model_states + d["offload_staging"] + est.host["offloaded_optimizer"] // 2 - temps
    step = max(d["optimizer_step_buffers"], temps)  # offloaded, a tied head's last gradient, then the host's step
    per_rank = kept + max(est.forward_backward, step) + d["fragmentation"]
    measured = MEASURED_ON_CPU[(stage, offload)]
    assert abs(per_rank / 1e9 + MEASURED_RUNTIME_GB - measured) / measured < 0.06, (per_rank / 1e9, measured)


# ---------------------------------------------------------------- activations, measured


def saved_bytes(hf, cfg: dict, layers: int, b: int, s: int, dtype, attn: str) -> int:
    """Bytes of non-parameter tensors autograd keeps for backward, deduplicated by storage."""
    torch, _ = hf
    torch.manual_seed(0)
    model = build(hf, {**cfg, "num_hidden_layers": layers, "use_cache": False}, attn_implementation=attn)
    model = model.to(dtype).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, cfg["vocab_size"], (b, s))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


TINY = {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "vocab_size": 1000, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1}


@pytest.mark.parametrize("model_type,attn,dtype", [
    ("llama", "sdpa", "bf16"), ("llama", "eager", "bf16"), ("llama", "sdpa", "fp32"), ("qwen2", "sdpa", "bf16"),
    ("qwen3", "sdpa", "bf16"), ("gemma", "sdpa", "bf16"), ("gemma2", "eager", "bf16"),
    ("gemma3_text", "sdpa", "bf16"), ("phi3", "sdpa", "bf16"),
    ("mistral", "sdpa", "bf16"), ("mistral", "sdpa", "fp32"),  # a window of 16 < 64: every layer keeps a mask
])
def test_layer_activations_match_saved_tensors(hf, model_type, attn, dtype):
    torch, _ = hf
    cfg = {**TINY, "model_type": model_type, **({"sliding_window": 16} if model_type == "mistral" else {})}
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    b, s = 2, 64
    measured = (saved_bytes(hf, cfg, 2, b, s, torch_dtype, attn) - saved_bytes(hf, cfg, 1, b, s, torch_dtype, attn))
    estimated = layer_activation_bytes(counts_from_config({**cfg, "num_hidden_layers": 1}), b, s, dtype, attn)
    assert abs(estimated - measured) / measured < 0.005, (estimated, measured)


def allocation_peak(torch, *inputs):
    """A dispatch mode that tracks the bytes of every tensor storage created inside it until it is freed: the peak,
    allocation by allocation, of what runs inside. Views of `inputs` (a weight's transpose) allocate nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Peak(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.cur = self.peak = 0
            self.live: set[int] = {t.untyped_storage().data_ptr() for t in inputs}

        def free(self, key, n):
            self.cur -= n
            self.live.discard(key)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.live:
                    st = t.untyped_storage()
                    self.live.add(st.data_ptr())
                    self.cur += st.nbytes()
                    self.peak = max(self.peak, self.cur)
                    weakref.finalize(st, self.free, st.data_ptr(), st.nbytes())
            return out

    return Peak()


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_logits_buffer_matches_the_loss_peak(hf, dtype):
    """Peak bytes of the lm_head + the trainer's full-logits loss, forward and backward, tracked allocation by
    allocation, called as the trainer calls it (trainer.loss.full_logits_loss keeps no model output)."""
    torch, _ = hf
    from trainer.model import token_loss_sum
    b, s, h, vocab = 2, 256, 64, 8000
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    hidden = torch.randn(b, s, h, dtype=torch_dtype, requires_grad=True)
    head = torch.nn.Linear(h, vocab, bias=False).to(torch_dtype)
    head.weight.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    targets = torch.randint(0, vocab, (b, s))
    with allocation_peak(torch, hidden, head.weight) as peak:
        token_loss_sum(head(hidden), targets).backward()
    counts = counts_from_config({**TINY, "model_type": "llama", "num_hidden_layers": 1, "vocab_size": vocab})
    estimated = logits_bytes(counts, b, s, dtype)
    assert abs(peak.peak - estimated) / estimated < 0.05, (peak.peak, estimated)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_the_chunked_loss_hands_over_the_head_gradient_it_holds(hf, dtype):
    """The chunked loss computes the head's weight gradient in its forward and backward hands that very tensor (or
    its bf16 copy) to ZeRO-2/3 as the gradient waiting for its bucket: the loss's peak and that gradient, measured
    together allocation by allocation, are the loss's buffers alone. The plan counted the head's gradient a second
    time as the gradient in flight (4·V·h bytes more in fp32, 2·V·h in bf16)."""
    torch, _ = hf
    from launcher.planning.chunked_loss import loss_chunk_tokens
    from trainer.loss import chunked_token_loss_sum
    b, s, vocab = 2, 256, 8000
    counts = counts_from_config({**TINY, "model_type": "llama", "num_hidden_layers": 1, "vocab_size": vocab})
    h = counts.hidden_size
    assert counts.largest_tensor == vocab * h  # the head is the tensor whose gradient waits
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    hidden = torch.randn(b, s, h, dtype=torch_dtype, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(vocab, h, dtype=torch_dtype) / h ** 0.5)
    targets = torch.randint(0, vocab, (b, s))
    with allocation_peak(torch, hidden, weight) as peak:
        chunked_token_loss_sum(hidden, weight, targets, loss_chunk_tokens(vocab)).backward()  # weight.grad stays
    assert weight.grad is not None and hidden.grad is not None
    setup = Setup(stage=2, world_size=2, gpus_per_node=2, micro_batch_size=b, seq_len=s, dtype=dtype,
                  chunked_loss=True)
    d = estimate_memory(counts, setup).device
    counted = d["logits"] + d["gradient_in_flight"]
    assert abs(peak.peak - counted) / counted < 0.05, (peak.peak, counted)


def test_checkpointing_and_longer_sequences():
    counts = counts_from_path(CONFIGS / "llama3_8b.json")
    full = estimate_memory(counts, Setup(stage=3, world_size=8, gpus_per_node=8, seq_len=4096))
    ckpt = estimate_memory(counts, Setup(stage=3, world_size=8, gpus_per_node=8, seq_len=4096,
                                         activation_checkpointing=True))
    short = estimate_memory(counts, Setup(stage=3, world_size=8, gpus_per_node=8, seq_len=2048))
    assert ckpt.device["activations"] < full.device["activations"] / 5
    assert short.device["activations"] * 2 == pytest.approx(full.device["activations"], rel=0.01)
    assert full.device["logits"] == 4096 * 128256 * 12  # fp32 log-softmax + its 2 fp32 grads


# ---------------------------------------------------------------- automatic choice


def rank(choice) -> int:
    s = choice.setup
    return VARIANTS.index((s.stage, s.offload_optimizer, s.offload_params))


def test_more_device_memory_means_less_sharding_and_bigger_micro_batches():
    counts = counts_from_path(CONFIGS / "llama3_8b.json")
    sizes = (16, 24, 40, 80, 141, 192, 400)
    choices = [choose_configuration(counts, 8, gb, 2048, 64) for gb in sizes]
    for small, big in zip(choices, choices[1:]):
        assert rank(big) <= rank(small)
        if rank(big) == rank(small):
            assert big.setup.micro_batch_size >= small.setup.micro_batch_size
            assert big.setup.activation_checkpointing <= small.setup.activation_checkpointing
    first, last = choices[0].setup, choices[-1].setup
    assert first.stage == 3 and first.offload_optimizer  # 16 GB: only offload fits
    assert (last.stage, last.micro_batch_size, last.activation_checkpointing) == (0, 8, False)
    for gb, c in zip(sizes, choices):
        assert c.setup.micro_batch_size * c.grad_accum_steps * 8 == 64
        assert c.estimate.fits(gb) and any("fits" in r for r in c.reasons)


def test_choice_explains_itself_and_respects_fixed_settings():
    counts = counts_from_path(CONFIGS / "llama3_8b.json")
    choice = choose_configuration(counts, 8, 80, 2048, 64)
    text = "\n".join(choice.reasons)
    assert "ZeRO-0 needs" in text and "> 80 GB" in text  # why stage 0 was skipped
    assert f"{choice.setup.label()} fits" in text and "to spare" in text
    assert f"global batch = micro {choice.setup.micro_batch_size}" in text
    fixed = choose_configuration(counts, 8, 80, 2048, 64, stage=3, micro_batch_size=2, activation_checkpointing=True)
    assert (fixed.setup.stage, fixed.setup.micro_batch_size, fixed.setup.activation_checkpointing) == (3, 2, True)
    assert fixed.grad_accum_steps == 4
    with pytest.raises(ConfigError, match="global_batch_size: 60 is not a multiple"):
        choose_configuration(counts, 8, 80, 2048, 60)


def test_checkpointing_turns_on_only_when_needed():
    counts = counts_from_path(CONFIGS / "llama3_8b.json")
    roomy = choose_configuration(counts, 8, 80, 2048, 8, stage=3)
    assert not roomy.setup.activation_checkpointing
    tight = choose_configuration(counts, 8, 80, 16384, 8, stage=3)
    assert tight.setup.activation_checkpointing
    assert any("activation checkpointing on" in r for r in tight.reasons)


def test_does_not_fit_shows_components_and_remedies():
    counts = counts_from_path(CONFIGS / "llama3_8b.json")
    with pytest.raises(DoesNotFit) as info:
        choose_configuration(counts, 2, 40, 2048, 16, offload_optimizer=False, offload_params=False,
                             gpus_per_node=2)
    message = str(info.value)
    for component in ("optimizer_states", "activations", "logits", "zero3_live_params", "peak per device"):
        assert component in message
    assert "more GPUs" in message and "offload" in message
    assert info.value.estimate is not None and not info.value.estimate.fits(40)
    with pytest.raises(DoesNotFit, match="shorter sequences: data.seq_len"):
        choose_configuration(counts, 8, 24, 16384, 8)


# ---------------------------------------------------------------- the command


def test_json_shape(capsys):
    out = run_estimate(capsys, params=7.5e9, gpus=64)
    assert out["params"] == 7_500_000_000 and out["world_size"] == 64
    assert set(out["stages"]) == {"0", "1", "2", "3"}
    for entry in [*out["stages"].values(), *out["offload"].values()]:
        assert {"model_states_gb", "total_gb", "fits", "device_gb", "host_per_node_gb"} <= set(entry)
        assert entry["total_gb"] >= entry["model_states_gb"]
    assert set(out["offload"]) == {"1_optimizer", "2_optimizer", "3_optimizer", "3_optimizer_params"}
    assert out["stages"]["0"]["fits"] is False and out["stages"]["3"]["fits"] is True
    assert out["recommended"]["stage"] == 1


def test_text_output_has_the_component_table(capsys):
    assert estimate_command(model=str(CONFIGS / "smollm2_135m.json"), gpus=2, gpu_memory_gb=24) == 0
    out = capsys.readouterr().out
    assert "134,515,008 parameters" in out and "fastest that fits: ZeRO-0" in out
    for column in ("Z0", "Z1", "Z2", "Z3", "Z3+opt+par"):
        assert column in out


@pytest.mark.parametrize("kwargs,needle", [
    ({"params": 7e9, "gpus": 8, "dtype": "int8"}, "--dtype: must be one of bf16, fp16, fp32, got 'int8'"),
    ({"model": "/nonexistent/model", "gpus": 8}, "--model: '/nonexistent/model' is not a directory"),
    ({"params": 7e9, "model": "x", "gpus": 8}, "give exactly one"),
    ({"params": 7e9, "gpus": 0}, "--gpus: must be a positive integer, got 0"),
    ({"params": 7e9}, "--gpus: give the total number of devices"),
    ({"params": "lots", "gpus": 8}, "--params: expected a parameter count"),
    ({"params": 7e9, "gpus": 8, "gpu_memory_gb": -1}, "--gpu_memory_gb: must be a positive number"),
    ({"params": 7e9, "gpus": 12, "gpus_per_node": 8}, "--gpus: 12 does not equal"),
])
def test_bad_arguments_name_the_argument(capsys, kwargs, needle):
    assert estimate_command(**kwargs) == 2
    captured = capsys.readouterr()
    assert needle in captured.err and captured.out == ""


def test_estimate_imports_no_heavy_library_and_is_fast():
    code = (
        "import sys, time, io, contextlib\n"
        "t = time.perf_counter()\n"
        "import launcher.planning.estimate\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    rc = launcher.planning.estimate.estimate_command(params=7.5e9, gpus=64, json=True)\n"
        "    rc |= launcher.planning.estimate.estimate_command(\n"
        "        model='tests/data/model_configs/llama3_8b.json', gpus=8)\n"
        "elapsed = time.perf_counter() - t\n"
        "heavy = sorted({'torch', 'deepspeed', 'transformers', 'datasets'} & set(sys.modules))\n"
        "print(rc, elapsed, heavy)\n"
        "assert rc == 0 and not heavy, heavy\n"
        "assert elapsed < 1.0, elapsed\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_zero3_steps_one_sub_group_at_a_time_as_deepspeed_groups_them():
    """In mixed precision the optimizer step makes an fp32 copy of the gradients it updates. ZeRO-3 steps its
    partition one sub-group at a time and frees each copy before the next (stage3.py step(): _prepare_sub_group,
    _optimizer_step, _release_sub_group), so the copy is one sub-group's, not the partition's: for Llama-3-70B on
    16 GPUs 4.3 GB, where the plan counted 17.6. The expected size comes from DeepSpeed's own grouping
    (_create_fp16_sub_groups, default sub_group_size 1e9) run over the model's parameters in their real order."""
    import math
    from types import SimpleNamespace

    import torch
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from transformers import AutoConfig, AutoModelForCausalLM

    n = 16
    config = AutoConfig.from_pretrained(CONFIGS / "llama3_70b.json")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = [SimpleNamespace(partition_numel=lambda k=math.ceil(p.numel() / n): k) for p in model.parameters()]
    groups = DeepSpeedZeroOptimizer_Stage3._create_fp16_sub_groups(SimpleNamespace(sub_group_size=1_000_000_000),
                                                                   params)
    largest_group = max(sum(p.partition_numel() for p in g) for g in groups)
    assert len(groups) > 1 and largest_group < sum(p.partition_numel() for p in params) // 3

    counts = counts_from_path(CONFIGS / "llama3_70b.json")
    step = estimate_memory(counts, Setup(stage=3, world_size=n, gpus_per_node=8, dtype="bf16"), ZeroSettings())
    assert 4 * largest_group <= step.device["optimizer_step_buffers"] <= 1.1 * 4 * largest_group
    small = ZeroSettings(sub_group_size=100_000_000)
    assert estimate_memory(counts, Setup(stage=3, world_size=n, gpus_per_node=8, dtype="bf16"),
                           small).device["optimizer_step_buffers"] < step.device["optimizer_step_buffers"] / 5
    fp32 = estimate_memory(counts, Setup(stage=3, world_size=n, gpus_per_node=8, dtype="fp32"), ZeroSettings())
    # The fp32 gradient partition is stepped as it is: only the norm's fp64 copy of the head's partition remains.
    assert fp32.device["optimizer_step_buffers"] == 8 * math.ceil(counts.largest_tensor / n)


def test_zero2_steps_its_fp32_gradient_sums_in_place():
    """At ZeRO-2 the fp32 sums are one compact fp32 partition buffer (stage_1_and_2.py:1259
    _use_compact_grad_partition_buffer, :1268 _build_compact_grad_partition_buffer) that the step takes as a view
    (:2904 _get_preflattened_grad_partition; `.to(fp32)` of an fp32 tensor copies nothing), so the step needs no
    fp32 copy beyond the sums: the plan counted 4 bytes per parameter per rank more. Without accumulation the
    bf16 gradient partition is copied to fp32 for the step, and ZeRO-3 flattens its sums into a copy all the same
    (stage3.py:2683 _prepare_fp32_grad_for_sub_group). bench.memory --precision bf16 measures it."""
    psi, n = 1_000_000_000, 8
    counts = replace(counts_from_params(psi), tied_embeddings=False)  # a tied head's last gradient would outweigh

    def step(stage: int, sums: bool) -> int:
        setup = Setup(stage=stage, world_size=n, gpus_per_node=8, dtype="bf16", fp32_accumulation=sums)
        return estimate_memory(counts, setup).device["optimizer_step_buffers"]

    norm = 8 * min(counts.largest_tensor, psi // n)  # the norm's fp64 copy of the largest gradient, before the step
    assert step(2, sums=True) == norm
    assert step(2, sums=False) == max(4 * psi // n, norm)
    assert step(3, sums=True) == step(3, sums=False) == 4 * psi // n  # one sub-group: the whole partition here


# Two ranks train one step per DeepSpeed config given (bf16 with accumulation, as the launcher renders it) and report,
# per config, the optimizer DeepSpeed picked, the tensors the boundary all-reduces, the buffers holding the sums between
# micro-batches and at the boundary, and the largest fp64 tensor made in backward and in the step (the norm's copies).
BOUNDARY_REDUCTION = """
import json, os, sys, weakref
rank, store, configs = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="2")
import torch, torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from trainer.ops import pin_build_dir
pin_build_dir()  # the comm op the group loads: from make install's build, as a rank would
import deepspeed, deepspeed.comm
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
deepspeed.comm.init_distributed(dist_backend="gloo")
reduced, real = [], dist.all_reduce
def recording(tensor, *args, **kwargs):
    reduced.append([str(tensor.dtype), tensor.numel()])
    return real(tensor, *args, **kwargs)
dist.all_reduce = recording
from deepspeed.accelerator import get_accelerator
accelerator, pins = get_accelerator(), []
real_pin = accelerator.pin_memory
def pinning(tensor, *args, **kwargs):  # on CPU the accelerator pins nothing: record what a GPU's would pin
    out = real_pin(tensor, *args, **kwargs)
    pins.append((weakref.ref(out), out.untyped_storage().data_ptr(), out.numel() * out.element_size()))
    return out
accelerator.pin_memory = pinning
class Fp64(TorchDispatchMode):  # the largest fp64 tensor made inside: the gradient norm's copies
    def __enter__(self):
        self.largest = 0
        return super().__enter__()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if isinstance(result, torch.Tensor) and result.dtype == torch.float64 and result.numel() > 1:  # not norms
            self.largest = max(self.largest, result.numel())
        return result
out, fp64 = [], Fp64()
for ds_config in configs:
    pins.clear()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(512, 256), torch.nn.Linear(256, 2048), torch.nn.Linear(2048, 512))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds_config)
    norm_in_backward = 0
    for micro in range(ds_config["gradient_accumulation_steps"]):
        if engine.is_gradient_accumulation_boundary():
            reduced.clear()  # what the boundary's backward reduces
        ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(rank * 10 + micro))
        logits = engine(ids)
        with fp64:
            engine.backward(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten()))
        norm_in_backward = max(norm_in_backward, fp64.largest)
        opt = engine.optimizer
        if not engine.is_gradient_accumulation_boundary():  # between micro-batches: what holds the sums so far
            between = [[str(t.dtype), t.numel()] for p in model.parameters()
                       for t in (p.grad, getattr(p, "grad_accum", None)) if t is not None]
            buckets = [[str(b.dtype), b.numel()] for bucket in getattr(opt, "ipg_buckets", {}).values()
                       if isinstance(bucket.buffer, list) for b in bucket.buffer]  # stage_1_and_2's
        if engine.is_gradient_accumulation_boundary():  # what holds the step's sums before the step takes them
            sums = [g.flat_partition for g in getattr(opt, "averaged_gradients", {}).values()
                    if getattr(g, "flat_partition", None) is not None]
            host = [g.grad for g in getattr(opt, "single_partition_of_fp32_groups", []) if g.grad is not None]
            if hasattr(opt, "grad_partitions_flat_buffer"):  # stage 3: the sums, and the sub-groups' fp32 grads
                sums = [opt.grad_partitions_flat_buffer]
                host = [g.grad for g in opt.fp32_partitioned_groups_flat if g.grad is not None]
        with fp64:
            engine.step()
    norms = torch.tensor([norm_in_backward, fp64.largest])  # in backward, and in the step
    real(norms, op=dist.ReduceOp.MAX)  # the larger rank's
    out.append({"optimizer": type(opt).__name__, "reduced": list(reduced), "between": between, "buckets": buckets,
                "fp64": {"backward": int(norms[0]), "step": int(norms[1])},
                "pinned": [[nbytes, ref() is not None and ref().untyped_storage().data_ptr() == ptr]  # still held
                           for ref, ptr, nbytes in pins],
                "largest": max(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),
                "params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),  # ZeRO-3: whole
                "sums": [[str(t.dtype), t.numel(), str(t.device)] for t in sums],
                "apart_from_host_grads": all(t.untyped_storage().data_ptr() != h.untyped_storage().data_ptr()
                                             for t in sums for h in host) and bool(host)})
if rank == 0:
    print("RESULT " + json.dumps(out), flush=True)
dist.barrier()
os._exit(0)  # as a rank ends (trainer.distributed.exit_without_teardown): gloo's teardown can abort a clean exit
"""


def test_preflight_warns_of_a_node_with_less_host_ram_than_the_plan_needs(tmp_path):
    """The plan's host line is a need per node; at job start every rank reports the host RAM its node has available,
    and preflight compares the two (GPUs: on CPU the host is the device). Llama-3-70B at ZeRO-3 with the optimizer
    offloaded on one 8-GPU node needs 1.44 TB more than its processes (resuming it needs no more:
    tests/test_mapped_loads.py)."""
    from launcher.contract.config import validate_config
    from launcher.planning.deepspeed_config import render_deepspeed_config
    from launcher.planning.memory_plan import host_need, resolved_estimate
    from launcher.planning.plan import resolve

    model = tmp_path / "llama3_70b"
    model.mkdir()
    shutil.copy(CONFIGS / "llama3_70b.json", model / "config.json")
    model_config = json.loads((model / "config.json").read_text())
    raw = {"model": {"name_or_path": str(model)}, "data": {"path": "d.jsonl", "format": "text", "seq_len": 4096},
           "train": {"max_steps": 10, "micro_batch_size": 1, "grad_accum_steps": 1, "lr": 1e-5, "seed": 0,
                     "activation_checkpointing": True},
           "zero": {"stage": 3, "offload_optimizer": "cpu"},
           "launch": {"nodes": 1, "procs_per_node": 8, "device": "cuda"}, "output_dir": str(tmp_path / "run")}
    cfg, _ = resolve(validate_config(raw))
    ds_config = render_deepspeed_config(cfg)
    need = host_need(cfg, model_config, ds_config)
    est = resolved_estimate(cfg, model_config, ds_config)[1]
    assert need.more == est.host_total - est.host["process_runtime"]
    assert need.more == est.host["offloaded_optimizer"]  # 16 bytes per parameter and the pinned partition buffer
    assert abs(need.more - (16 + 2) * counts_from_path(CONFIGS / "llama3_70b.json").total) < 0.01 * need.more
    assert "offloaded optimizer" in need.parts
    assert need.warning("node-a", 1500.0) == ""
    warning = need.warning("node-b", 1000.0)
    assert warning.startswith(f"node-b has 1,000.0 GB of host RAM available, but the plan puts this run's peak at "
                              f"{need.more / 1e9:,.1f} GB more per node (")
    assert host_need(cfg, None, ds_config) is None


def bf16_run_config(tmp_path: Path, *overrides: str):
    """A resolved run config for 2 CPU ranks in bf16 with two micro-batches per step."""
    from launcher.contract.config import apply_overrides, validate_config
    from launcher.planning.plan import resolve

    raw = {"model": {"name_or_path": "org/model"}, "data": {"path": "d.jsonl", "format": "text", "seq_len": 16},
           "train": {"max_steps": 1, "micro_batch_size": 2, "grad_accum_steps": 2, "lr": 1e-3, "seed": 0,
                     "precision": "bf16"},
           "launch": {"nodes": 1, "procs_per_node": 2, "device": "cpu"}, "output_dir": str(tmp_path / "run")}
    cfg, _ = resolve(validate_config(apply_overrides(raw, list(overrides))))
    return cfg


def rendered_bf16_config(tmp_path: Path, *overrides: str) -> dict:
    """The DeepSpeed config the launcher renders for `bf16_run_config`."""
    from launcher.planning.deepspeed_config import render_deepspeed_config

    ds_config = render_deepspeed_config(bf16_run_config(tmp_path, *overrides))
    assert ds_config["data_types"]["grad_accum_dtype"] == "fp32"
    return ds_config


@pytest.fixture(scope="module")
def bf16_ranks(tmp_path_factory) -> dict:
    """Two real ranks train a step under bf16 ZeRO-1-3 with and without the optimizer offloaded (and at ZeRO-3 the
    parameters too), and ZeRO-1 with a zero.config reducing in fp32, each with the DeepSpeed config the launcher
    renders (offloads pinned, as on GPUs), and report what DeepSpeed reduced, where it kept the sums, the fp64
    copies it made and what it asked the accelerator to pin (BOUNDARY_REDUCTION)."""
    tmp = tmp_path_factory.mktemp("bf16-ranks")
    fp32_reduction = tmp / "fp32-reduction.json"  # a user's zero.config: reduce in fp32
    fp32_reduction.write_text(json.dumps({"zero_optimization": {"stage": 1}, "communication_data_type": "fp32"}))
    configs = [rendered_bf16_config(tmp, "zero.stage=1"),
               rendered_bf16_config(tmp, "zero.stage=2"),
               rendered_bf16_config(tmp, "zero.stage=3"),
               rendered_bf16_config(tmp, "zero.stage=2", "zero.offload_optimizer=cpu"),
               rendered_bf16_config(tmp, "zero.stage=1", "zero.offload_optimizer=cpu"),
               rendered_bf16_config(tmp, "zero.stage=3", "zero.offload_optimizer=cpu"),
               rendered_bf16_config(tmp, "zero.stage=1", f"zero.config={fp32_reduction}"),
               rendered_bf16_config(tmp, "zero.stage=3", "zero.offload_optimizer=cpu", "zero.offload_params=cpu")]
    for ds_config in configs:  # pinned as the launcher renders it for GPUs: the script records what would be
        for section in ("offload_optimizer", "offload_param"):
            if section in ds_config["zero_optimization"]:
                ds_config["zero_optimization"][section]["pin_memory"] = True
    ranks = [subprocess.Popen([sys.executable, "-c", BOUNDARY_REDUCTION, str(rank), str(tmp / "store"),
                               json.dumps(configs)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT) for rank in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in ranks]
    assert all(proc.returncode == 0 for proc in ranks), [(proc.returncode, err[-3000:])
                                                          for proc, (_, err) in zip(ranks, outputs)]
    seen = json.loads(outputs[0][0].split("RESULT ", 1)[1])
    for result, ds_config in zip(seen, configs):
        result["ds_config"] = ds_config
    names = ("zero1", "zero2", "zero3", "zero2_offloaded", "zero1_offloaded", "zero3_offloaded",
             "zero1_fp32_reduction", "zero3_offloaded_params")
    return dict(zip(names, seen, strict=True)) | {"fp32_reduction_file": fp32_reduction}


def test_zero1_bf16_reduces_its_whole_fp32_sums_through_a_bf16_copy(bf16_ranks):
    """bf16 at ZeRO-1 with fp32 sums runs DeepSpeed's BF16_Optimizer, and after the last micro-batch the engine
    all-reduces the whole flat fp32 sums through a bf16 copy: 2·Ψ bytes at any N. The plan counted the fp32
    partition (4·Ψ/N, as for stage_1_and_2), which matches at N = 2 only: for Llama-3-8B on 8 GPUs 4 GB where
    DeepSpeed allocates 16, and `zero.stage: auto` picked ZeRO-1 for it on 32 × 80 GB, which does not fit."""
    seen = bf16_ranks["zero1"]
    assert seen["optimizer"] == "BF16_Optimizer"
    dtype, numel = max(seen["reduced"], key=lambda r: r[1])
    psi = seen["params"]
    assert dtype == "torch.bfloat16" and psi <= numel < psi + 1024  # the whole model's sums (aligned), not half

    counts = counts_from_params(psi)
    for n in (2, 8, 64):
        setup = Setup(stage=1, world_size=n, gpus_per_node=8, dtype="bf16", fp32_accumulation=True)
        assert estimate_memory(counts, setup).device["optimizer_step_buffers"] == 2 * psi  # the bf16 copy


def test_zero1_bf16_reducing_in_fp32_needs_no_copy(bf16_ranks):
    """A zero.config with communication_data_type: fp32 makes BF16_Optimizer all-reduce the fp32 sums themselves
    (engine.allreduce_bucket converts only to another dtype), so the plan drops the 2·Ψ copy, from the rendered
    config and, before rendering, from the user's file."""
    from launcher.planning.memory_plan import zero_settings

    seen = bf16_ranks["zero1_fp32_reduction"]
    assert seen["optimizer"] == "BF16_Optimizer"
    dtype, numel = max(seen["reduced"], key=lambda r: r[1])
    psi = seen["params"]
    assert dtype == "torch.float32" and psi <= numel < psi + 1024  # the sums themselves
    assert not [r for r in seen["reduced"] if r[0] == "torch.bfloat16"]

    counts = counts_from_params(psi)
    setup = Setup(stage=1, world_size=8, gpus_per_node=8, dtype="bf16", fp32_accumulation=True)
    cfg = bf16_run_config(bf16_ranks["fp32_reduction_file"].parent, "zero.stage=1",
                          f"zero.config={bf16_ranks['fp32_reduction_file']}")
    for zero in (ZeroSettings.from_deepspeed(seen["ds_config"]), zero_settings(cfg, counts.hidden_size, psi)):
        assert zero.communication_dtype == "fp32"
        assert estimate_memory(counts, setup, zero).device["optimizer_step_buffers"] == 0  # fused AdamW: none
    assert estimate_memory(counts, setup).device["optimizer_step_buffers"] == 2 * psi


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero1_offloaded", "zero2_offloaded", "zero3_offloaded"])
def test_the_gradient_norms_fp64_copies_are_counted_where_deepspeed_makes_them(bf16_ranks, name, monkeypatch):
    """ZeRO's optimizers compute the gradient norm in fp64 (zero/utils.py get_norm_dtype), converting one gradient at
    a time: each parameter's slice of a rank's partition at stages 1-2, its partition at stage 3. Offloaded, that
    happens in backward as the gradient leaves for the host, at the activation peak when it is the head's;
    otherwise in the step. Uncounted, 8 bytes per element of the largest slice: 4.2 GB per GPU at the backward peak
    of Llama-3-8B at ZeRO-2 with the optimizer offloaded on 8 GPUs (the head's 525 M elements). BF16_Optimizer
    (bf16 ZeRO-1 with fp32 sums) makes none. Seen on two real ranks: the largest fp64 tensor of either."""
    seen = bf16_ranks[name]
    psi, largest = seen["params"], seen["largest"]
    stage, offload = int(name[4]), name.endswith("offloaded")
    bound = -(-largest // 2) if stage == 3 else min(largest, -(-psi // 2))  # from the model's shapes
    where, elsewhere = ("backward", "step") if offload else ("step", "backward")
    assert bound - 1024 <= seen["fp64"][where] <= bound and seen["fp64"][elsewhere] == 0  # 512: a bias beside it

    counts = replace(counts_from_params(psi), largest_tensor=largest, tied_embeddings=False)  # as the model above
    setup = Setup(stage=stage, world_size=2, gpus_per_node=2, dtype="bf16", fp32_accumulation=True,
                  offload_optimizer=offload)
    assert norm_elements(counts, setup) == bound
    est = estimate_memory(counts, setup).device
    monkeypatch.setattr(memory, "NORM_BYTES", 0)
    uncounted = estimate_memory(counts, setup).device
    if offload:  # on top of the gradient in flight
        assert est["gradient_in_flight"] - uncounted["gradient_in_flight"] == 8 * bound
    else:  # before the step's own buffers, not beside them
        assert est["optimizer_step_buffers"] == max(uncounted["optimizer_step_buffers"], 8 * bound)


@pytest.mark.parametrize("tied", [True, False])
def test_a_tied_heads_gradient_is_whole_only_at_the_end_of_backward(hf, tied):
    """What the plan's placement of the norm's copy rests on: a parameter's gradient hook (where ZeRO reduces it)
    runs once its gradient is whole. An untied head's is the first of backward, at the activation peak; a tied
    head's is summed with the embedding's, so it is the last, after the activations are freed."""
    torch, _ = hf
    model = build(hf, {**TINY, "model_type": "llama", "num_hidden_layers": 2, "tie_word_embeddings": tied})
    order = []
    for name, param in model.named_parameters():
        param.register_post_accumulate_grad_hook(lambda p, name=name: order.append(name))
    ids = torch.randint(0, TINY["vocab_size"], (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    assert order.count(head) == 1 and order.index(head) == (len(order) - 1 if tied else 0)


def test_the_norms_copy_of_a_tied_head_comes_after_the_activation_peak():
    """Offloaded, the copy made at the activation peak is of a layer's largest gradient (SmolLM2: an MLP projection,
    576 × 1,536), and the tied head's (49,152 × 576) comes with its gradient after the activations are freed, in
    the phase the step's buffers are counted in."""
    counts = counts_from_path(CONFIGS / "smollm2_135m.json")
    psi, mlp, head = counts.total, 576 * 1536, 49152 * 576
    setup = Setup(stage=2, world_size=2, gpus_per_node=2, dtype="bf16", offload_optimizer=True)
    plain = estimate_memory(counts, setup).device
    untied = estimate_memory(counts_from_config({**json.loads((CONFIGS / "smollm2_135m.json").read_text()),
                                                 "tie_word_embeddings": False}), setup).device
    assert plain["optimizer_step_buffers"] == 2 * head + 8 * min(head, psi // 2)
    assert untied["optimizer_step_buffers"] == 0
    assert plain["gradient_in_flight"] == 2 * mlp + 8 * mlp  # the layer's gradient waiting, and its copy
    assert untied["gradient_in_flight"] == 2 * head + 8 * min(head, (psi + head) // 2)


def test_a_tied_heads_gradient_waits_after_the_activation_peak_not_at_it():
    """Without offload too, a tied head's gradient (SmolLM2: 49,152 × 576) waits for its reduction only at the end of
    backward, after the activations: at the peak a layer's (576 × 1,536) is the one waiting. Untied, the head's is
    the first, at the peak. Gemma-2 (tied, a 256k vocabulary, the chunked loss off for its soft-capping) planned
    1.8 GB per GPU too many at the peak for the 9B."""
    config = json.loads((CONFIGS / "smollm2_135m.json").read_text())
    head, mlp = 49152 * 576, 576 * 1536
    setup = Setup(stage=2, world_size=2, gpus_per_node=2, dtype="bf16")
    tied = estimate_memory(counts_from_config(config), setup).device
    untied = estimate_memory(counts_from_config({**config, "tie_word_embeddings": False}), setup).device
    assert tied["gradient_in_flight"] == 2 * mlp and tied["optimizer_step_buffers"] >= 2 * head
    assert untied["gradient_in_flight"] == 2 * head


def test_bf16_optimizer_makes_no_fp64_copies(bf16_ranks):
    seen = bf16_ranks["zero1"]
    assert seen["optimizer"] == "BF16_Optimizer" and seen["fp64"] == {"backward": 0, "step": 0}
    setup = Setup(stage=1, world_size=2, gpus_per_node=2, dtype="bf16", fp32_accumulation=True)
    assert norm_elements(counts_from_params(seen["params"]), setup) == 0


def test_zero2_offloaded_keeps_its_fp32_sums_on_the_device(bf16_ranks):
    """Offloaded at ZeRO-2, the fp32 sums of a bf16 step still accumulate in the compact fp32 partition DeepSpeed
    allocates on the device (stage_1_and_2.py _build_compact_grad_partition_buffer, current_device_name()), apart
    from the host's fp32 gradient it copies them to at the boundary. The plan counted no device gradients: for
    Llama-3-70B on 8 GPUs 35 GB per GPU short. Both buffers seen on two real ranks (on CPU one memory; that the
    partition is on the GPU there is read from DeepSpeed's code); bench.memory measured the 0.27 GB here."""
    seen = bf16_ranks["zero2_offloaded"]
    assert seen["optimizer"] == "DeepSpeedZeroOptimizer" and seen["apart_from_host_grads"]
    (dtype, numel, _), = seen["sums"]
    psi = seen["params"]
    assert dtype == "torch.float32" and psi // 2 <= numel < psi // 2 + 1024  # this rank's half, in fp32

    setup = Setup(stage=2, world_size=2, gpus_per_node=2, dtype="bf16", fp32_accumulation=True, offload_optimizer=True)
    assert model_state_bytes(psi, setup)["gradients"] == 4 * psi // 2  # the partition seen above, in fp32


def test_zero1_offloaded_sums_in_each_parameters_fp32_grad_accum(bf16_ranks):
    """Offloaded at ZeRO-1 a bf16 step is not BF16_Optimizer's but stage_1_and_2's, which moves each gradient into the
    parameter's fp32 grad_accum as backward produces it and frees the bf16 one, stages its bucket in fp32, and at the
    boundary reduces into the compact fp32 partition. The plan counted BF16_Optimizer's (2 + 4)·Ψ: right at N = 2,
    where 4·Ψ/N = 2·Ψ, and 15.5 GB of gradients per GPU too many for Llama-3-8B on 64 GPUs (12-13 GB net of the fp32
    bucket and conversions it now counts; 77 GB planned, 65 now). fp16 takes the same path."""
    seen = bf16_ranks["zero1_offloaded"]
    assert seen["optimizer"] == "DeepSpeedZeroOptimizer"
    psi = seen["params"]
    assert {dtype for dtype, _ in seen["between"]} == {"torch.float32"}  # no bf16 gradient outlives its hook
    assert sum(numel for _, numel in seen["between"]) == psi  # every parameter's whole sums, on every rank
    (dtype, numel, _), = seen["sums"]
    assert dtype == "torch.float32" and psi // 2 <= numel < psi // 2 + 1024  # the compact partition
    zero = ZeroSettings.from_deepspeed(seen["ds_config"])
    assert seen["buckets"] == [["torch.float32", zero.reduce_bucket_size]]

    counts = counts_from_params(psi)
    for dtype in ("bf16", "fp16"):
        for n in (2, 64):
            setup = Setup(stage=1, world_size=n, gpus_per_node=8, dtype=dtype, fp32_accumulation=True,
                          offload_optimizer=dtype == "bf16")
            est = estimate_memory(counts, setup, zero)
            assert est.device["gradients"] == 4 * psi + 4 * psi // n  # grad_accum + the partition seen above
            assert est.device["reduce_buckets"] >= 4 * zero.reduce_bucket_size  # the fp32 bucket seen above


@pytest.mark.parametrize("name", ["zero1_offloaded", "zero2_offloaded", "zero3_offloaded", "zero3_offloaded_params"])
def test_the_plans_pinned_host_buffers_are_the_ones_deepspeed_pins(bf16_ranks, name):
    """On GPUs torch rounds each pinned allocation up to a power of two (launcher.planning.pinned_memory), so the plan
    must know which host buffers are pinned and how big each one is, not only their sum. Two real ranks, with the
    offloads pinned as rendered for GPUs, record every tensor DeepSpeed hands the accelerator to pin: those still
    held after two steps are the plan's pinned buffers, one for one; zero.Init's per-parameter partitions are
    pinned and then freed (their storage moved into the flat buffer), as the plan says."""
    seen = bf16_ranks[name]
    stage, params = int(name[4]), name.endswith("params")
    held = sorted(nbytes for nbytes, alive in seen["pinned"] if alive)
    freed = sum(nbytes for nbytes, alive in seen["pinned"] if not alive)

    counts = replace(counts_from_params(seen["params"]), largest_tensor=seen["largest"])
    setup = Setup(stage=stage, world_size=2, gpus_per_node=2, dtype="bf16", fp32_accumulation=True,
                  offload_optimizer=True, offload_params=params)
    buffers = offload_buffers(counts, setup, ZeroSettings.from_deepspeed(seen["ds_config"]))
    assert sorted(b.nbytes for b in buffers if b.pinned and not b.freed_into_cache) == held
    assert sum(b.nbytes for b in buffers if b.freed_into_cache) == freed == (2 * seen["params"] // 2 if params else 0)
    assert sum(b.nbytes for b in buffers if not b.pinned) == (8 if stage < 3 else 12) * seen["params"] // 2


def test_zero3_offloaded_keeps_fp32_sums_beside_the_fp32_gradient_it_steps(bf16_ranks):
    """Offloaded at ZeRO-3, the gradient partition that holds a bf16 step's sums is fp32 (grad_partitions_flat_buffer,
    in the accumulation dtype, on the offload device), and each sub-group steps with an fp32 gradient of its own
    (subgroup_gradient_buffer): 4 + 4 bytes per parameter of the partition on the host, where the plan counted
    4 + 2, as without fp32 sums. For Llama-3-70B on one 8-GPU node, 141 GB of host RAM more."""
    seen = bf16_ranks["zero3_offloaded"]
    assert seen["optimizer"] == "DeepSpeedZeroOptimizer_Stage3" and seen["apart_from_host_grads"]
    (dtype, numel, device), = seen["sums"]
    psi = seen["params"]
    assert dtype == "torch.float32" and device == "cpu" and psi // 2 <= numel < psi // 2 + 1024

    counts = counts_from_params(psi)
    sums = Setup(stage=3, world_size=2, gpus_per_node=2, dtype="bf16", fp32_accumulation=True, offload_optimizer=True)
    host = {fp32: estimate_memory(counts, replace(sums, fp32_accumulation=fp32), margins=AS_ASKED).host
            for fp32 in (True, False)}
    assert host[True]["offloaded_optimizer"] - host[False]["offloaded_optimizer"] == 2 * (2 * psi // 2)  # 2 B, 2 ranks
