"""A run's mixture-of-experts settings checked against its model at plan time, before anything is queued.

The trainer decides the same things from the live model (trainer/moe.py); doing it here too means a
coefficient the model cannot use fails in `shardtune plan` on a login node, not after the job waited
in a queue and loaded the weights. A model without a readable config.json here (a hub model `plan` could not
fetch) is checked by the trainer at start-up.
"""
from __future__ import annotations

from typing import Any, Optional

from launcher.contract.config import RunConfig
from launcher.contract.errors import ConfigError
from launcher.planning.model_size import counts_from_config
from launcher.planning.moe_size import has_experts

# transformers computes no router load-balancing loss for these (DeepSeek balances with router biases).
NO_AUX_LOSS = ("deepseek_v2", "deepseek_v3")


def compile_problem(cfg: RunConfig) -> Optional[str]:
    """Why train.compile is refused for a mixture-of-experts model (None when compile is off): compiled routing
    (data-dependent token counts per expert) and the router-loss recorder have not been verified."""
    if cfg.train.compile is not True:
        return None
    return (f"train.compile: true is not allowed for {cfg.model.name_or_path}, a mixture-of-experts model: compiled "
            f"routing (a data-dependent number of tokens per expert) and the router load-balancing loss have not "
            f"been verified; allowed: false")


def moe_plan_notes(cfg: RunConfig, model_config: Optional[dict[str, Any]]) -> list[str]:
    """Plan notes on the MoE machinery; ConfigError for a router loss the model does not define."""
    coef = cfg.model.router_aux_loss_coef
    if model_config is None:
        return []
    name = cfg.model.name_or_path
    model_type = model_config.get("model_type")
    if not has_experts(model_config):
        if coef:
            raise ConfigError([f"model.router_aux_loss_coef: {coef:g} is not allowed: {name} has no experts (its "
                               f"config.json names no num_experts, num_local_experts or n_routed_experts); "
                               f"allowed: 0 or unset"])
        return []
    if (problem := compile_problem(cfg)) is not None:
        raise ConfigError([problem])
    if coef and model_type in NO_AUX_LOSS:
        raise ConfigError([f"model.router_aux_loss_coef: {coef:g} is not allowed for {model_type}: transformers "
                           f"defines no router load-balancing loss for it (its routers balance with biases); "
                           f"allowed: 0 or unset"])
    balanced = "over the global batch, logged as aux_loss"
    if model_type in NO_AUX_LOSS:
        aux = "no router aux loss (the model defines none)"
    elif coef == 0:
        aux = "no router aux loss (model.router_aux_loss_coef 0)"
    elif coef is not None:
        aux = f"router aux loss × {coef:g} (model.router_aux_loss_coef) {balanced}"
    elif "router_aux_loss_coef" in model_config:
        given = model_config["router_aux_loss_coef"]
        aux = f"router aux loss × {given:g} (config.json's router_aux_loss_coef) {balanced}"
    else:
        aux = f"router aux loss × transformers' default coefficient for this model, if it defines one, {balanced}"
    notes = [f"mixture of experts: {aux}; no expert parallelism: ZeRO shards experts like any weight and each "
             f"rank runs the experts its tokens pick"]
    if cfg.zero.stage == 3:
        counts = counts_from_config(model_config, source=f"{name}/config.json")
        notes.append(f"ZeRO-3 gathers each MoE block whole as a leaf module (the same collectives on every rank "
                     f"whatever the routing): {counts.gather_unit / 1e9:.2f}B parameters at a time")
    return notes
