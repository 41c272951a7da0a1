"""Sequence parallelism: how sequences split over groups of ranks, and which group sizes a model allows.

Ulysses sequence parallelism (DeepSpeed's Arctic Long Sequence Training) runs every sequence on a group
of N consecutive ranks, each holding a contiguous 1/N of its tokens. Everything but attention is per
token, so it runs on the slice; attention exchanges q, k and v with one all-to-all so that each rank
sees the whole sequence for 1/N of the query heads, and a second all-to-all brings the output back.
So N must divide the query heads, and the key/value heads must split N ways or be replicated: with
fewer kv heads than N (GQA/MQA), every kv head is copied to the N / kv ranks whose query heads use it.

The ranks of a group train the same rows, so the number of model replicas that see different data,
the data-parallel degree, is world / N, and `global batch = micro × accumulation × world / N`.
ZeRO still shards over all ranks: model states per device do not change, activations shrink N-fold.
"""
from __future__ import annotations

from typing import Optional

from launcher.contract.config import RunConfig
from launcher.planning.memory import SINK_ATTENTION_MODELS
from launcher.planning.model_size import ModelCounts, attention_window, outgrown_window


def sequence_parallel_size(cfg: RunConfig) -> int:
    """train.sequence_parallel once resolved (1 while it is still `auto`)."""
    sp = cfg.train.sequence_parallel
    return sp if isinstance(sp, int) else 1


def data_parallel_size(cfg: RunConfig) -> int:
    """Model replicas that see different rows: world / sequence_parallel."""
    return cfg.launch.world_size // sequence_parallel_size(cfg)


def kv_heads_per_rank(sequence_parallel: int, num_kv_heads: int) -> int:
    """Key/value heads each rank attends with after the all-to-all (replicated when there are fewer than N)."""
    return max(1, num_kv_heads // sequence_parallel)


SEQUENCE_PARALLEL_MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss")
"""Mixture-of-experts families trained under sequence parallelism: routers that see one token at a time, the
router aux loss summed over every rank's slice, and attention DeepSpeed's Ulysses splits by heads: standard, or
gpt-oss's sinks on trainer/sink_attention.py, each rank taking its heads' sinks (tests/test_moe_e2e.py and
tests/test_sink_attention.py: SP=2 equals SP=1)."""


def split_problems(sequence_parallel: int, counts: ModelCounts) -> list[str]:
    """Why the model cannot split its sequences over `sequence_parallel` ranks (empty when it can): its attention
    heads, and mixture-of-experts families not verified under it."""
    sp, heads, kv = sequence_parallel, counts.num_heads, counts.num_kv_heads
    if sp == 1:
        return []
    problems = []
    if counts.moe is not None and counts.architecture not in SEQUENCE_PARALLEL_MOE:
        problems.append(f"train.sequence_parallel: {sp} is verified for the mixture-of-experts families "
                        f"{', '.join(SEQUENCE_PARALLEL_MOE)} only, not model_type {counts.architecture!r} (their "
                        "attention is split as the dense models' is; DeepSeek's latent attention is not verified "
                        "under it); allowed: 1")
    if heads % sp:
        problems.append(f"train.sequence_parallel: {sp} does not divide the model's {heads} attention heads (each "
                        f"rank of a group attends with heads / N of them); allowed: "
                        f"{', '.join(str(d) for d in range(1, heads + 1) if heads % d == 0)}")
    if kv % sp and sp % kv:
        problems.append(f"train.sequence_parallel: {sp} and the model's {kv} key/value heads divide neither way: "
                        f"kv heads are split N ways when N divides them, or each is replicated to N / kv ranks "
                        f"when kv divides N")
    return problems


def candidates(cfg: RunConfig, counts: Optional[ModelCounts], model_config: Optional[dict] = None) -> list[int]:
    """Group sizes `train.sequence_parallel: auto` may choose, smallest first (group_sizes of the run)."""
    return group_sizes(cfg.launch.world_size, cfg.data.seq_len, counts, model_config)


def group_sizes(world: int, seq_len: int, counts: Optional[ModelCounts],
                model_config: Optional[dict] = None) -> list[int]:
    """Sequence-parallel group sizes, smallest first: divisors of the world size that also divide the sequence
    length, split the model's heads and keep its sliding window (checked when its config.json is known)."""
    return [n for n in range(1, world + 1)
            if world % n == 0 and seq_len % n == 0 and not (counts and split_problems(n, counts))
            and not (model_config and sliding_window_problem(n, model_config, seq_len))]


def describe(cfg: RunConfig, counts: Optional[ModelCounts]) -> str:
    """One plan line: how each sequence is split and what every rank of a group attends with."""
    sp, seq = sequence_parallel_size(cfg), cfg.data.seq_len
    if sp == 1:
        return "not split (train.sequence_parallel 1: every rank holds its whole sequences)"
    text = (f"split over {sp} ranks ({seq // sp:,} of its {seq:,} tokens each), data-parallel "
            f"{data_parallel_size(cfg)} = world {cfg.launch.world_size} / {sp}")
    if counts is not None:
        kv = counts.num_kv_heads
        copies = f", each replicated to {sp // kv} ranks" if kv < sp else ""
        text += (f"; attention: {counts.num_heads // sp} of {counts.num_heads} query heads and "
                 f"{kv_heads_per_rank(sp, kv)} of {kv} kv heads per rank{copies}")
    if sp > cfg.launch.procs_per_node:
        text += (f"; note: groups span nodes ({cfg.launch.procs_per_node} processes per node), so every layer's "
                 "all-to-all crosses the network")
    return text


def sliding_window_problem(sequence_parallel: int, model_config: dict, seq_len: int) -> Optional[str]:
    """Why the model's sliding-window attention cannot run under sequence parallelism (None when it can).

    The window is enforced by the attention mask, which sequence parallelism cannot pass to the kernel: every
    token would attend its whole sample instead. Harmless only when no sample is longer than the window. The sink
    kernel (gpt-oss, trainer/sink_attention.py) takes no mask: it applies each layer's window itself.
    """
    window = outgrown_window(attention_window(model_config), seq_len)
    if sequence_parallel == 1 or window is None or model_config.get("model_type") in SINK_ATTENTION_MODELS:
        return None
    return (f"train.sequence_parallel: {sequence_parallel} cannot run this model's sliding-window attention "
            f"(window {window} < data.seq_len {seq_len}): under sequence parallelism the attention gets no mask, "
            f"so tokens would see past the window; use data.seq_len <= {window} or train.sequence_parallel: 1")
