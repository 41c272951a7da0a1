"""Per-device and per-node memory of a DeepSpeed ZeRO fine-tune, component by component, without torch.

A job that waits hours in the queue and then dies of out-of-memory is the most expensive mistake on a
cluster, so every term below is one a user can check and argue with: model states from the ZeRO paper,
DeepSpeed's real buffers (sizes read from deepspeed/runtime/zero/config.py), activations measured
tensor by tensor on the Hugging Face modules (tests/test_memory.py), and the fixed costs of CUDA.

Units: bytes internally, GB = 1e9 bytes in everything shown. The peak is

    model states + buffers kept for the whole run (offload staging)
    + max(forward/backward working set, optimizer-step buffers) + fragmentation + runtime

because activations are freed before the optimizer step allocates its fp32 gradient copy. Every DeepSpeed
buffer below was read from its ZeRO code and checked against the real trainer on CPU (bench/memory.py,
numbers in bench/RESULTS.md, within 5% per rank). What only holds on CPU stays out of the GPU figures:
unfused AdamW temporaries count only with `Setup(optimizer="torch")`, and the CPU margins (glibc's heap,
no CUDA) live in launcher.planning.memory_plan.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from launcher.contract.errors import ConfigError
from launcher.planning.chunked_loss import loss_chunk_tokens
from launcher.planning.model_size import ModelCounts, outgrown_window
from launcher.planning.moe_size import moe_mlp_activation_bytes
from launcher.planning.pinned_memory import ROUNDS_EVERYTHING, installed_rounding, pinned_bytes, run_rounding

GB = 1e9
DTYPES = ("bf16", "fp16", "fp32")
ATTENTIONS = ("auto", "sdpa", "flash_attention_2", "eager")
# fused: FusedAdam, DeepSpeedCPUAdam with offload, or torch's AdamW with fused=True (the launcher's choice when
# torch's steps: on CPU and where FusedAdam cannot be built), all in place; torch: torch.optim.AdamW unfused
# (a zero.config that turns fusion off), whose update allocates temporaries (see optimizer_temporaries).
OPTIMIZERS = ("fused", "torch")
# Bytes per parameter (ZeRO paper §3.1): mixed precision keeps 2-byte params and grads and K = 12 bytes
# of fp32 master weights + Adam moments. fp32 training without ZeRO has no master copy (K = 8), but every
# ZeRO optimizer clones its partition as the master copy even in fp32 (measured: bench/memory.py), so K = 12.
PARAM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
OPTIMIZER_BYTES = {"bf16": 12, "fp16": 12, "fp32": 8}
DS_STAGE0_ALLREDUCE = 500_000_000  # engine.MEMORY_OPT_ALLREDUCE_SIZE: stage 0 flattens grads in such buckets
NORM_BYTES = 8  # ZeRO's gradient norms convert each gradient to fp64 (zero/utils.py get_norm_dtype), on any GPU
STAGE3_NORM_SPLIT = 250_000_000  # stage3.py _constant_buffered_norm2: the offloaded norm converts this much at a time


@dataclass(frozen=True)
class ZeroSettings:
    """DeepSpeed's bucket settings, defaulting to deepspeed/runtime/zero/config.py (0.19)."""

    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000  # gathers into views of the flat fp16 buffer: no extra memory
    prefetch_bucket_size: int = 50_000_000
    max_live_parameters: int = 1_000_000_000
    overlap_comm: Optional[bool] = None  # DeepSpeed's default: on at stage 3 only (two reduce buffers)
    sub_group_size: int = 1_000_000_000  # stage 3 steps its partition in sub-groups of about this many elements
    communication_dtype: Optional[str] = None
    """communication_data_type (top level): the dtype gradients are reduced in; None: the training precision's."""

    @classmethod
    def from_deepspeed(cls, ds_config: dict[str, Any]) -> ZeroSettings:
        """Read the settings a rendered DeepSpeed config will use; "auto" or missing keeps the default."""
        comm = ds_config.get("communication_data_type")
        z = ds_config.get("zero_optimization") or {}
        keys = {"reduce_bucket_size": "reduce_bucket_size", "allgather_bucket_size": "allgather_bucket_size",
                "prefetch_bucket_size": "stage3_prefetch_bucket_size",
                "max_live_parameters": "stage3_max_live_parameters", "overlap_comm": "overlap_comm",
                "sub_group_size": "sub_group_size"}
        found = {ours: z[theirs] for ours, theirs in keys.items() if z.get(theirs) not in (None, "auto")}
        for name, value in found.items():
            found[name] = bool(value) if name == "overlap_comm" else int(value)
        if comm in PARAM_BYTES:
            found["communication_dtype"] = comm
        return cls(**found)

    def communication_bytes(self, dtype: str) -> int:
        """Bytes per element of a gradient reduced in training precision `dtype`."""
        return PARAM_BYTES[self.communication_dtype or dtype]


@dataclass(frozen=True)
class Margins:
    """Fixed costs outside PyTorch's allocator statistics; override when you have measured your cluster."""

    cuda_context_gb: float = 1.0  # CUDA context, kernel images, cuBLAS/cuDNN workspaces
    nccl_gb: float = 0.5  # NCCL communicators and channel buffers (only when world_size > 1)
    fragmentation: float = 0.10  # of the transient working set: the caching allocator cannot reuse every block
    host_per_rank_gb: float = 3.0  # RSS of a Python + torch + CUDA + DeepSpeed process before any tensor
    mapped_above: Optional[int] = None
    """CPU only: glibc gives blocks above this size (its largest mmap threshold) their own mapping and unmaps
    them when freed, so such buffers never stay behind as fragmentation."""
    pinned_rounding: Optional[int] = field(default_factory=installed_rounding)
    """GPUs: torch rounds pinned host allocations up to this size to a power of two (launcher.planning.pinned_memory;
    it depends on the installed torch). None: nothing is pinned (on CPU the host is the device)."""


