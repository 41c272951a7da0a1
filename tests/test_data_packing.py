"""Packing: samples share a sequence without seeing each other, and almost nothing is padding."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from launcher.contract.config import load_config
from trainer.data.collate import collate
from trainer.data.packing import (
    ARRAYS,
    OPTIONAL_ARRAYS,
    PackedSet,
    best_fit_decreasing,
    build_packed,
    packing_stats,
    write_packed,
)
from trainer.data.prepare import prepare
from trainer.data.render import IGNORE

from conftest import EXAMPLES, tiny_config


@pytest.fixture(scope="module")
def chat_prepared(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("packing")
    return prepare(load_config(tiny_config(tmp, tiny_model)), log=lambda _: None)  # the shipped tiny_chat.jsonl


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=torch.float32).eval()


def token_losses(model, batch) -> torch.Tensor:
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits.float()
    return F.cross_entropy(logits.transpose(1, 2), batch.targets, ignore_index=IGNORE, reduction="none")


def alone(data: PackedSet, k: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    ids, labels, lens = data.sequence(k)
    a = int(np.sum(lens[:s]))
    return np.asarray(ids[a:a + lens[s]]), np.asarray(labels[a:a + lens[s]])


def test_positions_restart_and_targets_stay_inside_each_sample(chat_prepared):
    data = chat_prepared.train
    picks = np.array([k for k in range(len(data)) if len(data.sequence(k)[2]) >= 3][:2] + [0])
    batch = collate(data, picks, pad_id=3)
    assert batch.input_ids.shape[1] % 8 == 0
    for row, k in enumerate(picks):
        ids, labels, lens = data.sequence(k)
        n = len(ids)
        expected = np.concatenate([np.arange(length) for length in lens])
        assert np.array_equal(batch.position_ids[row, :n].numpy(), expected)
        targets = batch.targets[row].numpy()
        ends = np.cumsum(lens) - 1
        assert (targets[ends] == IGNORE).all(), "a sample's last token must not predict the next sample's first"
        inner = np.setdiff1d(np.arange(n - 1), ends)
        assert np.array_equal(targets[inner], np.asarray(labels)[inner + 1])
        assert (targets[n:] == IGNORE).all() and (batch.input_ids[row, n:] == 3).all()
        mask = batch.attention_mask[row, 0].numpy()
        starts = np.cumsum(lens) - lens
        for a, b in zip(starts, starts + lens):  # block-diagonal: a sample sees its own past only
            assert mask[a:b, a:b].sum() == (b - a) * (b - a + 1) // 2
            assert not mask[a:b, :a].any()
    assert batch.real_tokens == sum(len(data.sequence(k)[0]) for k in picks)


def test_packed_losses_equal_each_sample_alone(chat_prepared, model):
    """The proof that packing changes nothing: per-token losses match running every sample by itself."""
    data = chat_prepared.train
    multi = [k for k in range(len(data)) if len(data.sequence(k)[2]) >= 3]
    picks = np.array([multi[0], multi[-1], 0])  # three sequences of different lengths: padding too
    batch = collate(data, picks, pad_id=0)
    packed = token_losses(model, batch)
    compared = 0
    for row, k in enumerate(picks):
        lens = data.sequence(k)[2]
        start = 0
        for s in range(len(lens)):
            ids, labels = alone(data, k, s)
            single = PackedSet(ids.astype(np.int32), labels.astype(np.int32), np.array([0, len(ids)]),
                               np.array([len(ids)], np.int32), np.array([0, 1]), np.array([0]))
            one = collate(single, np.array([0]), 0, separation="none", multiple_of=1)
            with torch.no_grad():  # plain causal attention, no mask or positions given
                logits = model(input_ids=one.input_ids).logits.float()
            ref = F.cross_entropy(logits[0], one.targets[0], ignore_index=IGNORE, reduction="none")
            trained = one.targets[0] != IGNORE
            got = packed[row, start:start + len(ids)]
            assert torch.equal(batch.targets[row, start:start + len(ids)], one.targets[0])
            torch.testing.assert_close(got[trained], ref[trained], atol=1e-5, rtol=1e-5)
            compared += int(trained.sum())
            start += len(ids)
    assert compared > 50


def test_without_separation_samples_leak_into_each_other(chat_prepared, model):
    """Control for the test above: the same row under plain causal attention (a cache on, so transformers does
    not look for samples in the position ids) lets later samples see earlier ones. Batch.model_inputs turns the
    cache off for that reason; tests/test_packed_attention.py covers the other attention kernels."""
    data = chat_prepared.train
    k = next(k for k in range(len(data)) if len(data.sequence(k)[2]) >= 2)
    batch = collate(data, np.array([k]), 0, separation="positions")
    separated = token_losses(model, batch)
    with torch.no_grad():
        logits = model(**{**batch.model_inputs(), "use_cache": True}).logits.float()
    leaked = F.cross_entropy(logits.transpose(1, 2), batch.targets, ignore_index=IGNORE, reduction="none")
    first = int(data.sequence(k)[2][0])
    assert torch.allclose(separated[0, :first], leaked[0, :first], atol=1e-5)  # the first sample sees nothing else
    assert (separated[0, first:] - leaked[0, first:]).abs().max() > 1e-2


@pytest.mark.parametrize("seq_len", [128, 256, 512])
def test_packing_efficiency_on_shipped_example_data(tmp_path, tiny_model, seq_len):
    data = {"path": str(EXAMPLES / "data" / "tiny_chat.jsonl"), "format": "messages", "seq_len": seq_len}
    s = prepare(load_config(tiny_config(tmp_path, tiny_model, data=data)), log=lambda _: None).summary
    assert s["packing_efficiency"] >= 0.95, s
    assert s["tokens"] + s["pad_tokens"] == s["sequences"] * seq_len and s["rows_kept"] == s["samples"] == 400


def test_best_fit_decreasing_fills_bins_and_keeps_every_sample():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(250), 0.9, 5000).astype(int), 8, 2048)
    groups = best_fit_decreasing(lengths, 2048)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert max(lengths[g].sum() for g in groups) <= 2048
    assert lengths.sum() / (len(groups) * 2048) > 0.99
    assert groups == best_fit_decreasing(lengths, 2048)  # deterministic


def textbook_best_fit_decreasing(lengths, capacity) -> list[list[int]]:
    """Best-fit decreasing as the textbooks state it, by scanning every sequence: longest sample first (ties in
    input order), into the sequence with the least room that still has enough (the first of equals), else into a
    new one. Quadratic, so only for small inputs."""
    groups, rooms = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [k for k, room in enumerate(rooms) if room >= lengths[i]]
        if fits:
            k = min(fits, key=lambda k: (rooms[k], k))
        else:
            k = len(groups)
            groups.append([])
            rooms.append(capacity)
        groups[k].append(i)
        rooms[k] -= lengths[i]
    return groups


@pytest.mark.parametrize("case", ["lognormal", "ties", "exact_fits", "tiny_and_whole"])
def test_best_fit_decreasing_packs_as_the_textbook_scan_does(case):
    """The packer keeps open sequences by their room (a heap per amount) instead of scanning them, and visits the
    samples a chunk at a time: the groups must be the textbook algorithm's, sample for sample, chunked or not."""
    rng = np.random.default_rng(1)
    capacity = 64
    lengths = {"lognormal": np.clip(rng.lognormal(np.log(12), 0.8, 1500).astype(int), 1, capacity),
               "ties": rng.choice([8, 16, 24, 40], 1500),  # many sequences with the same room
               "exact_fits": rng.choice([16, 32, 48], 1500),  # rooms reach 0 and close
               "tiny_and_whole": rng.choice([1, 2, 63, 64], 1500)}[case]  # whole sequences close at once
    want = textbook_best_fit_decreasing(lengths.tolist(), capacity)
    for chunk in (1 << 20, 7):
        got = best_fit_decreasing(lengths, capacity, chunk=chunk)
        assert [g.tolist() for g in got] == want, (case, chunk)


