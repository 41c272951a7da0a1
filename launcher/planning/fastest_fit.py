"""Pick ZeRO stage, offload, micro batch and activation checkpointing for `auto` settings, and say why.

Order of preference, fastest first: less communication and no offload (ZeRO-0 < 1 < 2 < 3, then
offloading the optimizer at stage 1 < 2 < 3, then also the parameters), then activation checkpointing
off (recomputing the forward costs about a third more compute), then the largest micro batch that
fits and divides each rank's share of the global batch, with gradient accumulation making up the rest.
The first candidate in that order that fits wins, so a bigger device can only move the choice
earlier: towards less sharding, no checkpointing and bigger micro batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

from launcher.contract.config import batch_split_problems, replicas_words
from launcher.contract.errors import ConfigError
from launcher.planning.devices import DEFAULT_GPUS_PER_NODE, accumulates_in_fp32
from launcher.planning.memory import (
    DEVICE_KEYS,
    GB,
    HOST_KEYS,
    MEASURED_OVER_ESTIMATE,
    TIGHT_WHY,
    Margins,
    MemoryEstimate,
    Setup,
    ZeroSettings,
    estimate_memory,
)
from launcher.planning.model_size import ModelCounts

# (stage, offload optimizer, offload params), fastest first.
VARIANTS: tuple[tuple[int, bool, bool], ...] = (
    (0, False, False), (1, False, False), (2, False, False), (3, False, False),
    (1, True, False), (2, True, False), (3, True, False), (3, True, True),
)


@dataclass(frozen=True)
class LongContext:
    """Long-sequence settings the planner takes as given while it chooses the rest (see memory.Setup)."""

    sequence_parallel: int = 1
    chunked_loss: bool = False
    tiled_mlp: bool = False
    offload_checkpoints: bool = False
    allowed_sequence_parallel: tuple[int, ...] = ()
    """Group sizes the world, data.seq_len and the model's heads allow; suggestions try the larger ones."""

    def setup_fields(self, checkpointing: bool) -> dict:
        """memory.Setup's fields (offloading checkpoints means nothing without checkpointing)."""
        return {"sequence_parallel": self.sequence_parallel, "chunked_loss": self.chunked_loss,
                "tiled_mlp": self.tiled_mlp, "offload_checkpoints": self.offload_checkpoints and checkpointing}


@dataclass(frozen=True)
class Choice:
    """The chosen configuration, its estimate, and the reasons to show in the plan.

    `why` holds the same reasons by setting ("variant", "activation_checkpointing", "micro_batch_size",
    "grad_accum_steps"), so the planner can put each next to the config field it decided;
    `skipped` says why each faster variant was passed over.
    """

    setup: Setup
    grad_accum_steps: int
    global_batch_size: int
    estimate: MemoryEstimate
    reasons: list[str]
    why: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


class DoesNotFit(Exception):
    """Nothing allowed fits; the message carries the component table and what would make it fit."""

    def __init__(self, message: str, estimate: Optional[MemoryEstimate] = None,
                 suggestions: Optional[list[str]] = None, reasons: Optional[list[str]] = None):
        super().__init__(message)
        self.estimate = estimate
        self.suggestions = list(suggestions or [])
        self.reasons = list(reasons or [])  # why each allowed variant does not fit


def short_label(setup: Setup) -> str:
    extra = {"none": "", "optimizer": "+opt", "params": "+par", "optimizer+params": "+opt+par"}[setup.offload]
    return f"Z{setup.stage}{extra}"


