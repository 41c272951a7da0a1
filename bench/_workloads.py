"""The work all three contenders do: one tiny Llama, two datasets, and the exact batches of every step.

shardtune prepares the data (its own cache, its own packing); everything the other two contenders
train on is read back from that prepared set, so all three see the same tokens and loss masks:

- fixed: text rows longer than seq_len, cut to exactly seq_len (`data.truncation: truncate`), one
  sample per sequence, every label trained. The step schedule is shardtune's own sampler, so the
  minimal loop and the Trainer get the same sequences on the same rank at the same step.
- variable: chat rows whose rendered lengths are log-normal (median ~100 tokens, capped at seq_len),
  loss on the assistant turns only. shardtune and the minimal loop train on the packed sequences
  (same batches); the Trainer gets the unpacked samples, padded per batch to the longest.

"Useful" tokens are loss-carrying positions (a shifted target that is not -100): 255 of 256 in a
fixed-length sequence, the assistant tokens (minus each sample's first) in chat data.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from examples.tiny_model import WORDS

SEQ_LEN = 256
MICRO = 4
WORLD = 2
LR = 1.0e-4
HIDDEN, LAYERS = 256, 4
"""The bench model's size, the one the throughput targets are set for."""


@dataclass
class Micro:
    """One micro-batch as a contender computes it."""

    rows: int
    width: int
    """Positions per row the model runs (padded)."""
    real: int
    """Non-pad tokens."""
    useful: int
    """Loss-carrying positions (shifted targets)."""
    ids: list[int] = field(default_factory=list)
    """Which sequences (packed set) or samples (unpacked) it holds."""
    square_lengths: int = 0
    """Sum over its samples of length²: what causal attention's FLOPs grow with (samples attend only inside)."""

    @property
    def computed(self) -> int:
        return self.rows * self.width


@dataclass
class Schedule:
    """micro[step][rank] -> that rank's micro-batches of that optimizer step (steps are 0-based here)."""

    micro: list[list[list[Micro]]]

    def step_tokens(self, step: int) -> dict:
        ms = [m for per_rank in self.micro[step] for m in per_rank]
        return {"computed": sum(m.computed for m in ms), "real": sum(m.real for m in ms),
                "useful": sum(m.useful for m in ms), "square_lengths": sum(m.square_lengths for m in ms)}

    def rank_ids(self, rank: int) -> list[list[int]]:
        return [m.ids for step in self.micro for m in step[rank]]


