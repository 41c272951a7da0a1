"""Ulysses sequence parallelism on one rank: its group, the attention that keeps packed samples apart, the
slice of every batch it computes, and how its loss is scaled.

A group of N consecutive ranks trains the same rows; each rank takes a contiguous 1/N of every row's
positions (ids, position ids and already-shifted targets alike). DeepSpeed's `UlyssesSPAttentionHF`
exchanges q, k and v around the attention kernel, so the kernel sees whole sequences for heads/N heads,
with the position ids gathered from the group; everything else runs on the slice.

Packed samples: DeepSpeed drops the attention mask (it was built for one slice), and stock sdpa then
attends across the samples of a packed row. So under SP the model's attention is `packed_causal_attention`,
registered under its own name for DeepSpeed to wrap: it finds the samples from the gathered position ids
(a new sample starts wherever the position does not go up by one; padding restarts too) and runs one
causal sdpa call per sample: exact, and no L×L mask. flash-attention reads the samples from the position
ids itself, but only for one row per call (config validation refuses it with more).

Only attention dispatched through transformers' attention functions is split; require_split_attention stops a
model whose layers compute their own at its first forward.

Loss scaling: every rank backpropagates its slice's loss sum; the all-to-all carries each rank's part of
the gradient to the others, so the true gradient is the sum over a group and the mean over replicas.
DeepSpeed's ZeRO 0-2 reduce over all ranks and divide by world / N (so `loss × replicas / targets` gives
the global token mean), but ZeRO-3's reduce-scatter divides by the whole world (so `loss × world /
targets`). tests/test_sequence_parallel.py fails if DeepSpeed ever makes them agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional

import torch

from launcher.contract.config import RunConfig
from launcher.contract.errors import UserError
from launcher.planning.memory import SINK_ATTENTION_MODELS
from launcher.planning.model_size import counts_from_config
from launcher.planning.sequence_parallel import sliding_window_problem, split_problems
from trainer.data.collate import IGNORE, Batch
from trainer.distributed import Dist
from trainer.separation import PACKED_ATTENTION, SINK_ATTENTION, register_packed_attention
from trainer.sink_attention import register_sink_attention


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's place in its sequence-parallel group (size 1: no sequence parallelism)."""

    size: int = 1
    rank: int = 0
    """Position within the group: which slice of every row this rank computes."""
    mpu: Any = None
    """DeepSpeed's parallel-state module for deepspeed.initialize(mpu=...)."""
    attention: Optional[str] = None
    """The attn_implementation the model loads with under SP (None: the usual choice)."""
    attention_calls: Optional[list[int]] = None
    """How many times the model has called `attention` through transformers' attention functions (count_calls)."""

    def replica(self, dist: Dist) -> int:
        """Which data-parallel replica this rank belongs to (DeepSpeed's groups are consecutive ranks)."""
        return dist.rank // self.size

    def replicas(self, dist: Dist) -> int:
        return dist.world // self.size

    @property
    def multiple_of(self) -> int:
        """Rows are padded to a multiple of this, so they split into equal slices."""
        return math.lcm(8, self.size)

    def gradient_factor(self, zero_stage: int, world: int) -> int:
        """What each rank's loss sum is multiplied by (before dividing by the global target count) so that DeepSpeed's
        reduction yields the gradient of the global token mean (see the module docstring)."""
        return world if (self.size == 1 or zero_stage == 3) else world // self.size

    def shard(self, batch: Batch) -> Batch:
        """This rank's contiguous slice of every row; the position ids carry the sample boundaries, so no mask."""
        if self.size == 1:
            return batch
        width = batch.input_ids.shape[1] // self.size
        cut = slice(self.rank * width, (self.rank + 1) * width)
        mask = None if batch.token_mask is None else batch.token_mask[:, cut]  # the tokens MoE routers balance
        return Batch(batch.input_ids[:, cut], batch.position_ids[:, cut], batch.targets[:, cut], None,
                     batch.real_tokens, token_mask=mask)

    def fill_rows(self, batch: Batch, rows: int) -> Batch:
        """Pad a short batch (the eval set's last) to `rows` rows that carry no loss: under SP every forward must have
        exactly train.micro_batch_size rows (DeepSpeed's attention is built for that shape)."""
        missing = rows - batch.input_ids.shape[0]
        if self.size == 1 or missing <= 0:
            return batch
        repeat = lambda t: torch.cat([t, t[:1].expand(missing, -1)])  # noqa: E731
        targets = torch.cat([batch.targets, torch.full_like(batch.targets[:1], IGNORE).expand(missing, -1)])
        return Batch(repeat(batch.input_ids), repeat(batch.position_ids), targets, None, batch.real_tokens)


def attention_for(cfg: RunConfig, flash_usable: bool, model_type: Optional[str] = None) -> str:
    """The attention kernel under SP: the sink kernel for gpt-oss (trainer/sink_attention.py; it takes its rank's
    heads' sinks and applies the windows itself); flash-attention where it can run and keep samples apart (one row
    per micro-batch, or no packing); else packed_causal_attention. Config validation has refused the rest."""
    chosen = cfg.model.attn_implementation
    if chosen == "auto" and model_type in SINK_ATTENTION_MODELS:
        return SINK_ATTENTION
    one_row = cfg.train.micro_batch_size == 1 or not cfg.data.packing
    if chosen == "flash_attention_2" or (chosen == "auto" and flash_usable and one_row):
        return "flash_attention_2"
    return PACKED_ATTENTION