@dataclass(frozen=True)
class Setup:
    """One candidate configuration: everything besides the model that decides its memory."""

    stage: int
    world_size: int
    gpus_per_node: int
    micro_batch_size: int = 1
    seq_len: int = 2048
    dtype: str = "bf16"
    offload_optimizer: bool = False
    offload_params: bool = False
    activation_checkpointing: bool = False
    attention: str = "auto"
    optimizer: str = "fused"
    sequence_parallel: int = 1
    """Ranks per sequence (Ulysses): activations and logits are those of seq_len / N tokens per rank."""
    chunked_loss: bool = False
    """The loss holds one chunk's logits (launcher.planning.chunked_loss) instead of the whole micro-batch's."""
    tiled_mlp: bool = False
    """MLP intermediates exist for one tile of the sequence at a time, not all of it."""
    offload_checkpoints: bool = False
    """Checkpointed layer inputs wait in host RAM (GPUs only: on CPU the host is the device)."""
    whole_layers: bool = False
    """ZeRO-3 gathers a decoder layer's parameters at once (a compiled model's layers are leaf modules)."""
    async_save: bool = False
    """Background saves keep a host copy of each rank's checkpoint share (train.async_save)."""
    fp32_accumulation: bool = False
    """Gradients sum in fp32 over a step's micro-batches (devices.accumulates_in_fp32; bf16/fp16 only)."""

    @property
    def local_seq_len(self) -> int:
        """Tokens of each sequence that one rank holds."""
        return self.seq_len // self.sequence_parallel

    @property
    def nodes(self) -> int:
        return -(-self.world_size // self.gpus_per_node)

    @property
    def offload(self) -> str:
        """"none", "optimizer" or "optimizer+params": the key used in tables and JSON."""
        parts = [name for name, on in (("optimizer", self.offload_optimizer), ("params", self.offload_params)) if on]
        return "+".join(parts) or "none"

    def label(self) -> str:
        off = "" if self.offload == "none" else f" + offload {self.offload}"
        sp = f" + SP {self.sequence_parallel}" if self.sequence_parallel > 1 else ""
        return f"ZeRO-{self.stage}{off}{sp}"


DEVICE_KEYS = ("params", "gradients", "optimizer_states", "offload_staging", "activations", "logits",
               "gradient_in_flight", "reduce_buckets", "zero3_live_params", "optimizer_step_buffers",
               "fragmentation", "cuda_runtime")
# The working set of forward and backward, freed before the optimizer step allocates its buffers.
FORWARD_BACKWARD_KEYS = ("activations", "logits", "gradient_in_flight", "reduce_buckets", "zero3_live_params")
HOST_KEYS = ("offloaded_optimizer", "offloaded_params", "offloaded_checkpoints", "checkpoint_loading",
             "async_save_snapshots", "process_runtime")


MEASURED_OVER_ESTIMATE = 0.07
"""How far over its estimate a measured peak may land: bf16 at ZeRO-1-3 read 1.04-1.07 × until the bench compared
with the plan of what ran, and 1.05 × at most since (fp32 ZeRO-2 with the optimizer offloaded; bench/RESULTS.md,
Memory: allocated-like peaks on CPU). Kept at 7% until peaks are measured on GPUs, whose allocator the CPU runs
cannot show. A fit with less room to spare than
this share of the estimate is called tight, and `auto` choices keep at least this much to spare when any allowed
configuration can."""
TIGHT_WHY = f"measured peaks have reached {MEASURED_OVER_ESTIMATE:.0%} over the estimate"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device and per node, by component, for one Setup; `to_dict` gives the GB view."""

    setup: Setup
    device: dict[str, int]
    host: dict[str, int]
    device_total: int
    host_total: int
    notes: list[str] = field(default_factory=list)

    @property
    def model_states(self) -> int:
        return self.device["params"] + self.device["gradients"] + self.device["optimizer_states"]

    @property
    def forward_backward(self) -> int:
        """The transient working set of forward and backward (freed before the optimizer step)."""
        return sum(self.device[key] for key in FORWARD_BACKWARD_KEYS)

    def fits(self, gpu_memory_gb: float, host_memory_gb: Optional[float] = None, margin: float = 0.0) -> bool:
        """Within the device's memory (and the node's RAM); with `margin`, also with that share of the estimate to
        spare on the device."""
        ok = self.device_total * (1 + margin) <= gpu_memory_gb * GB
        return ok and (host_memory_gb is None or self.host_total <= host_memory_gb * GB)

    def tight(self, gpu_memory_gb: float) -> bool:
        """It fits, with less room than measured peaks have exceeded their estimates by."""
        return self.fits(gpu_memory_gb) and not self.fits(gpu_memory_gb, margin=MEASURED_OVER_ESTIMATE)

    def to_dict(self) -> dict[str, Any]:
        gb = lambda b: round(b / GB, 3)  # noqa: E731 - three decimals: 1.875 must not print as 1.88
        return {"setup": asdict(self.setup), "model_states_gb": gb(self.model_states),
                "device_gb": {k: gb(v) for k, v in self.device.items()}, "total_gb": gb(self.device_total),
                "host_per_node_gb": {k: gb(v) for k, v in self.host.items()}, "host_total_gb": gb(self.host_total),
                "notes": list(self.notes)}


@dataclass(frozen=True)
class _ActivationLayout:
    """How a family's modules differ in what autograd keeps (measured per family in the tests)."""

    gemma_norm: bool = False  # (1 + w) applied in fp32: keeps an fp32 normalised copy, rstd costs 8 B/token
    post_norms: int = 0  # Gemma2/3 also normalise the attention and MLP outputs
    qk_norm: bool = False  # Qwen3/Gemma3 normalise q and k per head
    attn_softcap: bool = False  # Gemma2: tanh soft-capping of the attention scores (eager only)
    logit_softcap: bool = False  # Gemma2: tanh soft-capping of the final logits keeps one more copy
    fused_qkv: bool = False  # Phi-3: V is a view of the fused qkv output, which stays alive whole
    dropout_masks: int = 0  # Phi-3's residual dropouts keep e·t·h of masks even at p = 0


ACTIVATION_LAYOUTS: dict[str, _ActivationLayout] = {
    "qwen3": _ActivationLayout(qk_norm=True),
    "qwen3_moe": _ActivationLayout(qk_norm=True),
    "olmoe": _ActivationLayout(qk_norm=True),
    "gemma": _ActivationLayout(gemma_norm=True),
    "gemma2": _ActivationLayout(gemma_norm=True, post_norms=2, attn_softcap=True, logit_softcap=True),
    "gemma3_text": _ActivationLayout(gemma_norm=True, post_norms=2, qk_norm=True),
    "phi3": _ActivationLayout(fused_qkv=True, dropout_masks=1),
}


SINK_ATTENTION_MODELS = ("gpt_oss",)
"""Models whose attention sinks `auto` runs on trainer/sink_attention.py instead of transformers' eager attention
(verified against it: tests/test_sink_attention.py). Other sink models keep eager until verified."""
SINK_WINDOW_BLOCKS = 4
"""trainer/sink_attention.py runs a sliding-window layer's queries in blocks of this many windows: each block
computes and keeps a block × (block + window) mask, and a longer block wastes more of that on masked keys."""


