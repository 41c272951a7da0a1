"""The global order depends only on seed, epoch and global batch size; resuming is O(1) on any world size."""
from __future__ import annotations

import json

import numpy as np
import pytest

from trainer.data.sampler import DataPosition, GlobalBatchSampler, rank_micro_batches

N, GLOBAL, SEED = 103, 8, 7  # 103 % 8 != 0: every epoch drops a remainder


def run(sampler: GlobalBatchSampler, pos: DataPosition, steps: int, world: int, micro: int):
    """What a run at this world size consumes: per step, the global batch and each rank's micro-batches."""
    steps_seen = []
    for _ in range(steps):
        batch, pos = sampler.next_batch(pos)
        shares = [rank_micro_batches(batch, r, world, micro) for r in range(world)]
        steps_seen.append((batch, shares))
    return steps_seen, pos


def check_shares(batch: np.ndarray, shares: list[list[np.ndarray]]) -> None:
    taken = np.concatenate([m for rank in shares for m in rank])
    assert np.array_equal(taken, batch), "the ranks' shares must be the global batch, disjoint and complete"


def test_uninterrupted_order_is_the_same_for_every_world_size():
    reference, _ = run(GlobalBatchSampler(N, GLOBAL, SEED), DataPosition(), 30, world=1, micro=8)
    for world, micro in [(2, 2), (4, 1), (8, 1), (2, 4)]:
        steps, _ = run(GlobalBatchSampler(N, GLOBAL, SEED), DataPosition(), 30, world, micro)
        for (ref_batch, _), (batch, shares) in zip(reference, steps):
            assert np.array_equal(batch, ref_batch)
            check_shares(batch, shares)
            assert all(len(m) == micro for rank in shares for m in rank)


@pytest.mark.parametrize("new_world, micro", [(1, 2), (4, 1), (4, 2)])
def test_resume_mid_epoch_on_a_different_world_size(new_world, micro):
    """World 2 for k steps, checkpoint the position, continue on another world size: same samples as uninterrupted."""
    uninterrupted, _ = run(GlobalBatchSampler(N, GLOBAL, SEED), DataPosition(), 40, world=2, micro=2)
    k = 17  # mid-epoch 2 (12 full batches per epoch)
    first, pos = run(GlobalBatchSampler(N, GLOBAL, SEED), DataPosition(), k, world=2, micro=2)
    saved = json.dumps(pos.to_json())  # what a checkpoint stores
    assert json.loads(saved) == {"epoch": 1, "offset": 5 * GLOBAL}
    restored = DataPosition(**json.loads(saved))
    # A fresh sampler (a new process) jumps straight there: no batches are replayed.
    rest, _ = run(GlobalBatchSampler(N, GLOBAL, SEED), restored, 40 - k, new_world, micro)
    for (want, _), (got, shares) in zip(uninterrupted[k:], rest):
        assert np.array_equal(got, want)
        check_shares(got, shares)
    seen = np.concatenate([b for b, _ in first + rest])
    assert np.array_equal(seen, np.concatenate([b for b, _ in uninterrupted]))


def test_order_depends_only_on_seed_epoch_and_global_batch():
    a = GlobalBatchSampler(N, GLOBAL, SEED)
    assert np.array_equal(a.order(3), GlobalBatchSampler(N, GLOBAL, SEED).order(3))
    assert not np.array_equal(a.order(0), a.order(1)), "each epoch has its own order"
    assert not np.array_equal(a.order(0), GlobalBatchSampler(N, GLOBAL, SEED + 1).order(0))
    assert sorted(a.order(2)) == list(range(N))
    # Every epoch takes whole global batches of its own permutation and drops the remainder.
    steps, pos = run(a, DataPosition(), N // GLOBAL + 1, world=1, micro=GLOBAL)
    first_epoch = np.concatenate([b for b, _ in steps[:-1]])
    assert np.array_equal(first_epoch, a.order(0)[:len(first_epoch)]) and len(set(first_epoch)) == len(first_epoch)
    assert np.array_equal(steps[-1][0], a.order(1)[:GLOBAL]) and pos == DataPosition(1, GLOBAL)
    # A different global batch size is a different schedule (batches are cut differently).
    b16, _ = GlobalBatchSampler(N, 16, SEED).next_batch(DataPosition())
    assert np.array_equal(b16[:GLOBAL], steps[0][0]) and len(b16) == 16
    assert np.array_equal(GlobalBatchSampler(N, GLOBAL, SEED, shuffle=False).order(5), np.arange(N))


def test_uneven_split_is_an_error_not_a_silent_drop():
    with pytest.raises(ValueError, match="does not split"):
        rank_micro_batches(np.arange(8), 0, 3, 1)
    with pytest.raises(ValueError, match="does not split"):
        rank_micro_batches(np.arange(8), 0, 2, 3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(5, 8, 0)