def record_checkpoints_without_tensor_parallelism() -> None:
    """Make DeepSpeed describe our checkpoints as what they are: no tensor parallelism.

    DeepSpeed's SP parallel-state module aliases "model parallel" to the SP group, so every checkpoint it
    saves claims tp_degree = N, and its universal conversion (a resume on another world size) then refuses
    the checkpoint for having one model-state file instead of N. The files are laid out exactly as without
    SP (ZeRO partitions over all ranks; rank 0 writes the one model-state file), so tp_degree 1 is the truth.
    """
    import deepspeed.runtime.engine as engine
    from deepspeed.checkpoint.constants import CHECKPOINT_PARALLEL_DIMS, CHECKPOINT_TP_DEGREE

    describe = getattr(engine, "_checkpoint_parallel_metadata", None)
    if describe is None or getattr(describe, "shardtune_sp", False):
        return  # a DeepSpeed without it writes no such metadata; or already done in this process

    def without_tensor_parallelism(mpu):
        metadata = describe(mpu)
        if hasattr(mpu, "initialize_sequence_parallel"):  # how DeepSpeed itself tells an SP mpu apart
            metadata[CHECKPOINT_PARALLEL_DIMS][CHECKPOINT_TP_DEGREE] = 1
        return metadata

    without_tensor_parallelism.shardtune_sp = True
    engine._checkpoint_parallel_metadata = without_tensor_parallelism


def setup(cfg: RunConfig, dist: Dist, flash_usable: bool) -> SequenceParallel:
    """Create the groups and register the attention, before the model is loaded; size 1 does nothing.

    DeepSpeed's registration creates process groups, so every rank calls this, once per process.
    """
    size = cfg.train.sequence_parallel
    if size == 1:
        return SequenceParallel()
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.model.name_or_path, revision=cfg.model.revision,
                                        trust_remote_code=cfg.model.trust_remote_code)
    text = config.get_text_config().to_dict()
    problems = split_problems(size, counts_from_config(text, source=f"{cfg.model.name_or_path} config"))
    problems += [p for p in [sliding_window_problem(size, text, cfg.data.seq_len)] if p]
    if problems:
        raise UserError("\n".join(problems))
    attention = attention_for(cfg, flash_usable, text.get("model_type"))
    if attention == PACKED_ATTENTION:
        register_packed_attention()
    elif attention == SINK_ATTENTION:
        register_sink_attention()
    # DeepSpeed sizes its exchange from `head_dim` when the config has the attribute, even when it is None (Mixtral's
    # default); the model itself then uses hidden / heads, so DeepSpeed is handed that.
    arch = config.get_text_config()
    if getattr(arch, "head_dim", 0) is None:
        arch.head_dim = arch.hidden_size // arch.num_attention_heads
    # A config-holding object instead of a path: DeepSpeed would re-read the config without revision/remote code.
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=SimpleNamespace(config=config), core_attn_implementation=attention,
        sequence_parallel_size=size, micro_batch_size=cfg.train.micro_batch_size, seq_length_is_variable=True)
    record_checkpoints_without_tensor_parallelism()
    return SequenceParallel(size=size, rank=mpu.get_sequence_parallel_rank(), mpu=mpu, attention=attention,
                            attention_calls=count_calls(attention))


def count_calls(attention: str) -> list[int]:
    """Count the calls transformers dispatches to `attention` (DeepSpeed's Ulysses wrapper by now); [calls]."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    inner, calls = ALL_ATTENTION_FUNCTIONS[attention], [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    ALL_ATTENTION_FUNCTIONS[attention] = counted
    return calls


def require_split_attention(model, sp: SequenceParallel) -> None:
    """Stop at the first forward unless every decoder layer's attention went through the Ulysses wrapper.

    DeepSpeed splits attention by replacing the function transformers dispatches to by name. A layer that
    computes attention itself (remote code often does; so do recurrent layers) sees only its rank's slice of the
    sequence: nothing fails, and every slice trains blind to the tokens before it. The first forward runs no
    recomputation, so a model whose every layer goes through the wrapper calls it once per layer. Every rank
    runs the same model and raises alike.
    """
    layers = model.config.get_text_config().num_hidden_layers
    calls = sp.attention_calls
    calls[0] = 0

    def check(module, args, kwargs, output):
        handle.remove()
        if calls[0] != layers:
            raise UserError(
                f"train.sequence_parallel: {sp.size}, but {type(model).__name__} sent {calls[0]} attention calls "
                f"through transformers' attention functions in one forward of its {layers} layers: DeepSpeed's "
                "Ulysses attention splits only those, and any other layer would see only this rank's slice of each "
                "sequence. Set train.sequence_parallel: 1")
        return None

    handle = model.register_forward_hook(check, with_kwargs=True)