def make_model(out: Path, quick: bool, hidden: int = HIDDEN, layers: int = LAYERS) -> Path:
    """The tiny Llama of NOTES.md (hidden 256, 4 layers, 8 heads); --quick uses a smaller one. Other sizes keep
    its proportions (head dim 32, MLP 2.6875 x hidden), to see how a ratio moves as kernels get bigger."""
    from examples.tiny_model import make_tiny_llama

    if quick:
        return make_tiny_llama(out, hidden=64, layers=2, heads=4, kv_heads=4, intermediate=172)
    heads = hidden // 32
    return make_tiny_llama(out, hidden=hidden, layers=layers, heads=heads, kv_heads=heads,
                           intermediate=hidden * 688 // 256)


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def write_fixed_rows(path: Path, rows: int, seed: int) -> None:
    """Documents of ~2x seq_len tokens; `data.truncation: truncate` cuts each to exactly seq_len."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(rows):
            fh.write(json.dumps({"text": _text(rng, SEQ_LEN * 2)}) + "\n")


def write_chat_rows(path: Path, rows: int, seed: int, tokenizer, median: float = 100.0, sigma: float = 0.6) -> dict:
    """One user turn and one assistant turn per row, rendered length ~ log-normal(median, sigma), <= seq_len.

    sigma 0.6 puts the 90th percentile near 2.2x the median, the long tail instruction data has; the
    prompt takes 20-50% of a sample. Lengths are measured with the tokenizer's own chat template.
    """
    rng = random.Random(seed)
    lengths = []
    with open(path, "w") as fh:
        while len(lengths) < rows:
            want = min(SEQ_LEN, max(24, int(round(rng.lognormvariate(math.log(median), sigma)))))
            prompt_share = rng.uniform(0.2, 0.5)
            # ~1.1 tokens per word with this vocabulary, ~10 tokens of template per conversation.
            n_user = max(1, int((want - 10) * prompt_share / 1.1))
            n_answer = max(1, int((want - 10) * (1 - prompt_share) / 1.1))
            messages = [{"role": "user", "content": _text(rng, n_user)},
                        {"role": "assistant", "content": _text(rng, n_answer)}]
            n = len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
            while n > SEQ_LEN:
                n_answer = max(1, n_answer - (n - SEQ_LEN))
                messages[1]["content"] = _text(rng, n_answer)
                n = len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
            fh.write(json.dumps({"messages": messages}) + "\n")
            lengths.append(n)
    a = np.array(lengths)
    return {"rows": rows, "median": int(np.median(a)), "p10": int(np.percentile(a, 10)),
            "p90": int(np.percentile(a, 90)), "max": int(a.max()), "mean": round(float(a.mean()), 1)}


def shardtune_yaml(path: Path, model: Path, data: Path, workload: str, cache: Path, grad_accum: int, seed: int) -> Path:
    """The run config the bench launches (stage, steps and output_dir come as overrides)."""
    data_cfg = {"path": str(data), "format": "text" if workload == "fixed" else "messages", "seq_len": SEQ_LEN,
                "cache_dir": str(cache)}
    if workload == "fixed":
        data_cfg["truncation"] = "truncate"
    cfg = {
        "model": {"name_or_path": str(model)},
        "data": data_cfg,
        "train": {"max_steps": 10, "micro_batch_size": MICRO, "grad_accum_steps": grad_accum, "lr": LR,
                  "warmup_steps": 0, "seed": seed, "log_every": 1, "precision": "fp32"},
        "zero": {"stage": 2},
        "launch": {"nodes": 1, "procs_per_node": WORLD},
        "wandb": {"mode": "disabled"},
        "output_dir": str(path.parent / "unused"),
    }
    path.write_text(f"# Run: shardtune launch {path} zero.stage=2 output_dir=...\n"
                    "# (written by python -m bench.throughput)\n" + yaml.safe_dump(cfg, sort_keys=False))
    return path


def handwritten_ds_config(stage: int, grad_accum: int) -> dict:
    """The DeepSpeed config a person writes by hand for this run: the batch sizes, AdamW and the ZeRO stage.

    Everything else is DeepSpeed's default: buckets of 5e8 elements, ZeRO-3 prefetch 5e7 and persistence
    threshold 1e5, overlap_comm only at stage 3, contiguous gradients, no clipping, and its own AdamW
    kernel (FusedAdam, JIT-built for the CPU on first use). The minimal loop and the Trainer train with
    it, so the floor does not inherit any choice shardtune makes.
    """
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": grad_accum,
            "optimizer": {"type": "AdamW", "params": {"lr": LR}}, "zero_optimization": {"stage": stage}}


def load_prepared(run_dir: Path):
    """What shardtune's ranks load at start-up: (resolved config, tokenizer, Prepared) - the same cache entry."""
    from launcher.contract.config import validate_config
    from launcher.contract.run_dir import RunDir
    from trainer.data.prepare import load_tokenizer, prepare

    cfg = validate_config(RunDir(run_dir).read_config())
    tok = load_tokenizer(cfg)
    return cfg, tok, prepare(cfg, tok, log=lambda _msg: None)


def packed_schedule(cfg, data, steps: int) -> Schedule:
    """shardtune's batches: its sampler and rank split, widths as its collate pads them."""
    from trainer.data.collate import collate
    from trainer.data.sampler import DataPosition, GlobalBatchSampler, rank_micro_batches

    t = cfg.train
    sampler = GlobalBatchSampler(len(data), t.global_batch_size, t.seed, cfg.data.shuffle)
    pos, out = DataPosition(), []
    for _ in range(steps):
        indices, pos = sampler.next_batch(pos)
        per_rank = []
        for rank in range(WORLD):
            micros = []
            for m in rank_micro_batches(indices, rank, WORLD, t.micro_batch_size):
                batch = collate(data, m, 0, separation="none")
                lengths = data.sample_lengths(m).astype(np.int64)
                micros.append(Micro(rows=len(m), width=batch.input_ids.shape[1], real=batch.real_tokens,
                                    useful=int(data.n_targets[m].sum()), ids=[int(k) for k in m],
                                    square_lengths=int((lengths ** 2).sum())))
            per_rank.append(micros)
        out.append(per_rank)
    return Schedule(out)


def check_fixed(data) -> dict:
    """Every packed sequence is one sample of exactly seq_len tokens and every label is trained."""
    lens = np.diff(np.asarray(data.seq_starts))
    samples_per_seq = np.diff(np.asarray(data.sample_starts))
    problems = []
    if not (lens == SEQ_LEN).all():
        problems.append(f"sequence lengths {sorted(set(lens.tolist()))[:5]} != {SEQ_LEN}")
    if not (samples_per_seq == 1).all():
        problems.append("some sequences hold more than one sample")
    if (np.asarray(data.labels) == -100).any():
        problems.append("some labels are masked")
    if not (np.asarray(data.n_targets) == SEQ_LEN - 1).all():
        problems.append(f"targets per sequence {sorted(set(np.asarray(data.n_targets).tolist()))[:5]} != {SEQ_LEN - 1}")
    if problems:
        raise RuntimeError("fixed-length workload is not what it should be: " + "; ".join(problems))
    return {"sequences": len(lens), "tokens_per_sequence": SEQ_LEN, "trained_positions_per_sequence": SEQ_LEN - 1}


def unpacked_samples(data) -> list[tuple[np.ndarray, np.ndarray]]:
    """The samples inside the packed set, as (ids, labels), in packed order."""
    tokens, labels = np.asarray(data.tokens), np.asarray(data.labels)
    lens = np.asarray(data.sample_lens)
    starts = np.concatenate([[0], np.cumsum(lens)])
    return [(tokens[a:b], labels[a:b]) for a, b in zip(starts[:-1], starts[1:])]


def trainer_layout(samples: list[tuple[np.ndarray, np.ndarray]],
                   order: list[list[list[int]]]) -> tuple[list[int], Schedule]:
    """Dataset order for the HF Trainer and the batches it then trains on.

    With `train_sampling_strategy="sequential"`, accelerate hands micro-batch j of the dataloader
    to rank j % world. order[step][rank] lists that rank's samples in that step (grad_accum × micro
    of them), so the dataset is laid out step by step, micro by micro, rank by rank.
    """
    layout, sched = [], []
    for per_rank in order:
        chunks = [[ids[i:i + MICRO] for i in range(0, len(ids), MICRO)] for ids in per_rank]
        step = [[] for _ in range(WORLD)]
        for m in range(len(chunks[0])):
            for rank in range(WORLD):
                rows = chunks[rank][m]
                layout += rows
                lens = [len(samples[i][0]) for i in rows]
                useful = sum(int((samples[i][1][1:] != -100).sum()) for i in rows)
                step[rank].append(Micro(rows=len(rows), width=max(lens), real=sum(lens), useful=useful, ids=rows,
                                        square_lengths=sum(n * n for n in lens)))
        sched.append(step)
    return layout, Schedule(sched)


def trainer_order_fixed(schedule: Schedule) -> list[list[list[int]]]:
    """The Trainer trains on exactly shardtune's sequences, step by step and rank by rank."""
    return [[[i for m in per_rank for i in m.ids] for per_rank in step] for step in schedule.micro]


def trainer_order_variable(n_samples: int, steps: int, grad_accum: int, seed: int) -> list[list[list[int]]]:
    """A seeded shuffle of all samples (what the Trainer's random sampler does), cut into steps and ranks."""
    per_rank = grad_accum * MICRO
    need = steps * per_rank * WORLD
    rng = np.random.default_rng(seed)
    stream: list[int] = []
    while len(stream) < need:
        stream += rng.permutation(n_samples).tolist()
    return [[stream[(s * WORLD + r) * per_rank:(s * WORLD + r + 1) * per_rank] for r in range(WORLD)]
            for s in range(steps)]


def save_minimal_batches(out_dir: Path, data, schedule: Schedule, pad_id: int, with_mask: bool) -> list[Path]:
    """Per rank, the exact tensors of every micro-batch (built by shardtune's collate), ready to train on."""
    import torch

    from trainer.data.collate import collate

    paths = []
    for rank in range(WORLD):
        steps = []
        for step in schedule.micro:
            micros = []
            for m in step[rank]:
                b = collate(data, np.array(m.ids), pad_id, separation="mask" if with_mask else "none")
                micro = {"input_ids": b.input_ids, "targets": b.targets}
                if with_mask:
                    micro.update(position_ids=b.position_ids, attention_mask=b.attention_mask)
                micros.append(micro)
            steps.append(micros)
        path = out_dir / f"minimal_rank{rank}.pt"
        torch.save(steps, path)
        paths.append(path)
    return paths


def save_trainer_dataset(path: Path, samples, layout: list[int]) -> Path:
    rows = [{"idx": int(i), "input_ids": samples[i][0].tolist(), "labels": samples[i][1].tolist()} for i in layout]
    path.write_text(json.dumps(rows))
    return path
