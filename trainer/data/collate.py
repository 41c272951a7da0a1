"""Packed sequences -> the tensors one forward pass needs.

Position ids restart at every sample, and targets are shifted inside each sample, so no sample
learns to predict the start of the next. Position ids alone do not stop a token attending to the
previous sample, so every batch also says where its samples begin, in the form its attention kernel
reads (`separation`):

- "positions": the position ids alone; transformers builds each layer's mask from them (the usual case
  for sdpa and eager: trainer/separation.py says why not a mask from here);
- "mask": a block-diagonal causal bool mask (batch, 1, L, L), built only when a row holds more than one
  sample (remote-code models that read it: trainer/separation.py measures which form each one reads);
- "varlen": flash-attention's variable-length arguments (`cu_seq_lens_q/k`, `max_length_q/k`) over
  the batch flattened row by row, so every sample (and every row's padding) is its own sequence at
  any micro batch size. transformers infers these from position ids only when the batch has one row,
  so a collator that relies on that leaks attention across samples at micro batch 2 and up;
- "none": nothing either, for a kernel that reads the position ids itself (sequence parallelism's packed
  attention), and for showing sequences.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import torch

from trainer.data.packing import PackedSet

IGNORE = -100
Separation = Literal["positions", "mask", "varlen", "none"]


@dataclass
class Batch:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    real_tokens: int
    varlen: dict = field(default_factory=dict)
    """flash-attention varlen kwargs (cu_seq_lens_q/k on the batch's device, max_length_q/k as ints)."""
    token_mask: Optional[torch.Tensor] = None
    """(rows, width) bool, False on padding: the tokens an MoE router's load-balancing loss averages over."""

    def to(self, device) -> Batch:
        move = lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return Batch(move(self.input_ids), move(self.position_ids), move(self.targets), move(self.attention_mask),
                     self.real_tokens, {k: move(v) for k, v in self.varlen.items()}, move(self.token_mask))

    def model_inputs(self) -> dict:
        """No cache: with one, transformers stops looking for packed samples in the position ids."""
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False, **self.varlen}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        return inputs


def pad_id_of(tokenizer) -> int | None:
    """The id that fills rows up to a common width: the tokenizer's pad token, else its EOS (never trained on)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def varlen_kwargs(segments: np.ndarray) -> dict:
    """flash-attention varlen arguments for (rows, width) segment ids, over the rows flattened in order.

    A new sequence starts wherever the segment id changes, and at the start of every row.
    """
    flat = segments.reshape(-1)
    starts = np.flatnonzero(np.concatenate([[True], flat[1:] != flat[:-1]]))
    row_starts = np.arange(0, flat.size, segments.shape[1])
    cu = np.union1d(starts, row_starts).astype(np.int32)
    cu = np.concatenate([cu, [flat.size]]).astype(np.int32)
    longest = int(np.diff(cu).max())
    cu_t = torch.from_numpy(cu)
    return {"cu_seq_lens_q": cu_t, "cu_seq_lens_k": cu_t.clone(), "max_length_q": longest, "max_length_k": longest}


def collate(data: PackedSet, indices: np.ndarray, pad_id: int, separation: Separation = "mask",
            multiple_of: int = 8, width: Optional[int] = None) -> Batch:
    """Pad the chosen sequences to the longest (rounded up to multiple_of) and build ids, positions, targets.

    `width` set (a compiled model): every batch is padded to it and, when the data packs samples at all,
    always carries its separation mask, so the compiled graph sees one shape and one set of inputs instead of
    recompiling per width and per mask/no-mask.
    """
    seqs = [data.sequence(int(k)) for k in indices]
    longest = max(len(tokens) for tokens, _, _ in seqs)
    static = width is not None
    width = max(width or 0, -(-longest // multiple_of) * multiple_of)
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
    mask, varlen = None, {}
    if separation == "varlen":
        varlen = varlen_kwargs(segments)
    # Rows that each hold one sample need only causal attention (trailing padding carries no loss): without
    # a mask sdpa can take its fastest kernel, and no rows × width² tensor is built and copied.
    elif separation == "mask" and ((static and data.packs_samples) or any(len(lens) > 1 for _, _, lens in seqs)):
        seg = torch.from_numpy(segments)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        mask = (seg[:, :, None] == seg[:, None, :]) & causal
        mask = mask[:, None]
    elif separation not in ("positions", "mask", "varlen", "none"):
        raise ValueError(f"separation must be positions, mask, varlen or none, got {separation!r}")
    token_mask = torch.from_numpy(np.arange(width)[None, :] < np.array([len(t) for t, _, _ in seqs])[:, None])
    return Batch(torch.from_numpy(ids), torch.from_numpy(positions), torch.from_numpy(targets), mask, real, varlen,
                 token_mask)