def test_build_packed_counts_targets_of_the_shifted_loss(tmp_path):
    ids = [np.array([1, 2, 3], np.int32), np.array([4, 5], np.int32), np.array([6, 7, 8, 9], np.int32)]
    labels = [np.array([1, 2, 3], np.int32), np.array([IGNORE, 5], np.int32),
              np.array([6, IGNORE, IGNORE, 9], np.int32)]
    packed = build_packed(ids, labels, [[2, 1], [0]])
    assert np.array_equal(packed.tokens, [6, 7, 8, 9, 4, 5, 1, 2, 3])
    assert packed.seq_starts.tolist() == [0, 6, 9] and packed.sample_lens.tolist() == [4, 2, 3]
    assert packed.n_targets.tolist() == [1 + 1, 2]  # a sample's first label is never a target
    packed.save(tmp_path / "p")
    loaded = PackedSet.load(tmp_path / "p")
    assert all(np.array_equal(getattr(loaded, f), getattr(packed, f)) for f in
               ("tokens", "labels", "seq_starts", "sample_lens", "sample_starts", "n_targets"))
    assert packing_stats(loaded, 8) == {"sequences": 2, "tokens": 9, "trained_tokens": 4, "pad_tokens": 7,
                                        "packing_efficiency": round(9 / 16, 6)}


