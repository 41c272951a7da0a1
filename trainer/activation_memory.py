"""Activation memory for the longest sequences: tiled MLPs and checkpointed inputs offloaded to the host.

Both use DeepSpeed's own pieces (Arctic Long Sequence Training):

- `TiledMLP` runs an MLP over tiles of the sequence without grad and recomputes each tile in backward, so
  the MLP's intermediate activations (four of width `intermediate_size` per token, the largest tensors of a
  layer) exist for one tile at a time. It marks the MLP's parameters not ready until the last tile's
  backward, so ZeRO reduces their gradients once. It does the job as it is; what it needs from the caller
  is that every rank calls it with the same number of tiles (at ZeRO-3 every tile's forward gathers the
  MLP's weights, a collective), and that the input splits into exactly that many tiles (with fewer, its
  backward never marks the gradients ready). So the tile count comes from the config alone and the input
  is padded to a multiple of it; the padded rows receive no gradient and are cut from the output.
- `CheckpointHiddenStatesOffload` moves the input of every checkpointed decoder layer to pinned host
  memory during forward and back before its recomputation. It is a no-op on CPU devices (the host is the
  device), and it needs the forward and backward inside one context: the loop opens one per micro-batch.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F

from launcher.contract.config import RunConfig
from launcher.contract.errors import UserError
from launcher.planning.memory import mlp_tiles, tiled_mlp_problem
from launcher.planning.model_size import counts_from_config
from trainer.model import decoder_layers


def decoder_mlps(model) -> list[torch.nn.Module]:
    """The MLP of every decoder layer (`layer.mlp`, the transformers convention for decoder-only models)."""
    mlps = [getattr(layer, "mlp", None) for layer in decoder_layers(model)]
    if not mlps or any(m is None for m in mlps):
        raise UserError(f"train.tiled_mlp: {type(model).__name__} has no `layers[i].mlp` modules to tile; "
                        "set train.tiled_mlp: false")
    return mlps


def tile_mlps(model, tiles: int) -> int:
    """Replace every decoder MLP's forward with a tiled one of `tiles` tiles; returns how many were tiled."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    mlps = decoder_mlps(model)
    for mlp in mlps:
        whole = mlp.forward
        params = [p for p in mlp.parameters() if p.requires_grad]

        def tiled(x: torch.Tensor, whole=whole, mlp=mlp, params=params) -> torch.Tensor:
            length = x.shape[-2]
            pad = -length % tiles
            padded = F.pad(x, (0, 0, 0, pad)) if pad else x
            out = TiledMLP.apply(lambda _module, part: whole(part), mlp, padded, tiles, params)
            return out[..., :length, :] if pad else out

        mlp.forward = tiled
    return len(mlps)


def install(model, cfg: RunConfig, message: Callable[[str], None]) -> Callable[[], AbstractContextManager]:
    """Apply train.tiled_mlp to the loaded model; return the context the loop opens around each micro-batch's
    forward and backward (offloading checkpointed inputs for `activation_checkpointing: offload`)."""
    t = cfg.train
    if t.tiled_mlp:
        problem = tiled_mlp_problem(counts_from_config(model.config.to_dict()), cfg.model.name_or_path)
        if problem:
            raise UserError(problem)
        local = cfg.data.seq_len // t.sequence_parallel
        tiles = mlp_tiles(local, model.config.get_text_config().hidden_size)
        count = tile_mlps(model, tiles)
        message(f"train.tiled_mlp: {count} MLPs run in {tiles} tiles of up to {-(-local // tiles):,} positions")
    if t.activation_checkpointing != "offload":
        return contextlib.nullcontext
    from deepspeed.runtime.activation_checkpointing.offload_activations import (
        get_checkpoint_hidden_states_offloading_ctx_manager,
    )

    return get_checkpoint_hidden_states_offloading_ctx_manager
