"""Mixture-of-experts training: ZeRO-3 leaf modules, and the router's load-balancing loss.

Leaf modules. ZeRO-3 gathers a module's parameters when the module runs and records the order to
prefetch the next time. In an MoE layer that runs only the experts its tokens were routed to, ranks
with different tokens call different modules: their gathers stop matching and the job fails with a
collective mismatch or hangs. A ZeRO-3 leaf module is gathered whole when it is entered, whatever runs
inside, so every rank does the same collectives. DeepSpeed reads the flag in `deepspeed.initialize`,
so `register_leaf_modules` must run after the model is built (already partitioned by zero.Init is
fine) and before that call. transformers 5's fused experts with the default grouped_mm kernel happen
to be safe without it; the eager experts kernel, per-expert layouts (remote code, transformers 4)
and custom blocks are not, and the flag costs nothing extra for fused experts, which are gathered
whole anyway.

Router loss. transformers adds `router_aux_loss_coef · aux_loss` when asked for router logits, but
(1) it reads the attention mask as (batch, length) and breaks on the 4D block mask of packed batches
("The size of tensor a (256) must match the size of tensor b (32768)"), and (2) it balances each
rank's own micro-batch, so the loss and its gradient change with the number of GPUs. Here the router
logits are collected by forward hooks on the router modules transformers itself records them from,
with padding masked by a (batch, length) token mask, and the expert statistics are summed over all
ranks before the loss is formed: the aux loss of one forward over every rank's micro-batch, which is
what a single device holding them all would compute, for any world size. With activation
checkpointing the routers run again during backward; the hooks only record inside `recording()`, so
the recomputation is not counted twice.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
import torch.distributed as torch_dist

from launcher.contract.errors import UserError
from launcher.planning.meta_size import expert_blocks

# The MoE block of each transformers MoE family we train and test (DeepSpeed 0.19 flags the first three by
# itself; its config key would replace that list, so we set the flag on the modules instead).
KNOWN_MOE_BLOCKS = ("MixtralSparseMoeBlock", "Qwen2MoeSparseMoeBlock", "Qwen3MoeSparseMoeBlock", "OlmoeSparseMoeBlock",
                    "DeepseekV3MoE", "DeepseekV2Moe", "GptOssMLP")


def _class_names(module) -> tuple[str, str]:
    cls = type(module)
    return cls.__name__, f"{cls.__module__}.{cls.__qualname__}"


def moe_block_classes(model) -> list[str]:
    """Class names of the model's MoE blocks: the known ones, and any parent of an `experts` module."""
    found = {block.class_name for block in expert_blocks(model, getattr(model, "config", None))}
    found |= {_class_names(m)[0] for m in model.modules() if _class_names(m)[0] in KNOWN_MOE_BLOCKS}
    return sorted(found)


def register_leaf_modules(model, extra: list[str]) -> list[str]:
    """Flag every MoE block (and each `model.moe_leaf_modules` class) as a ZeRO-3 leaf; the class names flagged.

    An extra name that matches no module is a typo that would leave the hang in place: it fails, naming
    the field and the MoE-looking classes the model does have.
    """
    from deepspeed.utils import set_z3_leaf_modules

    present = {name for m in model.modules() for name in _class_names(m)}
    missing = [name for name in extra if name not in present]
    if missing:
        blocks = moe_block_classes(model) or ["none"]
        raise UserError(f"model.moe_leaf_modules: {missing} matches no module of {type(model).__name__}; give class "
                        f"names (or module.ClassName) of its modules, e.g. its MoE blocks: {', '.join(blocks)}")
    names = sorted(set(moe_block_classes(model)) | set(extra))
    if names:
        set_z3_leaf_modules(model, names, raise_if_not_found=False)
    return names


def disable_hf_router_loss(model) -> None:
    """transformers computes its own (per-rank, 2D-mask-only) aux loss when this is on; ours replaces it.

    Also for a coefficient of 0: with the flag on, a packed batch's 4D mask would crash every forward."""
    if getattr(model.config, "output_router_logits", False):
        model.config.output_router_logits = False


def _router_recorder(model):
    """transformers' own record of where a model's router logits come from (class and output index), if any."""
    for module in model.modules():
        recorder = (getattr(type(module), "_can_record_outputs", None) or {}).get("router_logits")
        if recorder is not None:
            return recorder
    return None


class NoRouterAuxLoss:
    """Dense models, models whose routers define no aux loss, and coefficient 0: nothing to add or log."""

    coef = 0.0

    @contextmanager
    def recording(self):
        yield

    def loss_share(self, token_mask: torch.Tensor, micro_steps: int,
                   gradient_factor: Optional[int] = None) -> Optional[torch.Tensor]:
        return None

    def metrics(self) -> dict[str, float]:
        return {}


