"""The global sample order and each rank's share of it.

The order of sequences depends only on the seed and the epoch; a global batch is the next
`global_batch_size` sequences of it. Ranks then split each global batch into disjoint contiguous
parts. So the samples of step k are the same for any world size, the position in the data is two
integers, and resuming there costs nothing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class DataPosition:
    epoch: int = 0
    offset: int = 0
    """Sequences of this epoch's order already consumed."""

    def to_json(self) -> dict:
        return asdict(self)


class GlobalBatchSampler:
    def __init__(self, num_sequences: int, global_batch_size: int, seed: int, shuffle: bool = True):
        if num_sequences < global_batch_size:
            raise ValueError(f"the data packs into {num_sequences} sequences, fewer than one global batch "
                             f"({global_batch_size}); add data or lower train.global_batch_size / micro_batch_size")
        self.n, self.global_batch, self.seed, self.shuffle = num_sequences, global_batch_size, seed, shuffle
        self._order_epoch, self._order = -1, None

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                           else np.arange(self.n))
            self._order_epoch = epoch
        return self._order

    def next_batch(self, pos: DataPosition) -> tuple[np.ndarray, DataPosition]:
        """The sequences of the next global batch and the position after it (drops an epoch's remainder)."""
        epoch, offset = pos.epoch, pos.offset
        if offset + self.global_batch > self.n:
            epoch, offset = epoch + 1, 0
        batch = self.order(epoch)[offset:offset + self.global_batch]
        return batch, DataPosition(epoch, offset + self.global_batch)


def rank_micro_batches(global_batch: np.ndarray, rank: int, world: int, micro: int) -> list[np.ndarray]:
    """This rank's contiguous share of a global batch, cut into micro-batches."""
    per_rank, extra = divmod(len(global_batch), world)
    if extra or per_rank % micro:
        # Silently dropping the remainder would make the run depend on the world size after all.
        raise ValueError(f"a global batch of {len(global_batch)} sequences does not split into {world} ranks × "
                         f"micro-batches of {micro}")
    mine = global_batch[rank * per_rank:(rank + 1) * per_rank]
    return [mine[i:i + micro] for i in range(0, per_rank, micro)]