@pytest.mark.parametrize("chunk_tokens", [1, 200, 1 << 22])
def test_packing_to_disk_a_chunk_at_a_time_gives_the_whole_set(tmp_path, chunk_tokens):
    """`prepare` packs from files a chunk of sequences at a time (so a dataset's tokens are never all in memory);
    chunks of one token (every sequence alone), of about three sequences, and of the whole set give the same arrays as
    concatenating the samples in one go, with targets counted here sample by sample."""
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 1000, n).astype(np.int32) for n in rng.integers(2, 40, 300)]
    labels = [np.where(rng.random(len(x)) < 0.4, IGNORE, x).astype(np.int32) for x in ids]
    lengths = np.array([len(x) for x in ids])
    groups = best_fit_decreasing(lengths, 64)
    reads = []

    def read(samples, out_ids, out_labels):
        reads.append(len(samples))
        out_ids[:] = np.concatenate([ids[i] for i in samples])
        out_labels[:] = np.concatenate([labels[i] for i in samples])

    methods, turns = rng.integers(0, 5, 300).astype(np.int8), rng.integers(0, 3, 300).astype(np.int16)
    packed, largest = write_packed(tmp_path / "p", lengths, groups, read, methods, turns, chunk_tokens=chunk_tokens)
    order = [i for g in groups for i in g]
    assert np.array_equal(packed.tokens, np.concatenate([ids[i] for i in order]))
    assert largest == max(x.max() for x in ids)
    assert np.array_equal(packed.labels, np.concatenate([labels[i] for i in order]))
    assert packed.n_targets.tolist() == [sum(int((labels[i][1:] != IGNORE).sum()) for i in g) for g in groups]
    assert packed.sample_lens.tolist() == lengths[order].tolist()
    assert packed.sample_method.tolist() == methods[order].tolist()
    whole = build_packed(ids, labels, groups, methods, turns)
    assert all(np.array_equal(getattr(packed, f), getattr(whole, f)) for f in ARRAYS + OPTIONAL_ARRAYS)
    assert sum(reads) == 300
    if chunk_tokens == 1:
        assert len(reads) == len(groups)  # a sequence longer than a chunk is still read whole
    elif chunk_tokens == 200:
        assert 1 < len(reads) < len(groups)
    else:
        assert len(reads) == 1


def test_rows_of_one_sample_skip_the_mask_and_keep_their_losses(chat_prepared, model):
    """One sample per row (packing off, or fixed-length data) needs causal attention only; padding stays inert."""
    data = chat_prepared.train
    samples = [alone(data, k, 0) for k in range(3)]
    assert len({len(ids) for ids, _ in samples}) > 1, "need different lengths so that some rows are padded"
    ids = np.concatenate([s[0] for s in samples]).astype(np.int32)
    labels = np.concatenate([s[1] for s in samples]).astype(np.int32)
    offsets = np.cumsum([0] + [len(s[0]) for s in samples])
    unpacked = PackedSet(ids, labels, offsets, np.array([len(s[0]) for s in samples], np.int32),
                         np.arange(len(samples) + 1), np.arange(len(samples)))
    batch = collate(unpacked, np.arange(len(samples)), pad_id=0)
    assert batch.attention_mask is None
    losses = token_losses(model, batch)
    for row, (sample_ids, _) in enumerate(samples):
        one = collate(unpacked, np.array([row]), 0, multiple_of=1)
        assert one.input_ids.shape[1] == len(sample_ids)  # alone: no padding at all
        ref = token_losses(model, one)[0]
        trained = one.targets[0] != IGNORE
        torch.testing.assert_close(losses[row, :len(sample_ids)][trained], ref[trained], atol=1e-5, rtol=1e-5)


def test_a_compiled_models_batches_have_one_width_and_keep_their_losses(chat_prepared, model):
    """collate(width=seq_len), as for a compiled model: every batch as wide as seq_len and, since the data packs
    samples, masked even when its rows hold one sample each; the real positions' losses are unchanged."""
    seq_len = 128  # tiny_config's data.seq_len
    a, b = alone(chat_prepared.train, 0, 0), alone(chat_prepared.train, 0, 1)
    rows = [(a,), (b,), (a, b)]  # two rows of one sample, then both packed in one row
    ids = np.concatenate([s[0] for row in rows for s in row]).astype(np.int32)
    labels = np.concatenate([s[1] for row in rows for s in row]).astype(np.int32)
    seq_starts = np.cumsum([0] + [sum(len(s[0]) for s in row) for row in rows])
    data = PackedSet(ids, labels, seq_starts, np.array([len(s[0]) for row in rows for s in row], np.int32),
                     np.cumsum([0] + [len(row) for row in rows]), np.zeros(len(rows)))
    assert data.packs_samples
    lone = collate(data, np.array([0, 1]), pad_id=0)
    assert lone.attention_mask is None and lone.input_ids.shape[1] < seq_len  # what width= changes
    for chosen in (np.array([0, 1]), np.array([1, 2])):
        fixed = collate(data, chosen, pad_id=0, width=seq_len)
        loose = collate(data, chosen, pad_id=0)
        assert fixed.input_ids.shape == (2, seq_len) and fixed.attention_mask is not None
        w = loose.input_ids.shape[1]
        assert torch.equal(fixed.targets[:, :w], loose.targets)
        assert (fixed.targets[:, w:] == IGNORE).all()
        trained = loose.targets != IGNORE
        torch.testing.assert_close(token_losses(model, fixed)[:, :w][trained], token_losses(model, loose)[trained],
                                   atol=1e-5, rtol=1e-5)
