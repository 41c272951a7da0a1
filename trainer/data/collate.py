"""Packed sequences -> the tensors one forward pass needs.

Position ids restart at every sample. Where flash-attention's variable-length kernels are used,
that alone keeps samples apart; every other attention path (sdpa, eager) gets a block-diagonal
causal mask, because position ids alone do not stop a token attending to the previous sample.
Targets are shifted inside each sample, so no sample learns to predict the start of the next.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainer.data.packing import PackedSet

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    attention_mask: torch.Tensor | None
    real_tokens: int

    def to(self, device) -> "Batch":
        move = lambda t: t.to(device, non_blocking=True) if t is not None else None  # noqa: E731
        return Batch(move(self.input_ids), move(self.position_ids), move(self.targets), move(self.attention_mask),
                     self.real_tokens)

    def model_inputs(self) -> dict:
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        return inputs


def collate(data: PackedSet, indices: np.ndarray, pad_id: int, block_mask: bool = True, multiple_of: int = 8) -> Batch:
    """Pad the chosen sequences to the longest (rounded up to multiple_of) and build ids, positions, targets."""
    seqs = [data.sequence(int(k)) for k in indices]
    longest = max(len(tokens) for tokens, _, _ in seqs)
    width = -(-longest // multiple_of) * multiple_of
    n = len(seqs)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    labels = np.full((n, width), IGNORE, dtype=np.int64)
    positions = np.zeros((n, width), dtype=np.int64)
    segments = np.full((n, width), -1, dtype=np.int64)
    real = 0
    for row, (tokens, labs, lens) in enumerate(seqs):
        size = len(tokens)
        ids[row, :size] = tokens
        labels[row, :size] = labs
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        seg = np.repeat(np.arange(len(lens)), lens)
        positions[row, :size] = np.arange(size) - np.repeat(starts, lens)
        segments[row, :size] = seg
        positions[row, size:] = np.arange(width - size)  # padding is one more "sample"
        segments[row, size:] = len(lens)
        real += size
    # Target at t is the token at t+1 of the same sample; the last token of each sample has none.
    targets = np.full_like(labels, IGNORE)
    same_sample = segments[:, 1:] == segments[:, :-1]
    targets[:, :-1] = np.where(same_sample, labels[:, 1:], IGNORE)
    mask = None
    # Rows that each hold one sample need only causal attention (trailing padding carries no loss): without
    # a mask sdpa can take its fastest kernel, and no rows × width² tensor is built and copied.
    if block_mask and any(len(lens) > 1 for _, _, lens in seqs):
        seg = torch.from_numpy(segments)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        mask = (seg[:, :, None] == seg[:, None, :]) & causal
        mask = mask[:, None]
    return Batch(torch.from_numpy(ids), torch.from_numpy(positions), torch.from_numpy(targets), mask, real)