def component_table(estimates: list[MemoryEstimate], gpu_memory_gb: Optional[float],
                    host_memory_gb: Optional[float] = None) -> str:
    """Rows are components (GB per device, then per node), columns the configurations (no fit row without a size)."""
    width = max(9, *(len(short_label(e.setup)) + 1 for e in estimates))
    row = lambda name, cells: f"  {name:<26}" + "".join(f"{c:>{width}}" for c in cells)  # noqa: E731
    lines = [row("GB (1e9 bytes)", [short_label(e.setup) for e in estimates])]
    for key in DEVICE_KEYS:
        lines.append(row(key, [f"{e.device[key] / GB:.2f}" for e in estimates]))
    lines.append(row("= model states", [f"{e.model_states / GB:.2f}" for e in estimates]))
    lines.append(row("= peak per device", [f"{e.device_total / GB:.2f}" for e in estimates]))
    if gpu_memory_gb is not None:
        lines.append(row(f"fits {gpu_memory_gb:g} GB", ["yes" if e.fits(gpu_memory_gb) else "NO" for e in estimates]))
    for key in HOST_KEYS:
        lines.append(row(f"host {key}", [f"{e.host[key] / GB:.1f}" for e in estimates]))
    lines.append(row("= host RAM per node", [f"{e.host_total / GB:.1f}" for e in estimates]))
    if host_memory_gb is not None:
        lines.append(row(f"host fits {host_memory_gb:g} GB", ["yes" if e.host_total <= host_memory_gb * GB
                                                             else "NO" for e in estimates]))
    lines.append("  peak per device = model states + offload_staging + fragmentation + cuda_runtime\n"
                 "                    + max(optimizer_step_buffers, activations + logits + gradient_in_flight\n"
                 "                          + reduce_buckets + zero3_live_params)")
    return "\n".join(lines)


def _variants(stage: Optional[int], offload_optimizer: Optional[bool],
              offload_params: Optional[bool]) -> list[tuple[int, bool, bool]]:
    return [v for v in VARIANTS
            if (stage is None or v[0] == stage)
            and (offload_optimizer is None or v[1] == offload_optimizer)
            and (offload_params is None or v[2] == offload_params)]


def _batch_shapes(world_size: int, global_batch_size: Optional[int],
                  micro_batch_size: Optional[int], sequence_parallel: int = 1) -> tuple[list[int], Optional[int]]:
    """Micro batches to try, largest first, and the per-replica share they must divide."""
    replicas = world_size // sequence_parallel
    if global_batch_size is not None and (isinstance(global_batch_size, bool) or global_batch_size < 1):
        raise ConfigError([f"train.global_batch_size: must be a positive integer, got {global_batch_size!r}"])
    if micro_batch_size is not None:
        if isinstance(micro_batch_size, bool) or micro_batch_size < 1:
            raise ConfigError([f"train.micro_batch_size: must be a positive integer or auto, got {micro_batch_size!r}"])
        if global_batch_size is not None and (problems := batch_split_problems(global_batch_size, micro_batch_size,
                                                                                 world_size, sequence_parallel)):
            raise ConfigError(problems)
        return [micro_batch_size], None if global_batch_size is None else global_batch_size // replicas
    if global_batch_size is None:
        raise ConfigError(["train.global_batch_size: needed when train.micro_batch_size is auto "
                           "(the micro batch must divide each rank's share of it)"])
    if problems := batch_split_problems(global_batch_size, None, world_size, sequence_parallel):
        raise ConfigError(problems)
    share = global_batch_size // replicas
    return [m for m in range(share, 0, -1) if share % m == 0], share


