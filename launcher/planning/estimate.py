"""`shardtune estimate`: will it fit, per ZeRO stage and offload choice, before the job waits in a queue.

Runs on a login node: stdlib only (no torch, deepspeed or transformers), answers in well under a second.
"""
from __future__ import annotations

import json as _json
import re
import sys
from typing import Any, Optional

from launcher.contract.errors import ConfigError
from launcher.planning.checkpoint_size import checkpoint_bytes
from launcher.planning.devices import DEFAULT_GPUS_PER_NODE
from launcher.planning.fastest_fit import (
    VARIANTS,
    DoesNotFit,
    LongContext,
    choose_configuration,
    component_table,
    longest_seq_len,
    short_label,
)
from launcher.planning.memory import DTYPES, Margins, MemoryEstimate, Setup, ZeroSettings, estimate_memory
from launcher.planning.model_size import (
    ModelCounts,
    approximate_moe_reason,
    counts_from_config,
    counts_from_params,
    load_config_json,
)
from launcher.planning.sequence_parallel import group_sizes, split_problems

_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def variant_key(setup: Setup) -> str:
    """JSON key of an offload variant, e.g. "3_optimizer_params"."""
    return f"{setup.stage}_{setup.offload.replace('+', '_')}"


def estimate_all(counts: ModelCounts, world_size: int, gpus_per_node: int, seq_len: int = 2048,
                 micro_batch_size: int = 1, dtype: str = "bf16", activation_checkpointing: bool = False,
                 attention: str = "auto", zero: ZeroSettings = ZeroSettings(),
                 margins: Margins = Margins(), long_context: LongContext = LongContext()) -> list[MemoryEstimate]:
    """One estimate per stage/offload variant, in autochoice's order of preference."""
    return [estimate_memory(counts, Setup(stage=s, world_size=world_size, gpus_per_node=gpus_per_node,
                                          micro_batch_size=micro_batch_size, seq_len=seq_len, dtype=dtype,
                                          offload_optimizer=opt, offload_params=par,
                                          activation_checkpointing=activation_checkpointing, attention=attention,
                                          **long_context.setup_fields(activation_checkpointing)),
                            zero, margins)
            for s, opt, par in VARIANTS]


def _parse_params(value: Any, problems: list[str]) -> Optional[float]:
    """7.5e9, 7500000000 or "7.5B" / "135M": people write sizes the way model cards do."""
    if isinstance(value, bool):
        problems.append(f"--params: expected a parameter count such as 7.5e9 or 7.5B, got {value!r}")
        return None
    if isinstance(value, (int, float)):
        return float(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbgt]?)\s*", str(value), re.IGNORECASE)
    if not m:
        problems.append(f"--params: expected a parameter count such as 7.5e9 or 7.5B, got {value!r}")
        return None
    return float(m.group(1)) * _SUFFIX[m.group(2).lower()]


def _positive_int(name: str, value: Any, problems: list[str]) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        problems.append(f"--{name}: must be a positive integer, got {value!r}")
        return None
    return int(value)


def resolve_world(gpus: Optional[int], nodes: int, gpus_per_node: Optional[int],
                  problems: list[str]) -> tuple[int, int]:
    """World size and devices per node from whichever of --gpus / --nodes / --gpus_per_node were given."""
    if gpus is None:
        if gpus_per_node is None:
            problems.append("--gpus: give the total number of devices (--gpus=G) or --gpus_per_node (with --nodes)")
            return 1, 1
        return nodes * gpus_per_node, gpus_per_node
    if gpus_per_node is None:
        if nodes > 1:
            if gpus % nodes:
                problems.append(f"--gpus: {gpus} devices do not split evenly over --nodes={nodes}")
                return gpus, gpus
            return gpus, gpus // nodes
        return gpus, min(gpus, DEFAULT_GPUS_PER_NODE)
    if gpus % gpus_per_node or (nodes > 1 and nodes * gpus_per_node != gpus):
        problems.append(f"--gpus: {gpus} does not equal --nodes × --gpus_per_node = {nodes} × {gpus_per_node}")
    return gpus, gpus_per_node