def sink_head_width(head_dim: int) -> int:
    """The head dimension trainer/sink_attention.py pads q, k and v to: one more for the sink score, rounded up to a
    multiple of 8 (GPU kernels' alignment)."""
    return -(-(head_dim + 1) // 8) * 8


def _attention_kind(counts: ModelCounts, attention: str) -> str:
    """"eager" materialises the s×s scores; sdpa and flash-attention keep only a logsumexp per row; "sinks" is
    trainer/sink_attention.py (sdpa with a sink key, see sink_attention_bytes)."""
    if attention == "auto" and counts.architecture in SINK_ATTENTION_MODELS:
        return "sinks"
    if attention == "auto":  # transformers has no sdpa path for Gemma2 (soft-capping): eager
        return "eager" if counts.architecture == "gemma2" else "sdpa"
    return "eager" if attention == "eager" else "sdpa"


def sink_attention_bytes(counts: ModelCounts, micro_batch_size: int, seq_len: int, e: int,
                         sequence_parallel: int = 1) -> int:
    """What trainer/sink_attention.py keeps for backward in one layer, its output included (e bytes per element).

    Each sdpa call keeps its q, k, v and output padded to sink_head_width(d) and a 4-byte logsumexp per head and
    query. A whole sample (a full layer, or one no longer than the window) has one extra row (the sink key, and
    the dropped leading query). A sliding-window layer over a longer sample runs blocks of SINK_WINDOW_BLOCKS
    windows, each with the keys from one window before it (repeated to every query head: the GPU kernels that
    take a mask do not take grouped heads) and a block × keys mask, which sdpa keeps in the compute dtype.
    Counted for one sample per row (a packed row's other samples each add a row of q, k, v), at the larger of the
    model's two kinds of layer. Plus the output transposed for o_proj, e·t·a·d.

    Under sequence parallelism over N ranks a rank attends the whole sequence (`seq_len`) with a/N query heads
    and max(1, kv/N) kv heads (DeepSpeed replicates them when there are fewer than N); the block masks are the
    whole sequence's, and o_proj's input is the rank's slice.
    """
    from launcher.planning.sequence_parallel import kv_heads_per_rank  # it imports this module's SINK_ATTENTION_MODELS

    b, s, d = micro_batch_size, seq_len, counts.head_dim
    a, kv = counts.num_heads // sequence_parallel, kv_heads_per_rank(sequence_parallel, counts.num_kv_heads)
    width = sink_head_width(d)
    full_layer = e * b * (s + 1) * width * (2 * a + 2 * kv) + 4 * b * a * (s + 1)
    sliding_layer, window = 0, counts.sliding_window
    if window and s > window:
        block = SINK_WINDOW_BLOCKS * window
        starts = range(0, s, block)
        keys = [min(s, first + block) - max(0, first - window + 1) + 1 for first in starts]
        masks = sum(e * (min(s, first + block) - first) * n for first, n in zip(starts, keys))
        sliding_layer = e * b * (2 * s * width * a + 2 * sum(keys) * width * a) + 4 * b * a * s + b * masks
    return max(full_layer, sliding_layer) + e * b * (s // sequence_parallel) * counts.num_heads * d


def layer_activation_bytes(counts: ModelCounts, micro_batch_size: int, seq_len: int, dtype: str = "bf16",
                           attention: str = "auto", sequence_parallel: int = 1, tiled_mlp: bool = False) -> int:
    """Bytes autograd keeps for one decoder layer between its forward and its backward.

    Korthikanti et al. (2022) give 34·s·b·h + 5·a·s²·b for GPT-3 layers; the HF Llama family differs:
    no dropout, RMSNorm computed in fp32, a SwiGLU MLP, GQA, and sdpa/flash attention that never keeps
    the s×s scores. Per layer, with t = b·s tokens and e bytes per activation (2 for bf16):
      2 norms feeding a linear: fp32 input + e normalised + e output = (4 + 2e)·t·h, plus 4·t for rstd
      q, k, v after RoPE (kept by the attention kernel) and its output o: e·t·(2·a·d + 2·kv·d),
        plus a 4-byte logsumexp per head and row (sdpa/flash) — eager instead keeps the fp32 softmax
        and its e-byte copy, (4 + e)·b·a·s², and k, v repeated to all a heads
      SwiGLU: gate, act(gate), up and their product: 4·e·t·I (an MoE layer instead keeps its routed
        copies of every token and its router's probabilities: moe_size.moe_mlp_activation_bytes)
    This equals the saved-tensor bytes of transformers' modules to the byte for Llama/Mistral/Qwen2.

    A sliding window a sample can outgrow (Mistral, Gemma 3) needs a mask. With one, sdpa keeps it in every layer
    (e·b·s²), and transformers repeats k and v to all a heads (GQA inside sdpa only without a mask), so they
    count like q. flash-attention takes the window itself; packed rows of other models need no mask
    (trainer/separation.py).

    Under sequence parallelism over N ranks, t = b·s/N is the rank's slice. Attention keeps the exchanged
    q, k, v (the whole sequence for heads/N: the same bytes as the slice with all heads, except that kv
    heads are replicated when there are fewer than N: max(kv, N) of them count) and one more e·t·q copy of
    the output on its way back. A tiled MLP keeps only its input, which the norm term already counts.
    """
    lay = ACTIVATION_LAYOUTS.get(counts.architecture, _ActivationLayout())
    e = PARAM_BYTES[dtype]
    b, s = micro_batch_size, seq_len // sequence_parallel
    t, h, a, k, I = b * s, counts.hidden_size, counts.num_heads, counts.num_kv_heads, counts.intermediate_size  # noqa: E741
    if sequence_parallel > 1:
        k = max(k, sequence_parallel)
    q, kv = a * counts.head_dim, k * counts.head_dim
    rstd = 8 if lay.gemma_norm else 4
    norm_linear = (8 + e) if lay.gemma_norm else (4 + 2 * e)
    total = 2 * (norm_linear * t * h + rstd * t) + lay.post_norms * (8 * t * h + rstd * t)
    if lay.qk_norm:
        total += (8 if lay.gemma_norm else 4 + e) * t * (q + kv) + rstd * t * (a + k)
    kind = _attention_kind(counts, attention)
    if kind == "sinks":
        total += sink_attention_bytes(counts, b, seq_len, e, sequence_parallel)
    elif kind == "eager":
        scores = b * a * s * s
        total += e * t * (2 * q + 2 * q) + (4 + (e if e < 4 else 0)) * scores
        total += e * scores if lay.attn_softcap else 0
    elif attention != "flash_attention_2" and outgrown_window(counts.sliding_window, seq_len):
        total += e * t * (2 * q + 2 * q) + 4 * b * a * s + e * b * s * s  # masked: k, v repeated, the mask kept
    else:
        total += e * t * (2 * q + 2 * kv) + 4 * b * a * s
    if sequence_parallel > 1:
        total += e * t * q
    if lay.fused_qkv:
        total += e * t * (q + kv)  # the whole fused output instead of v alone
    mlp = 0 if tiled_mlp else 4 * e * t * I
    if counts.moe is not None:  # the MoE layer; where dense layers are wider, theirs (the peak layer counts)
        mlp = max(moe_mlp_activation_bytes(counts.moe, h, t, e), mlp if counts.moe.dense_layers else 0)
    total += mlp + lay.dropout_masks * e * t * h
    return total


def mlp_tiles(local_seq_len: int, hidden_size: int) -> int:
    """Tiles a tiled MLP cuts each row of a rank's slice into: DeepSpeed's rule, about hidden_size positions each."""
    return max(1, -(-local_seq_len // hidden_size))


def tiled_mlp_problem(counts: ModelCounts, model: str) -> Optional[str]:
    """Why train.tiled_mlp cannot apply to this model (None when it can): an MoE layer's router must see every
    token of the sequence at once (top-k and its load-balancing loss), which tiles would split."""
    if counts.moe is None:
        return None
    return (f"train.tiled_mlp: true, but {model} is a mixture-of-experts model: its router sees the whole sequence "
            "(top-k and the aux loss over every token), which tiles would split; allowed: false (the experts' "
            "activations already scale with top-k, not with all experts)")


def activation_bytes(counts: ModelCounts, micro_batch_size: int, seq_len: int, dtype: str = "bf16",
                     checkpointing: bool = False, attention: str = "auto", sequence_parallel: int = 1,
                     tiled_mlp: bool = False, offload_checkpoints: bool = False) -> int:
    """Activations at the start of the backward pass, the moment they peak.

    Without checkpointing: L layers + the final norm + a backward workspace of 2·e·t·(I + h) (gradients
    of the MLP and residual stream in flight). With HF's per-layer checkpointing: L layer inputs
    (e·t·h each) + one layer recomputed in backward + the same workspace. Summing this with the logits
    term overstates the true peak by at most the smaller of the two backward transients.

    t is a rank's tokens: seq_len / N under sequence parallelism. A tiled MLP recomputes one tile at a
    time in backward, so its intermediates count for one tile (in the recomputed layer and the workspace);
    offloaded checkpoints leave three layer inputs on the device (the newest, and two copies in flight).
    """
    e = PARAM_BYTES[dtype]
    local = seq_len // sequence_parallel
    t = micro_batch_size * local
    h, layers, inter = counts.hidden_size, counts.num_layers, counts.mlp_width
    one_layer = layer_activation_bytes(counts, micro_batch_size, seq_len, dtype, attention, sequence_parallel,
                                       tiled_mlp)
    lay = ACTIVATION_LAYOUTS.get(counts.architecture, _ActivationLayout())
    final_norm = ((8 + e) if lay.gemma_norm else (4 + 2 * e)) * t * h
    mlp_tokens = micro_batch_size * -(-local // mlp_tiles(local, h)) if tiled_mlp else t
    if tiled_mlp:
        one_layer += 4 * e * mlp_tokens * inter  # the tile being recomputed
    workspace = 2 * e * (mlp_tokens * inter + t * h)
    kept_inputs = min(layers, 3) if (checkpointing and offload_checkpoints) else layers
    stored = kept_inputs * e * t * h + one_layer if checkpointing else layers * one_layer
    return stored + final_norm + workspace


def offloaded_input_bytes(counts: ModelCounts, setup: Setup) -> int:
    """Bytes of one checkpointed layer's input offloaded to the host (0 when inputs are not offloaded)."""
    if not (setup.offload_checkpoints and setup.activation_checkpointing):
        return 0
    return PARAM_BYTES[setup.dtype] * setup.micro_batch_size * setup.local_seq_len * counts.hidden_size


def offloaded_checkpoint_bytes(counts: ModelCounts, setup: Setup, rounding: Optional[int] = None) -> int:
    """Host bytes per rank for checkpointed layer inputs waiting for backward (all but those kept on the device),
    each in its own pinned buffer (DeepSpeed's CheckpointHiddenStatesOffload pools them by shape)."""
    return max(0, counts.num_layers - 3) * pinned_bytes(offloaded_input_bytes(counts, setup), rounding)


def logits_bytes(counts: ModelCounts, micro_batch_size: int, seq_len: int, dtype: str = "bf16",
                 chunk_tokens: Optional[int] = None, sequence_parallel: int = 1) -> int:
    """The loss's share: with a 128k vocabulary this rivals all of a layer stack's activations.

    The full-logits loss (trainer.model.token_loss_sum) upcasts the e-byte logits to fp32 and runs
    cross-entropy, which keeps its fp32 log-softmax output; the logits themselves are freed once the loss is
    formed (the trainer keeps no model output), and backward holds the fp32 gradient in and out of
    log-softmax next to that output: 12·b·s·V bytes at any precision (measured exactly on CPU; forward's
    e + 4 + 4 is smaller). A loop that keeps the model output through backward, as the HF Trainer does with
    transformers' ForCausalLMLoss, holds the e-byte logits too. Gemma2's final soft-capping keeps one more
    e-byte copy inside the model.

    The chunked loss (chunk_tokens set; trainer/loss.py) holds one chunk's fp32 logits, turned into their
    gradient in place (plus its e-byte copy below fp32), the head's weight gradient accumulated in fp32
    (4·V·h, plus one chunk's e-byte product below fp32) and the hidden states' gradient (e·t·h), all
    computed in forward and kept until backward. Under sequence parallelism t = b·s/N.
    """
    e = PARAM_BYTES[dtype]
    t = micro_batch_size * (seq_len // sequence_parallel)
    v, h = counts.vocab_size, counts.hidden_size
    if chunk_tokens:
        narrow = e if e < 4 else 0
        return min(chunk_tokens, t) * v * (4 + narrow) + (4 + narrow) * v * h + e * t * h
    lay = ACTIVATION_LAYOUTS.get(counts.architecture, _ActivationLayout())
    per_token = (12 + (e if lay.logit_softcap else 0)) * v
    return t * per_token


def mapped_loss_bytes(counts: ModelCounts, setup: Setup, threshold: int) -> int:
    """The part of the loss's buffers (logits_bytes) made of tensors larger than `threshold` bytes each."""
    e, v, h = PARAM_BYTES[setup.dtype], counts.vocab_size, counts.hidden_size
    t = setup.micro_batch_size * setup.local_seq_len
    if not setup.chunked_loss:
        total = logits_bytes(counts, setup.micro_batch_size, setup.seq_len, setup.dtype, None, setup.sequence_parallel)
        return total if 4 * t * v > threshold else 0
    chunk = min(loss_chunk_tokens(v), t) * v
    narrow = e if e < 4 else 0
    parts = [(4 * chunk, 4 * chunk + narrow * chunk), (4 * v * h, (4 + narrow) * v * h), (e * t * h, e * t * h)]
    return sum(bytes_ for largest, bytes_ in parts if largest > threshold)


def _check(setup: Setup) -> None:
    problems = []
    if setup.stage not in (0, 1, 2, 3):
        problems.append(f"stage: must be 0, 1, 2 or 3, got {setup.stage!r}")
    for name in ("world_size", "gpus_per_node", "micro_batch_size", "seq_len", "sequence_parallel"):
        value = getattr(setup, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{name}: must be a positive integer, got {value!r}")
    if setup.dtype not in DTYPES:
        problems.append(f"dtype: must be one of {', '.join(DTYPES)}, got {setup.dtype!r}")
    if setup.attention not in ATTENTIONS:
        problems.append(f"attention: must be one of {', '.join(ATTENTIONS)}, got {setup.attention!r}")
    if setup.optimizer not in OPTIMIZERS:
        problems.append(f"optimizer: must be one of {', '.join(OPTIMIZERS)}, got {setup.optimizer!r}")
    if setup.offload_optimizer and setup.stage == 0:
        problems.append("offload_optimizer: needs ZeRO stage 1, 2 or 3, got stage 0")
    if setup.offload_params and setup.stage != 3:
        problems.append(f"offload_params: needs ZeRO stage 3, got stage {setup.stage}")
    sp = setup.sequence_parallel
    if isinstance(sp, int) and sp > 0 and isinstance(setup.world_size, int) and setup.world_size % sp:
        problems.append(f"sequence_parallel: {sp} must divide the world size {setup.world_size}")
    if isinstance(sp, int) and sp > 0 and isinstance(setup.seq_len, int) and setup.seq_len % sp:
        problems.append(f"seq_len: {setup.seq_len} must be a multiple of sequence_parallel {sp}")
    if problems:
        raise ConfigError(problems, title="cannot estimate memory")


def optimizer_bytes_per_param(setup: Setup) -> int:
    """K of the ZeRO paper: 12 with a master copy (mixed precision, or any ZeRO stage), 8 without."""
    return OPTIMIZER_BYTES["bf16"] if setup.stage >= 1 else OPTIMIZER_BYTES[setup.dtype]


def model_state_bytes(params: int, setup: Setup) -> dict[str, int]:
    """Params, gradients and optimizer states on one device, as in Table 1 of the ZeRO paper.

    Stage 1 shards the optimizer states over N ranks, stage 2 also the gradients, stage 3 also the
    parameters. Offloading the optimizer moves its states to the host; at stages 2 and 3 DeepSpeed
    then reduces gradients straight into the host's fp32 partition, while stage 1 still accumulates
    the full low-precision gradients on the device; with fp32 sums stage 2 keeps its fp32 partition on the device.
    """
    n, p = setup.world_size, PARAM_BYTES[setup.dtype]
    grads = p * params if setup.stage < 2 else p * params // n
    if _fp32_sums(setup) and setup.stage == 1:
        # BF16_Optimizer keeps a whole fp32 copy of the gradients besides the model's own bf16 ones
        # (fp32_groups_gradients_flat). stage_1_and_2 (fp16, or an offloaded optimizer) moves each gradient into the
        # parameter's fp32 grad_accum as backward produces it and frees the low-precision one
        # (_fill_param_grad_accum_attribute), then reduces into the compact fp32 partition at the boundary.
        grads = (p + 4) * params if _bf16_optimizer(setup) else 4 * params + 4 * params // n
    elif _fp32_sums(setup):  # stages 2-3 reduce into fp32 partitions
        grads = 4 * params // n
    # Offloaded, stage 3 keeps its sums (grad_partitions_flat_buffer) on the offload device, the host. Stage 2
    # reduces straight into the host's fp32 partition, except fp32 sums, which accumulate in the compact fp32
    # partition on the device (_build_compact_grad_partition_buffer: current_device_name()) until the boundary.
    if setup.offload_optimizer and (setup.stage == 3 or (setup.stage == 2 and not _fp32_sums(setup))):
        grads = 0
    params_dev = p * params // n if setup.stage == 3 else p * params
    optimizer = optimizer_bytes_per_param(setup) * params // (1 if setup.stage == 0 else n)
    return {"params": 0 if setup.offload_params else params_dev, "gradients": grads,
            "optimizer_states": 0 if setup.offload_optimizer else optimizer}


def _fp32_sums(setup: Setup) -> bool:
    return setup.fp32_accumulation and setup.dtype != "fp32" and setup.stage != 0


def _converted(communication: int) -> int:
    """Bytes per element of the copy DeepSpeed reduces fp32 sums through: none when it communicates in fp32."""
    return 0 if communication == 4 else communication


def _bf16_optimizer(setup: Setup) -> bool:
    """Whether DeepSpeed steps with BF16_Optimizer rather than ZeRO's stage_1_and_2: bf16 at stage 1 with fp32 sums
    and the optimizer on the device (engine.py _do_optimizer_sanity_check)."""
    return setup.stage == 1 and _fp32_sums(setup) and setup.dtype == "bf16" and not setup.offload_optimizer


def _fp32_grad_accum(setup: Setup) -> bool:
    """Whether stage_1_and_2 sums each parameter's gradient in its own fp32 grad_accum (use_grad_accum_attribute):
    stage 1 with fp32 sums, except under BF16_Optimizer."""
    return setup.stage == 1 and _fp32_sums(setup) and not _bf16_optimizer(setup)


def norm_elements(counts: ModelCounts, setup: Setup, tensor: Optional[int] = None) -> int:
    """Elements of a gradient of `tensor` elements (default: the largest) that ZeRO's optimizers copy to fp64
    (NORM_BYTES) for the gradient norm, one tensor at a time: the parameter's slice of the rank's partition at
    stages 1-2 (at most the tensor, at most the partition), its partition at stage 3, in 250M-element pieces when
    offloaded. Offloaded, this happens in backward as each gradient is reduced at the boundary
    (set_norm_for_param_grad_in_gpu); otherwise in the step, before its fp32 copy (get_grad_norm_direct).
    BF16_Optimizer and stage 0 make no such copy."""
    if setup.stage == 0 or _bf16_optimizer(setup):
        return 0
    n, tensor = setup.world_size, counts.largest_tensor if tensor is None else tensor
    if setup.stage == 3:
        partition = -(-tensor // n)
        return min(partition, STAGE3_NORM_SPLIT) if setup.offload_optimizer else partition
    return min(tensor, -(-counts.total // n))


def _tied_head_is_largest(counts: ModelCounts) -> bool:
    """Whether the largest gradient is a tied head's, which is whole only once backward reaches the embedding,
    after the activations are freed: autograd sums both uses before the parameter's hook runs."""
    return counts.tied_embeddings and counts.largest_tensor == counts.vocab_size * counts.hidden_size


def _largest_in_layers(counts: ModelCounts) -> int:
    """A bound on the largest tensor of a decoder layer: an MLP or expert projection, or the query projection."""
    h = counts.hidden_size
    expert = counts.moe.expert_intermediate if counts.moe is not None else 0
    return h * max(counts.intermediate_size, expert, counts.num_heads * counts.head_dim)


def stepped_elements(counts: ModelCounts, setup: Setup, zero: ZeroSettings = ZeroSettings()) -> int:
    """The most fp32 elements one optimizer step call updates on a rank: a parameter without ZeRO, the flat
    partition at stages 1-2, and at stage 3 one sub-group of it. stage3.py (0.19) steps sub-group by sub-group,
    each with its own flat fp32 gradient that is freed before the next (_prepare_sub_group, _optimizer_step,
    _release_sub_group in step()); a sub-group closes once its partitions reach sub_group_size elements
    (_create_fp16_sub_groups), so it holds at most that plus one parameter's partition."""
    if setup.stage == 0:
        return counts.largest_tensor
    partition = counts.total // setup.world_size
    if setup.stage == 3:
        return min(partition, zero.sub_group_size + -(-counts.largest_tensor // setup.world_size))
    return partition


def optimizer_temporaries(counts: ModelCounts, setup: Setup, zero: ZeroSettings = ZeroSettings()) -> int:
    """torch.optim.AdamW's update allocates sqrt(v) and its quotient: two fp32 tensors the size of the
    largest tensor it steps (stepped_elements). FusedAdam, DeepSpeedCPUAdam and torch's fused AdamW update in
    place. Measured on CPU (bench/memory.py)."""
    if setup.optimizer != "torch":
        return 0
    return 2 * 4 * stepped_elements(counts, setup, zero)


def _step_buffers(psi: int, setup: Setup, temporaries: int, stepped: int, communication: int) -> int:
    """Device bytes the optimizer step needs beyond the model states, after activations are freed (read
    from deepspeed/runtime/zero/stage_1_and_2.py and stage3.py, 0.19, and measured on CPU):
      stage 0: the gradients flattened for the all-reduce (buckets of at most 5e8 elements), freed before
        the step; with mixed precision also an fp32 gradient copy;
      stage 1: after backward the gradient partition is gathered (p·Ψ/N) while the full gradients still
        exist; then those are freed and the step holds the partition, its fp32 copy (mixed precision)
        and the optimizer's temporaries: whichever phase needs more beyond the full gradients counted.
        bf16 with fp32 sums runs BF16_Optimizer instead (engine.py _do_optimizer_sanity_check): after the last
        micro-batch the engine all-reduces the whole flat fp32 sums, not a partition, through a copy in the
        communication dtype (`communication` bytes: bf16 unless a zero.config sets communication_data_type, and
        no copy in fp32; engine.allreduce_bucket, buffered_allreduce_fallback), freed before the step, which then
        updates views of the sums in place: that copy or the temporaries, whichever is larger, at any N. Other
        stage-1 fp32 sums (fp16, or the optimizer offloaded) step on the compact fp32 partition `gradients`
        counts: only the temporaries;
      stages 2-3: the partition already is the gradient buffer; mixed precision adds its fp32 copy, at stage 3
        one sub-group's at a time (`stepped`: stepped_elements). At stage 2 fp32 sums need none: they are one
        compact fp32 partition buffer the step takes as it is (_build_compact_grad_partition_buffer,
        _get_preflattened_grad_partition); stage 3 flattens its fp32 sums into a copy all the same.
    Offloaded, the step and its buffers are on the host.
    """
    n, p, mixed = setup.world_size, PARAM_BYTES[setup.dtype], setup.dtype != "fp32"
    if setup.offload_optimizer:
        return 0
    if setup.stage == 0:
        return max((min(psi, DS_STAGE0_ALLREDUCE) * p if n > 1 else 0) + (4 * psi if mixed else 0), temporaries)
    fp32_copy = 4 * psi // n if mixed else 0
    if _bf16_optimizer(setup):
        return max(_converted(communication) * psi, temporaries)
    if _fp32_grad_accum(setup):
        return temporaries  # the step takes the compact fp32 partition, which `gradients` counts, as it is
    if setup.stage == 1:
        partition = p * psi // n
        return max(partition, partition + fp32_copy + temporaries - p * psi)
    if setup.stage == 2 and _fp32_sums(setup):
        return temporaries
    return (4 * stepped if mixed else 0) + temporaries


def _flat_partitions(psi: int, setup: Setup, zero: ZeroSettings) -> list[int]:
    """Elements of each flat piece a rank's optimizer partition is kept in: one at stages 1-2 (shardtune's small
    no-decay group aside), one per sub-group at stage 3, which DeepSpeed cuts at parameter boundaries once a
    sub-group reaches sub_group_size (so all but the last are about that size)."""
    share = -(-psi // setup.world_size)
    if setup.stage != 3:
        return [share]
    whole, rest = divmod(share, zero.sub_group_size)
    return [zero.sub_group_size] * whole + ([rest] if rest else [])


def _snapshot_bytes(psi: int, setup: Setup, zero: ZeroSettings, rounding: Optional[int]) -> int:
    """A background save's host copies on rank 0's node. The copies of device tensors are pinned, one per tensor:
    where the optimizer's states live on the device, its fp32 master and two moments are three per flat piece."""
    from launcher.planning.checkpoint_size import partition_bytes, snapshot_bytes_per_node  # it reads PARAM_BYTES

    total = snapshot_bytes_per_node(psi, setup.stage, setup.dtype, setup.world_size, setup.gpus_per_node)
    if setup.stage == 0 or setup.offload_optimizer or rounding is None:
        return total
    pinned = 3 * sum(pinned_bytes(4 * piece, rounding) for piece in _flat_partitions(psi, setup, zero))
    return total + min(setup.gpus_per_node, setup.world_size) * (pinned - partition_bytes(psi, setup.stage,
                                                                                          setup.world_size))


def _gradients_waiting(counts: ModelCounts, setup: Setup, unit: int) -> tuple[int, int]:
    """Bytes of gradient waiting for its reduction at the activation peak, and after the activations are freed.

    Stages 2-3 (and offloading) reduce each gradient as soon as backward produces it, so only the one waiting for its
    bucket is whole: `unit`, the largest (the lm_head's comes first, at the peak), or at stage 3 what is gathered
    as one (an MoE block; every decoder layer of a compiled model). Stages 0-1 keep all gradients whole, which
    `gradients` already counts. The chunked loss computes the head's weight gradient in its forward (`logits` counts
    it) and backward hands that tensor over as the one waiting, so where the head's is the largest it counts there.
    A tied head's gradient is whole only at the end of backward, after the activations: at the peak a layer's is
    the one waiting, and the head's comes after. On the grad_accum path each hook also converts the gradient to
    fp32; offloaded, the norm's fp64 copy is made beside it (norm_elements).
    """
    p, reduces, converted = PARAM_BYTES[setup.dtype], setup.stage >= 2 or setup.offload_optimizer, 0
    if _fp32_grad_accum(setup):
        converted = 4
    elif not reduces:
        return 0, 0
    tied_last = _tied_head_is_largest(counts) and unit == counts.largest_tensor
    held_by_loss = setup.chunked_loss and unit <= counts.vocab_size * counts.hidden_size and not tied_last
    at_peak = _largest_in_layers(counts) if tied_last else unit
    peak = (0 if held_by_loss else p * at_peak) + converted * at_peak
    tail = (p + converted) * counts.largest_tensor if tied_last and reduces else 0
    if setup.offload_optimizer:  # the norm copies a tensor's gradient: the largest, or a layer's at a tied peak
        peak += NORM_BYTES * norm_elements(counts, setup, _largest_in_layers(counts) if tied_last else None)
        tail += NORM_BYTES * norm_elements(counts, setup) if tied_last else 0
    return peak, tail


@dataclass(frozen=True)
class HostBuffer:
    """One buffer an offloading rank keeps on the host."""

    name: str
    nbytes: int
    pinned: bool
    """Page-locked by DeepSpeed on GPUs, where torch rounds its size (pinned_memory.pinned_bytes)."""
    offloads: str = "optimizer"
    """What it belongs to: "optimizer" or "params"."""
    freed_into_cache: bool = False
    """Freed before the run trains, but on GPUs torch's pinned-memory cache keeps it until the trainer releases it."""


def offload_buffers(counts: ModelCounts, setup: Setup, zero: ZeroSettings = ZeroSettings()) -> list[HostBuffer]:
    """The host buffers of one rank's offloaded optimizer and parameters, as DeepSpeed 0.19 allocates them.

    Optimizer: an fp32 copy of the partition, two moments and the fp32 gradient (16 bytes per parameter of the
    partition), plus a p-byte partition buffer: (16 + p)·Ψ/N. Stages 1-2 (stage_1_and_2.py) pin all but the
    moments: the fp32 master, the fp32 gradient, the buffer of updated weights on their way back, and a
    largest-tensor staging buffer. Stage 3 (stage3.py) pins the gradient partition (grad_partitions_flat_buffer),
    which holds the sums (fp32 when they are fp32), and each sub-group's fp32 gradient (subgroup_gradient_buffer);
    its fp32 master is a plain host tensor. Parameters (stage 3): a pinned flat p-byte partition. zero.Init pinned
    each parameter's partition before DeepSpeed copies them into it and frees them; torch caches those blocks
    until the trainer releases them after deepspeed.initialize, by when the optimizer's buffers exist too.
    """
    share, p = -(-counts.total // setup.world_size), PARAM_BYTES[setup.dtype]
    buffers = []
    if setup.offload_optimizer and setup.stage in (1, 2):
        buffers += [HostBuffer("fp32 master", 4 * share, True), HostBuffer("fp32 gradient", 4 * share, True),
                    HostBuffer("updated weights", p * share, True),
                    HostBuffer("gradient staging", p * counts.largest_tensor, True)]
    elif setup.offload_optimizer:
        sums = 4 if _fp32_sums(setup) else p
        buffers += [HostBuffer("fp32 master", 4 * share, False), HostBuffer("gradient partition", sums * share, True)]
        buffers += [HostBuffer(f"sub-group {i} fp32 gradient", 4 * piece, True)
                    for i, piece in enumerate(_flat_partitions(counts.total, setup, zero))]
    if setup.offload_optimizer:
        buffers.append(HostBuffer("Adam moments", 8 * share, False))
    if setup.offload_params:
        buffers += [HostBuffer("parameters", p * share, True, "params"),
                    HostBuffer("zero.Init's per-parameter partitions", p * share, True, "params",
                               freed_into_cache=True)]
    return buffers


def _offloaded_bytes(counts: ModelCounts, setup: Setup, zero: ZeroSettings, temporaries: int,
                     rounding: Optional[int]) -> dict[str, int]:
    """Host bytes per rank of the offloaded optimizer (with the torch optimizer's temporaries when it is the one
    stepping on the host) and parameters, each pinned buffer as torch allocates it. The freed per-parameter
    partitions are counted at their own size: each rounds on its own, and the plan does not know every shape."""
    total = {"optimizer": temporaries, "params": 0}
    for buffer in offload_buffers(counts, setup, zero):
        if buffer.freed_into_cache:
            total[buffer.offloads] += buffer.nbytes if rounding is not None else 0
        else:
            total[buffer.offloads] += pinned_bytes(buffer.nbytes, rounding) if buffer.pinned else buffer.nbytes
    return total


def estimate_memory(counts: ModelCounts, setup: Setup, zero: ZeroSettings = ZeroSettings(),
                    margins: Margins = Margins()) -> MemoryEstimate:
    """The full estimate for one configuration; the benchmark compares `device` with measurements."""
    _check(setup)
    psi, n, p = counts.total, setup.world_size, PARAM_BYTES[setup.dtype]
    largest = counts.largest_tensor
    dev = model_state_bytes(psi, setup)
    # With optimizer offload at stages 1-2, DeepSpeed keeps one largest-tensor buffer on the device for
    # gradients on their way to the host (temp_grad_buffer_for_gpu_offload), for the whole run.
    dev["offload_staging"] = largest * p if setup.offload_optimizer and setup.stage in (1, 2) else 0
    dev["activations"] = activation_bytes(counts, setup.micro_batch_size, setup.seq_len, setup.dtype,
                                          setup.activation_checkpointing, setup.attention, setup.sequence_parallel,
                                          setup.tiled_mlp, setup.offload_checkpoints)
    chunk = loss_chunk_tokens(counts.vocab_size) if setup.chunked_loss else None
    dev["logits"] = logits_bytes(counts, setup.micro_batch_size, setup.seq_len, setup.dtype, chunk,
                                 setup.sequence_parallel)
    unit = largest
    if setup.stage == 3:
        unit = max(counts.gather_unit, counts.per_layer) if setup.whole_layers else counts.gather_unit
    dev["gradient_in_flight"], tail = _gradients_waiting(counts, setup, unit)
    norm = NORM_BYTES * norm_elements(counts, setup)

    # Communication buffers live through backward. Stages 1-2 allocate reduce_bucket_size elements
    # (twice with overlap_comm); stage 3 one bucket. Stage 0 flattens gradients into ≤ 5e8-element
    # buckets after backward, so that buffer belongs to the optimizer-step phase below.
    overlap = zero.overlap_comm if zero.overlap_comm is not None else setup.stage == 3
    buffers = 2 if (overlap and setup.stage in (1, 2)) else 1
    # Summing in grad_accum, stage 1 stages its buckets in fp32 (_gradient_reduction_buffer_dtype) and reduces a copy
    # in the communication dtype, if that is not fp32 (gradient_reduction_w_predivide).
    dev["reduce_buckets"] = 0 if setup.stage == 0 else buffers * p * zero.reduce_bucket_size
    if _fp32_grad_accum(setup):
        copy = _converted(zero.communication_bytes(setup.dtype)) * min(psi, zero.reduce_bucket_size)
        dev["reduce_buckets"] = buffers * 4 * zero.reduce_bucket_size + copy

    # ZeRO-3 gathers each module's parameters before use, prefetches up to prefetch_bucket_size ahead
    # and keeps up to max_live_parameters gathered (parameters reused soon, i.e. the last layers,
    # are not released between forward and backward).
    live = 0
    if setup.stage == 3:
        live = min(psi, max(zero.max_live_parameters, unit + zero.prefetch_bucket_size)) * p
    dev["zero3_live_params"] = live

    temporaries = optimizer_temporaries(counts, setup, zero)
    dev["optimizer_step_buffers"] = _step_buffers(psi, setup, temporaries, stepped_elements(counts, setup, zero),
                                                  zero.communication_bytes(setup.dtype))
    # Without offload the norm's fp64 copies come in the step, one at a time, before its own buffers.
    dev["optimizer_step_buffers"] = max(dev["optimizer_step_buffers"], tail, 0 if setup.offload_optimizer else norm)

    forward_backward = sum(dev[key] for key in FORWARD_BACKWARD_KEYS)
    transient = max(forward_backward, dev["optimizer_step_buffers"])
    mapped = mapped_loss_bytes(counts, setup, margins.mapped_above) if margins.mapped_above else 0
    dev["fragmentation"] = int(margins.fragmentation * max(forward_backward - mapped, dev["optimizer_step_buffers"]))
    dev["cuda_runtime"] = int((margins.cuda_context_gb + (margins.nccl_gb if n > 1 else 0)) * GB)
    persistent = dev["params"] + dev["gradients"] + dev["optimizer_states"] + dev["offload_staging"]
    device_total = persistent + transient + dev["fragmentation"] + dev["cuda_runtime"]
    device = {key: int(dev[key]) for key in DEVICE_KEYS}

    rounding = run_rounding(margins.pinned_rounding, offloaded_input_bytes(counts, setup))
    host, host_total = _host_bytes(counts, setup, zero, temporaries, margins, rounding)
    notes = [counts.note] if counts.note else []
    if dev["optimizer_step_buffers"] > forward_backward:
        notes.append("the peak is in the optimizer step: its buffers exceed the forward/backward working set")
    # The rounding's share, for the note: a second pass only where something is pinned.
    rounded = 0 if rounding is None else host_total - _host_bytes(counts, setup, zero, temporaries, margins, None)[1]
    if rounded >= GB:
        newer = "; torch >= 2.13 pins those above 1 GiB exactly" if rounding == ROUNDS_EVERYTHING else ""
        notes.append(f"{rounded / GB:.1f} GB of host RAM per node is torch rounding pinned buffers up to a power of "
                     f"two{newer}")
    return MemoryEstimate(setup, device, host, device_total, host_total, notes)


def _host_bytes(counts: ModelCounts, setup: Setup, zero: ZeroSettings, temporaries: int, margins: Margins,
                rounding: Optional[int]) -> tuple[dict[str, int], int]:
    """Host RAM per node by component, and its peak; `rounding` as in Margins.pinned_rounding."""
    psi, p, ranks = counts.total, PARAM_BYTES[setup.dtype], min(setup.gpus_per_node, setup.world_size)
    offloaded = _offloaded_bytes(counts, setup, zero, temporaries, rounding)
    host = {
        "offloaded_optimizer": ranks * offloaded["optimizer"] if setup.offload_optimizer else 0,
        "offloaded_params": ranks * offloaded["params"],
        "offloaded_checkpoints": ranks * offloaded_checkpoint_bytes(counts, setup, rounding),
        # Stages 0-2: every rank materialises the whole model on the host before moving it to its
        # device. Stage 3 (zero.Init): ranks share one mmap'd copy of the checkpoint in the page cache.
        "checkpoint_loading": p * psi * (1 if setup.stage == 3 else ranks),
        "async_save_snapshots": _snapshot_bytes(psi, setup, zero, rounding) if setup.async_save else 0,
        "process_runtime": int(ranks * margins.host_per_rank_gb * GB),
    }
    # The loaded copies are freed before the optimizer's host buffers are allocated (and before the first
    # save's copies); offloaded parameters, placed during zero.Init, coexist with the loading. A resumed rank
    # maps its checkpoint's files (page cache, reclaimable) and copies out only the moments it keeps, which
    # the offloaded optimizer counts already (trainer/mapped_loads.py): no peak of its own. On another world
    # size at stages 1-2 it fills the moments in place too, one parameter at a time (universal_states_in_place).
    after_loading = host["offloaded_optimizer"] + host["offloaded_checkpoints"] + host["async_save_snapshots"]
    return host, host["process_runtime"] + host["offloaded_params"] + max(host["checkpoint_loading"], after_loading)