def choose_configuration(counts: ModelCounts, world_size: int, gpu_memory_gb: float, seq_len: int,
                         global_batch_size: Optional[int], dtype: str = "bf16", stage: Optional[int] = None,
                         micro_batch_size: Optional[int] = None, activation_checkpointing: Optional[bool] = None,
                         offload_optimizer: Optional[bool] = None, offload_params: Optional[bool] = None,
                         gpus_per_node: Optional[int] = None, host_memory_gb: Optional[float] = None,
                         attention: str = "auto", zero: ZeroSettings = ZeroSettings(),
                         margins: Margins = Margins(), optimizer: str = "fused",
                         long_context: Optional[LongContext] = None, whole_layers: bool = False,
                         grad_accum_steps: Optional[int] = None, tight_ok: bool = True) -> Choice:
    """The fastest configuration that fits; None for any setting means "choose it for me".

    `optimizer` is memory.Setup's: "torch" for torch's unfused AdamW (temporaries), else "fused" (in place).
    `whole_layers` is memory.Setup's: ZeRO-3 gathers a whole decoder layer at once (a compiled model).
    `long_context` fixes sequence parallelism, the chunked loss, the tiled MLP and checkpoint offload.
    `grad_accum_steps` counts only without a global batch (else it is the share over the micro batch): with
    bf16/fp16 and ZeRO 1-3, accumulating makes DeepSpeed keep fp32 gradient sums.
    `tight_ok=False` refuses a fit without room for the estimate's measured error, for a caller that has other
    settings to try first (the planner's larger sequence-parallel groups).
    """
    lc = long_context or LongContext()
    if not (isinstance(gpu_memory_gb, (int, float)) and gpu_memory_gb > 0):
        raise ConfigError([f"launch.gpu_memory_gb: must be a positive number of GB, got {gpu_memory_gb!r}"])
    if stage is not None and stage not in (0, 1, 2, 3):
        raise ConfigError([f"zero.stage: must be 0, 1, 2, 3 or auto, got {stage!r}"])
    variants = _variants(stage, offload_optimizer, offload_params)
    if not variants:
        raise ConfigError([f"zero: stage {stage} cannot combine offload_optimizer={offload_optimizer} with "
                           f"offload_params={offload_params} (parameter offload needs stage 3 and optimizer offload)"])
    micros, share = _batch_shapes(world_size, global_batch_size, micro_batch_size, lc.sequence_parallel)
    ckpts = [False, True] if activation_checkpointing is None else [bool(activation_checkpointing)]
    per_node = gpus_per_node or min(world_size, DEFAULT_GPUS_PER_NODE)

    def estimate(variant, ckpt, micro, seq=seq_len, world=world_size, lc=lc) -> MemoryEstimate:
        s, opt, par = variant
        replicas = max(1, world // lc.sequence_parallel)
        accumulation = (max(1, global_batch_size // replicas // micro) if global_batch_size
                        else (grad_accum_steps or 1))
        setup = Setup(stage=s, world_size=world, gpus_per_node=min(per_node, world), micro_batch_size=micro,
                      seq_len=seq, dtype=dtype, offload_optimizer=opt, offload_params=par,
                      activation_checkpointing=ckpt, attention=attention, optimizer=optimizer,
                      whole_layers=whole_layers, fp32_accumulation=accumulates_in_fp32(dtype, s, accumulation),
                      **lc.setup_fields(ckpt))
        return estimate_memory(counts, setup, zero, margins)

    # First with room for the estimate's measured error; a tight fit only where nothing else fits.
    for margin in (MEASURED_OVER_ESTIMATE, 0.0) if tight_ok else (MEASURED_OVER_ESTIMATE,):
        reasons: list[str] = []
        for variant in variants:
            tried = []
            for est in (estimate(variant, ckpt, micro) for ckpt in ckpts for micro in micros):
                if est.fits(gpu_memory_gb, host_memory_gb, margin):
                    return _chosen(est, micros, share, world_size // lc.sequence_parallel, gpu_memory_gb,
                                   reasons, estimate, len(ckpts) > 1, margin)
                tried.append(est)
            # The least it needs: not always at the smallest micro batch, since a micro batch that takes the whole
            # share needs no fp32 accumulation buffer.
            least = min(tried, key=lambda e: e.device_total)
            reasons.append(f"{least.setup.label()} needs {_shortfall(least, gpu_memory_gb, host_memory_gb)} "
                           f"at best (micro batch {least.setup.micro_batch_size} "
                           f"{_ckpt_words(least.setup.activation_checkpointing)})")
    frugal = estimate(variants[-1], ckpts[-1], micros[-1])
    suggestions = _suggestions(frugal, variants, ckpts, micros, estimate, gpu_memory_gb, host_memory_gb,
                               offload_optimizer, offload_params, per_node, lc)
    message = (f"nothing fits in {gpu_memory_gb:g} GB per device on {world_size} devices "
               f"({counts.total / 1e9:.2f}B parameters, seq_len {seq_len}, {dtype}):\n"
               + "\n".join(f"  - {r}" for r in reasons)
               + "\nsmallest allowed configuration, component by component:\n"
               + component_table([frugal], gpu_memory_gb, host_memory_gb)
               + "\nwhat would make it fit:\n" + "\n".join(f"  - {s}" for s in suggestions))
    raise DoesNotFit(message, frugal, suggestions, reasons)


def _ckpt_words(ckpt: bool) -> str:
    return "with activation checkpointing" if ckpt else "without activation checkpointing"


def _shortfall(est: MemoryEstimate, gpu_memory_gb: float, host_memory_gb: Optional[float]) -> str:
    if est.device_total > gpu_memory_gb * GB:
        return f"{est.device_total / GB:.1f} GB per device > {gpu_memory_gb:g} GB"
    if est.tight(gpu_memory_gb) and est.fits(gpu_memory_gb, host_memory_gb):
        return (f"{est.device_total / GB:.1f} GB per device of {gpu_memory_gb:g} GB, under "
                f"{MEASURED_OVER_ESTIMATE:.0%} to spare (tight: {TIGHT_WHY})")
    return f"{est.host_total / GB:.1f} GB host RAM per node > {host_memory_gb:g} GB"


def _tight_words(est: MemoryEstimate, gpu_memory_gb: float, margin: float) -> str:
    """Why a configuration that fits was passed over: it would be tight."""
    return (f", under {MEASURED_OVER_ESTIMATE:.0%} to spare (tight)"
            if margin and est.tight(gpu_memory_gb) else "")


def _chosen(est: MemoryEstimate, micros: list[int], share: Optional[int], replicas: int,
            gpu_memory_gb: float, reasons: list[str], estimate, ckpt_auto: bool, margin: float) -> Choice:
    s = est.setup
    variant = (s.stage, s.offload_optimizer, s.offload_params)
    spare = gpu_memory_gb - est.device_total / GB
    skipped = list(reasons)
    why = {"variant": f"{s.label()} fits: {est.device_total / GB:.1f} GB of {gpu_memory_gb:g} GB per device "
                      f"({spare:.1f} GB to spare; model states {est.model_states / GB:.1f} GB)"}
    if ckpt_auto:
        if s.activation_checkpointing:
            without = estimate(variant, False, micros[-1])
            why["activation_checkpointing"] = (f"activation checkpointing on: without it even micro batch "
                                               f"{micros[-1]} needs {without.device_total / GB:.1f} GB"
                                               + _tight_words(without, gpu_memory_gb, margin))
        else:
            why["activation_checkpointing"] = ("activation checkpointing off: not needed to fit "
                                               "(it would cost ~1/3 more compute)")
    bigger = [m for m in micros if m > s.micro_batch_size]
    if bigger:
        nxt = estimate(variant, s.activation_checkpointing, bigger[-1])
        why["micro_batch_size"] = (f"micro batch {s.micro_batch_size}: the next divisor of the per-rank share "
                                   f"{share}, {bigger[-1]}, would need {nxt.device_total / GB:.1f} GB"
                                   + _tight_words(nxt, gpu_memory_gb, margin))
    elif share is not None and len(micros) > 1:
        why["micro_batch_size"] = f"micro batch {s.micro_batch_size}: the whole per-rank share fits at once"
    accum = 1 if share is None else share // s.micro_batch_size
    global_batch = s.micro_batch_size * accum * replicas
    if share is not None:
        why["grad_accum_steps"] = (f"gradient accumulation {accum}: global batch = micro {s.micro_batch_size} × "
                                   f"accumulation {accum} × "
                                   f"{replicas_words(s.world_size, s.sequence_parallel)} = {global_batch}")
    return Choice(s, accum, global_batch, est, skipped + list(why.values()), why, skipped)


def _suggestions(frugal, variants, ckpts, micros, estimate, gpu_memory_gb, host_memory_gb,
                 offload_optimizer, offload_params, per_node, lc: LongContext) -> list[str]:
    """Concrete changes that would make the smallest configuration fit, each checked with the model."""
    s = frugal.setup
    fastest = _fastest_here(s, micros, estimate, gpu_memory_gb, host_memory_gb, lc, len(ckpts) > 1)
    out = [fastest] if fastest else []
    fits = lambda variant, world=s.world_size, seq=s.seq_len: estimate(  # noqa: E731
        variant, ckpts[-1], micros[-1], seq=seq, world=world).fits(gpu_memory_gb, host_memory_gb)
    worlds = [w for i in range(14) if (w := per_node * 2 ** i) > s.world_size and w % s.sequence_parallel == 0]
    seqs = [q for i in range(1, 12) if (q := s.seq_len // 2 ** i) >= 64 and q % s.sequence_parallel == 0]
    offloads = [v for v in ((3, True, False), (3, True, True)) if v not in variants]
    if s.stage > 0 and (world := next((w for w in worlds if fits(variants[-1], world=w)), None)):
        nodes = -(-world // per_node)
        out.append(f"more GPUs: {world} devices ({nodes} nodes of {per_node}, launch.nodes: {nodes}) fit {s.label()}")
    if (variant := next((v for v in offloads if fits(v)), None)):
        what = "optimizer and parameters" if variant[2] else "optimizer"
        out.append(f"offload: ZeRO-{variant[0]} with the {what} offloaded to CPU fits ("
                   f"zero.offload_optimizer: cpu{', zero.offload_params: cpu' if variant[2] else ''}; "
                   f"or auto to let the planner decide)")
    if not s.activation_checkpointing and estimate(variants[-1], True, micros[-1]).fits(gpu_memory_gb, host_memory_gb):
        out.append("activation checkpointing: train.activation_checkpointing: true fits")
    if s.micro_batch_size > 1 and estimate(variants[-1], ckpts[-1], 1).fits(gpu_memory_gb, host_memory_gb):
        out.append(f"a smaller micro batch: train.micro_batch_size 1 fits {s.label()} (or auto, with "
                   f"train.global_batch_size set)")
    if (seq := next((q for q in seqs if fits(variants[-1], seq=q)), None)):
        out.append(f"shorter sequences: data.seq_len {seq} fits {s.label()}")
    if not lc.chunked_loss and estimate(variants[-1], ckpts[-1], micros[-1], lc=replace(lc, chunked_loss=True)).fits(
            gpu_memory_gb, host_memory_gb):
        out.append("the chunked loss: train.chunked_loss: true (or auto) fits")
    bigger = [n for n in lc.allowed_sequence_parallel if n > lc.sequence_parallel]
    if (n := next((n for n in bigger if estimate(variants[-1], ckpts[-1], micros[-1],
                                                 lc=replace(lc, sequence_parallel=n)).fits(gpu_memory_gb,
                                                                                          host_memory_gb)), None)):
        out.append(f"sequence parallelism: train.sequence_parallel {n} fits {s.label()} (or auto)")
    if not out:  # no single change is enough: the longest sequence that some GPU count and full offload fit
        most = (3, True, True)
        combo = next(((w, q) for q in [s.seq_len, *seqs] for w in [s.world_size, *worlds] if fits(most, w, q)), None)
        if combo:
            out.append(f"together: {combo[0]} devices, ZeRO-3 with optimizer and parameter offload, "
                       f"data.seq_len {combo[1]}")
    if frugal.host_total > (host_memory_gb or float("inf")) * GB:
        out.append(f"more host RAM: {frugal.host_total / GB:.0f} GB per node (have {host_memory_gb:g} GB)")
    else:
        out.append(f"bigger devices: {s.label()} needs {frugal.device_total / GB:.1f} GB per device")
    return out


def _fastest_here(s: Setup, micros: list[int], estimate, gpu_memory_gb: float, host_memory_gb: Optional[float],
                  lc: LongContext, ckpt_auto: bool) -> Optional[str]:
    """The fastest configuration that fits this data.seq_len on these devices when every memory setting may change
    at once, as the fields to set; None when none does.

    A user's data and GPUs are what they are, so this comes before the single changes, which price the most
    frugal configuration (often offloaded) and may each fall short where two together fit: a 70B model at 128k
    tokens needs both sequence parallelism and activation checkpointing. The order is the planner's, slowest
    remedies last: offload after every group size without it (it moves the optimizer step to the CPU), then the
    smallest sequence-parallel group (an all-to-all per layer for each doubling), the chunked loss and tiled MLP
    only where needed, less sharding, no recomputation, the micro batch as given before 1."""
    groups = [lc.sequence_parallel, *(n for n in lc.allowed_sequence_parallel if n > lc.sequence_parallel)]
    knobs = list(dict.fromkeys([(lc.chunked_loss, lc.tiled_mlp), (True, lc.tiled_mlp), (True, True)]))
    order = ((variant, n, chunked, tiled, ckpt, micro)
             for offloaded in (False, True) for n in groups for chunked, tiled in knobs
             for variant in VARIANTS if variant[1] == offloaded
             for ckpt in (False, True) for micro in dict.fromkeys((micros[-1], 1)))
    for variant, n, chunked, tiled, ckpt, micro in order:
        est = estimate(variant, ckpt, micro, lc=replace(lc, sequence_parallel=n, chunked_loss=chunked, tiled_mlp=tiled))
        if not est.fits(gpu_memory_gb, host_memory_gb):
            continue
        fields = [f"zero.stage: {variant[0]}", f"zero.offload_optimizer: {'cpu' if variant[1] else 'none'}"]
        fields += ["zero.offload_params: cpu"] if variant[2] else []
        fields += [f"train.micro_batch_size: {micro}"] if micro != micros[-1] else []
        if ckpt_auto or ckpt != s.activation_checkpointing:
            fields.append(f"train.activation_checkpointing: {str(ckpt).lower()}")
        fields += [f"train.sequence_parallel: {n}"] if n != lc.sequence_parallel else []
        fields += ["train.chunked_loss: true"] if chunked != lc.chunked_loss else []
        fields += ["train.tiled_mlp: true"] if tiled != lc.tiled_mlp else []
        return (f"the same data.seq_len {s.seq_len} on the same {s.world_size} devices with {', '.join(fields)} "
                f"({est.setup.label()}, {est.device_total / GB:.1f} GB of {gpu_memory_gb:g} GB per device: the "
                f"fastest that fits); `auto` in these fields lets the planner choose")
    return None


SEQ_LEN_STEP = 128
"""longest_seq_len answers in multiples of this (and of the sequence-parallel size): what people set."""


def longest_seq_len(counts: ModelCounts, setup: Setup, gpu_memory_gb: float, zero: ZeroSettings = ZeroSettings(),
                    margins: Margins = Margins(), host_memory_gb: Optional[float] = None,
                    limit: int = 1 << 24) -> Optional[int]:
    """The longest data.seq_len at which `setup` (its seq_len ignored) fits; None when not even the shortest step.

    Memory grows with the sequence length in every term that depends on it, so a doubling search followed by
    bisection finds the boundary; the answer is a multiple of SEQ_LEN_STEP that sequence_parallel divides.
    """
    step = math.lcm(SEQ_LEN_STEP, setup.sequence_parallel)
    fits = lambda k: estimate_memory(counts, replace(setup, seq_len=k * step), zero, margins).fits(  # noqa: E731
        gpu_memory_gb, host_memory_gb)
    if not fits(1):
        return None
    low, high = 1, 2
    while high * step <= limit and fits(high):
        low, high = high, high * 2
    if high * step > limit:
        return low * step
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low * step