class RouterAuxLoss(NoRouterAuxLoss):
    """The load-balancing loss of transformers' `load_balancing_loss_func`, over the global micro-batch.

    E · Σ_e f_e · P_e over all MoE layers' tokens, f_e the share of top-k assignments expert e received
    (no gradient) and P_e its mean router probability; padding excluded; the value is top_k when
    perfectly balanced. f, the probability sums and the token count are summed over ranks in one
    all-reduce; each rank then backpropagates its share E · Σ_e f_e · P_e,local_sum / N, so the ranks'
    shares add up to the global loss. Under sequence parallelism a rank's tokens are its slice of each row (the
    token mask sliced alike), and the ranks of all groups together still hold every token once.
    """

    def __init__(self, routers: list, index: int, num_experts: int, top_k: int, coef: float, world: int):
        self.num_experts, self.top_k, self.coef, self.world, self.index = num_experts, top_k, coef, world, index
        self.armed = False
        self.logits: list[torch.Tensor] = []
        self.value_sum: Optional[torch.Tensor] = None
        self.values = 0
        for router in routers:
            router.register_forward_hook(self._record)

    def _record(self, _module, _inputs, output) -> None:
        if self.armed:
            self.logits.append(output[self.index] if isinstance(output, (tuple, list)) else output)

    @contextmanager
    def recording(self):
        """Collect router logits of the forward inside; checkpoint recomputation later is ignored."""
        self.logits.clear()
        self.armed = True
        try:
            yield
        finally:
            self.armed = False

    def loss_share(self, token_mask: torch.Tensor, micro_steps: int,
                   gradient_factor: Optional[int] = None) -> Optional[torch.Tensor]:
        """coef × this rank's share of the aux loss, scaled for DeepSpeed's mean over ranks and accumulation.

        `gradient_factor` is what DeepSpeed divides the summed gradients by (SequenceParallel.gradient_factor: the
        world, or under sequence parallelism at ZeRO 0-2 the number of replicas); None: the world. Adds the global
        value to the logging window. Every rank must call it (it is a collective).
        """
        if not self.logits:
            raise RuntimeError("no router logits were recorded in this forward; was it run inside recording()?")
        E, k = self.num_experts, self.top_k
        mask = token_mask.reshape(-1).float()
        counts = torch.zeros(E, dtype=torch.float32, device=mask.device)
        probs = torch.zeros(E, dtype=torch.float32, device=mask.device)
        for logits in self.logits:
            p = torch.softmax(logits.float(), dim=-1)
            chosen = torch.topk(p, k, dim=-1).indices
            counts = counts.scatter_add(0, chosen.reshape(-1), mask.repeat_interleave(k))
            probs = probs + (p * mask[:, None]).sum(dim=0)
        rows = mask.sum() * len(self.logits)
        self.logits.clear()
        stats = torch.cat([counts, probs.detach(), rows.view(1)]).double()
        if self.world > 1 and torch_dist.is_initialized():
            torch_dist.all_reduce(stats)
        counts_all, probs_all, rows_all = stats[:E], stats[E:2 * E], stats[2 * E].clamp(min=1)
        fraction = (counts_all / rows_all).float()
        value = E * (fraction.double() * probs_all / rows_all).sum()
        self.value_sum = value if self.value_sum is None else self.value_sum + value
        self.values += 1
        share = E * (fraction * probs).sum() / rows_all.float()
        return share * (self.coef * (self.world if gradient_factor is None else gradient_factor) / micro_steps)

    def metrics(self) -> dict[str, float]:
        """The mean global aux loss (without the coefficient) since the last call; one host sync."""
        if not self.values:
            return {}
        value = float(self.value_sum.item()) / self.values
        self.value_sum, self.values = None, 0
        return {"aux_loss": value}


def router_aux_loss(model, configured: Optional[float], world: int) -> NoRouterAuxLoss:
    """The aux loss as the model defines it: its routers, its expert count and top-k, its coefficient.

    `configured` is model.router_aux_loss_coef (None: the model config's). A model that defines no aux
    loss (dense, DeepSeek's bias-balanced routers, remote code) with a positive coefficient is an error.
    """
    disable_hf_router_loss(model)
    recorder = _router_recorder(model)
    defined = recorder is not None and all(hasattr(model, a) for a in ("router_aux_loss_coef", "num_experts",
                                                                           "num_experts_per_tok"))
    if not defined:
        if configured:
            raise UserError(f"model.router_aux_loss_coef: {configured:g} is not allowed for {type(model).__name__}: "
                            f"transformers defines no router load-balancing loss for it; allowed: 0 or unset")
        return NoRouterAuxLoss()
    coef = float(model.router_aux_loss_coef if configured is None else configured)
    if coef == 0:
        return NoRouterAuxLoss()
    routers = [m for name, m in model.named_modules() if isinstance(m, recorder.target_class)
               and (recorder.layer_name is None or recorder.layer_name in name)]
    return RouterAuxLoss(routers, recorder.index, int(model.num_experts), int(model.num_experts_per_tok), coef, world)


def describe(leaf_classes: list[str], aux: NoRouterAuxLoss, stage: int) -> Optional[str]:
    """One start-up line on what the MoE machinery does for this run (None for dense models)."""
    parts: list[str] = []
    if leaf_classes:
        parts.append(f"ZeRO-3 leaf modules {', '.join(leaf_classes)}" if stage == 3 else
                     f"MoE blocks {', '.join(leaf_classes)} (leaf modules matter at ZeRO-3 only)")
    if isinstance(aux, RouterAuxLoss):
        parts.append(f"router aux loss × {aux.coef:g} over the global batch ({aux.top_k} of {aux.num_experts} "
                     f"experts per token), logged as aux_loss")
    return "mixture of experts: " + "; ".join(parts) if parts else None