def _validate(model, params, gpus, nodes, gpus_per_node, gpu_memory_gb, seq_len, micro_batch_size,
              dtype, sequence_parallel=1) -> tuple[ModelCounts, int, int, dict]:
    problems: list[str] = []
    if (model is None) == (params is None):
        problems.append("--model / --params: give exactly one: --model=DIR (or a config.json) or --params=N")
    n = _parse_params(params, problems) if params is not None else None
    gpus = _positive_int("gpus", gpus, problems)
    nodes_i = _positive_int("nodes", nodes, problems) or 1
    per_node = _positive_int("gpus_per_node", gpus_per_node, problems)
    for name, value in (("seq_len", seq_len), ("micro_batch_size", micro_batch_size)):
        _positive_int(name, value, problems)
    sp = _positive_int("sequence_parallel", sequence_parallel, problems)
    if isinstance(gpu_memory_gb, bool) or not isinstance(gpu_memory_gb, (int, float)) or not gpu_memory_gb > 0:
        problems.append(f"--gpu_memory_gb: must be a positive number of GB (1e9 bytes), got {gpu_memory_gb!r}")
    if dtype not in DTYPES:
        problems.append(f"--dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    world, per_node = resolve_world(gpus, nodes_i, per_node, problems)
    if sp and world % sp:
        problems.append(f"--sequence_parallel: {sp} does not divide the {world} devices")
    if sp and isinstance(seq_len, int) and seq_len % sp:
        problems.append(f"--seq_len: {seq_len} is not a multiple of --sequence_parallel {sp}")
    counts, model_config = None, {}
    try:
        if model is not None and params is None:
            model_config, source = load_config_json(str(model))
            counts = counts_from_config(model_config, source)
        elif n is not None and model is None:
            counts = counts_from_params(n)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if counts is not None and sp:
        problems += [p.replace("train.sequence_parallel", "--sequence_parallel") for p in split_problems(sp, counts)]
    if problems:
        raise ConfigError(problems, title="invalid arguments")
    return counts, world, per_node, model_config


def _describe(counts: ModelCounts, source: str) -> str:
    kind = "exact" if counts.exact else "approximate"
    active = f"{counts.active / 1e9:.2f}B active per token, " if counts.moe is not None else ""
    head = (f"{source}: {counts.total:,} parameters ({counts.total / 1e9:.2f}B, {kind}; {active}"
            f"embedding {counts.embedding / 1e6:.1f}M, per layer {counts.per_layer / 1e6:.1f}M, "
            f"largest tensor {counts.largest_tensor / 1e6:.1f}M)")
    shape = (f"  {counts.architecture}: {counts.num_layers} layers, hidden {counts.hidden_size}, "
             f"{counts.num_heads} heads / {counts.num_kv_heads} kv × {counts.head_dim}, "
             f"MLP {counts.intermediate_size}, "
             f"vocab {counts.vocab_size}, {'tied' if counts.tied_embeddings else 'untied'} embeddings")
    return head + "\n" + shape + (f"\n  note: {counts.note}" if counts.note else "")


def estimate_command(model: str | None = None, params: float | None = None, gpus: int | None = None,
                     nodes: int = 1, gpus_per_node: int | None = None, gpu_memory_gb: float = 80.0,
                     seq_len: int = 2048, micro_batch_size: int = 1, dtype: str = "bf16",
                     activation_checkpointing: bool = False, sequence_parallel: int = 1, chunked_loss: bool = True,
                     tiled_mlp: bool = False, offload_checkpoints: bool = False, max_seq_len: bool = False,
                     json: bool = False, force_approximate_fit: bool = False) -> int:
    """Print per-device memory for every ZeRO stage and offload choice; returns the exit code.

    --gpus alone assumes nodes of 8 devices (host RAM is per node); --nodes and --gpus_per_node say otherwise.
    --sequence_parallel N splits every sequence over N devices; --chunked_loss=False prices the full logits;
    --max_seq_len adds the longest seq_len that fits each variant (with the other settings as given).
    A mixture-of-experts model that could only be sized approximately gets no fit verdict against
    --gpu_memory_gb (the numbers are still shown) unless --force_approximate_fit.
    """
    try:
        counts, world, per_node, model_config = _validate(model, params, gpus, nodes, gpus_per_node, gpu_memory_gb,
                                            seq_len, micro_batch_size, dtype, sequence_parallel)
    except ConfigError as exc:
        print(f"shardtune estimate: {exc}", file=sys.stderr)
        return 2
    seq_len, micro, ckpt = int(seq_len), int(micro_batch_size), bool(activation_checkpointing)
    lc = LongContext(sequence_parallel=int(sequence_parallel), chunked_loss=bool(chunked_loss),
                     tiled_mlp=bool(tiled_mlp), offload_checkpoints=bool(offload_checkpoints),
                     allowed_sequence_parallel=tuple(group_sizes(world, seq_len, counts, model_config)))
    estimates = estimate_all(counts, world, per_node, seq_len, micro, dtype, ckpt, long_context=lc)
    unchecked = None if force_approximate_fit else approximate_moe_reason(counts)
    longest = ({variant_key(e.setup): longest_seq_len(counts, e.setup, float(gpu_memory_gb)) for e in estimates}
               if max_seq_len and unchecked is None else None)
    best, advice = None, []
    if unchecked is None:
        try:
            choice = choose_configuration(counts, world, float(gpu_memory_gb), seq_len, None, dtype,
                                          micro_batch_size=micro, activation_checkpointing=ckpt,
                                          gpus_per_node=per_node, long_context=lc)
            best, advice = choice.setup, choice.reasons
        except DoesNotFit as exc:
            best, advice = None, exc.suggestions
    refusal = (f"fit against {gpu_memory_gb:g} GB not checked: {unchecked}; --force_approximate_fit compares "
               f"anyway" if unchecked else None)
    if json:
        out = to_json(counts, estimates, gpu_memory_gb, world, per_node, best, advice,
                      source=str(model) if model is not None else "--params", refusal=refusal)
        if longest is not None:
            out["longest_seq_len"] = longest
        print(_json.dumps(out, indent=2))
        return 0
    print(_describe(counts, str(model) if model is not None else f"--params={params}"))
    sp = f", sequence parallel {lc.sequence_parallel}" if lc.sequence_parallel > 1 else ""
    print(f"  {world} devices = {-(-world // per_node)} node(s) × {per_node}, {gpu_memory_gb:g} GB each; "
          f"seq_len {seq_len}, micro batch {micro}, {dtype}, activation checkpointing {'on' if ckpt else 'off'}{sp}, "
          f"loss {'chunked' if lc.chunked_loss else 'on full logits'}{', tiled MLP' if lc.tiled_mlp else ''}")
    print(component_table(estimates, None if refusal else float(gpu_memory_gb)))
    sizes = ", ".join(f"ZeRO-{stage} {checkpoint_bytes(counts.total, stage, dtype) / 1e9:,.1f} GB"
                      for stage in range(4))
    print(f"  one checkpoint on disk (all ranks): {sizes}")
    if longest is not None:
        print(f"longest seq_len that fits {gpu_memory_gb:g} GB (the other settings as above):")
        for e in estimates:
            value = longest[variant_key(e.setup)]
            print(f"  {short_label(e.setup):<10} {'nothing fits' if value is None else f'{value:,}'}")
    if refusal:
        print(refusal)
    elif best is None:
        print("nothing fits; what would:\n" + "\n".join(f"  - {s}" for s in advice))
    else:
        print(f"fastest that fits: {best.label()}\n" + "\n".join(f"  - {r}" for r in advice))
    return 0


def to_json(counts: ModelCounts, estimates: list[MemoryEstimate], gpu_memory_gb: float, world: int,
            per_node: int, best: Optional[Setup], advice: list[str], source: str,
            refusal: Optional[str] = None) -> dict[str, Any]:
    """`stages` holds the no-offload figures per stage; `offload` the variants keyed like "3_optimizer".

    `params` is the total (what memory is made of); `params_active` what one token touches and
    `params_active_matmul` the same without the input embedding (what FLOPs count), equal to `params` for
    dense models. With `refusal` (an MoE sized only approximately) `fits` is null and nothing is recommended.
    """
    def entry(e: MemoryEstimate) -> dict[str, Any]:
        size = checkpoint_bytes(counts.total, e.setup.stage, e.setup.dtype) / 1e9
        return {**e.to_dict(), "fits": None if refusal else e.fits(gpu_memory_gb), "checkpoint_gb": round(size, 3)}
    moe = counts.moe
    return {
        "params": counts.total,
        "params_exact": counts.exact,
        "params_active": counts.active,
        "params_active_matmul": moe.active_matmul if moe is not None else counts.total - (
            0 if counts.tied_embeddings else counts.vocab_size * counts.hidden_size),
        "fit_not_checked": refusal,
        "model": {**counts.to_dict(), "source": source},
        "world_size": world, "nodes": -(-world // per_node), "gpus_per_node": per_node,
        "gpu_memory_gb": gpu_memory_gb, "gb": "1e9 bytes",
        "stages": {str(e.setup.stage): entry(e) for e in estimates if e.setup.offload == "none"},
        "checkpoint_gb": {str(stage): round(checkpoint_bytes(counts.total, stage, estimates[0].setup.dtype) / 1e9, 3)
                          for stage in range(4)},
        "offload": {variant_key(e.setup): entry(e) for e in estimates if e.setup.offload != "none"},
        "recommended": None if best is None else {"stage": best.stage, "offload_optimizer": best.offload_optimizer,
                                                  "offload_params": best.offload_params, "label": best.label()},
        "reasons": advice if best is not None else [],
        "what_would_fit": advice if best is None else [],
    }
