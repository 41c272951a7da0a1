"""What the model is trained on, for `shardtune prepare`: the summary, and sequences token by token.

Sequences are shown through `collate`, the function the training loop uses, so what is printed is
what the model gets: input ids, position ids, and the labels its loss is scored against. Labels
use the Hugging Face convention (not shifted: the prediction made at position t-1 is scored against
labels[t]), which makes them the collated targets shifted right by one. So the first token of every
sample has no label: nothing in its own sample comes before it.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from trainer.data.collate import collate
from trainer.data.packing import PackedSet
from trainer.data.render import IGNORE, METHODS
from trainer.data.sampler import GlobalBatchSampler

TRAINED_TTY = ("\033[1;32m", "\033[0m")
TRAINED_PLAIN = ("«", "»")


def first_in_training_order(data: PackedSet, n: int, seed: int, shuffle: bool) -> np.ndarray:
    """The first n sequences of epoch 0, in the order training takes them (the same for any world size)."""
    if not len(data):
        return np.zeros(0, dtype=np.int64)
    return GlobalBatchSampler(len(data), 1, seed, shuffle).order(0)[:n]


def sequence_record(data: PackedSet, k: int, pad_id: int) -> dict:
    """One stored sequence as the model sees it (one JSON line of `--show N --json`)."""
    batch = collate(data, np.array([k]), pad_id, separation="none", multiple_of=1)
    targets = batch.targets[0].numpy()
    labels = np.concatenate([[IGNORE], targets[:-1]])
    _, _, lens = data.sequence(k)
    record = {"sequence": int(k), "input_ids": batch.input_ids[0].tolist(), "labels": labels.tolist(),
              "position_ids": batch.position_ids[0].tolist(), "sample_lengths": [int(x) for x in lens]}
    if data.sample_method is not None:
        at = slice(int(data.sample_starts[k]), int(data.sample_starts[k + 1]))
        record["sample_methods"] = [METHODS[int(m)] for m in data.sample_method[at]]
        record["sample_turns"] = [int(t) for t in data.sample_turn[at]]
    return record


def _how(record: dict, n: int) -> str:
    """How sample n's trained spans were found, for its header line (nothing for documents)."""
    if "sample_methods" not in record or record["sample_methods"][n] == "document":
        return ""
    method, turn = record["sample_methods"][n], record["sample_turns"][n]
    return f", {method}" + (f" (trains assistant turn {turn})" if turn else "")


def _runs(flags: np.ndarray) -> Iterator[tuple[int, int, bool]]:
    """(start, end, flag) of each stretch of equal flags."""
    cuts = np.flatnonzero(np.diff(flags.astype(np.int8))) + 1
    bounds = np.concatenate([[0], cuts, [len(flags)]])
    for a, b in zip(bounds[:-1], bounds[1:]):
        yield int(a), int(b), bool(flags[a])


def format_record(record: dict, tokenizer, order_index: int, seq_len: int, color: bool) -> str:
    """A sequence for people: sample boundaries marked, trained spans highlighted (colour or «…»)."""
    ids, labels = np.array(record["input_ids"]), np.array(record["labels"])
    positions = record["position_ids"]
    trained = labels != IGNORE
    open_, close = TRAINED_TTY if color else TRAINED_PLAIN
    lens = record["sample_lengths"]
    out = [f"=== sequence {order_index} of epoch 0 (stored #{record['sequence']}): {len(ids)}/{seq_len} tokens, "
           f"{len(lens)} sample(s), {int(trained.sum())} trained ==="]
    start = 0
    for n, length in enumerate(lens, start=1):
        end = start + length
        out.append(f"--- sample {n}/{len(lens)}: {length} tokens, "
                   f"position_ids {positions[start]}..{positions[end - 1]}, "
                   f"{int(trained[start:end].sum())} trained{_how(record, n - 1)} ---")
        text = []
        for a, b, on in _runs(trained[start:end]):
            piece = tokenizer.decode(ids[start + a:start + b].tolist(), skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
            text.append(f"{open_}{piece}{close}" if on else piece)
        out.append("".join(text))
        start = end
    return "\n".join(out)


def _stats_line(s: dict) -> str:
    return (f"{s['sequences']:,} sequences, {s['tokens']:,} tokens ({s['trained_tokens']:,} trained), "
            f"{s['pad_tokens']:,} padding, packing efficiency {s['packing_efficiency']:.1%}")


def _reasons(counts: dict) -> str:
    return ", ".join(f"{r} {n}" for r, n in sorted(counts.items())) or "none"


MASK_WORDS = {"prefix_stable": "rendered once (prefix-stable)", "per_turn": "per_turn (a sample per assistant turn)",
              "whole": "whole (turns located in one rendering)", "all": "all tokens", "document": "documents"}


def _masks_line(m: dict) -> str:
    """Which method gave the trained spans, per row: what `prepare` says about the chat template."""
    order = sorted(m["rows"], key=lambda k: METHODS.index(k) if k in METHODS else len(METHODS))
    parts = [f"{m['rows'][k]:,} rows {MASK_WORDS.get(k, k)}"
             + (f" -> {m['samples'][k]:,} samples" if k == "per_turn" else "") for k in order]
    line = f"masks (data.multi_turn={m['multi_turn']}): {'; '.join(parts) or 'none'}"
    if m["multi_turn"] == "auto" and m["rows"].get("per_turn"):
        line += ("\n  the chat template renders those per_turn rows differently once later turns follow (not "
                 "prefix-stably), so each of their assistant turns is trained in its own sample")
    return line


def format_data_summary(s: dict) -> str:
    """The human form of the `--json` summary."""
    skipped = sum(s["rows_skipped"].values())
    dropped = (f"; per_turn samples dropped: {_reasons(s['turns_dropped'])}" if s.get("turns_dropped") else "")
    lines = [f"rows: {s['rows_read']:,} read, {s['rows_kept']:,} kept, {skipped:,} skipped "
             f"({_reasons(s['rows_skipped'])}), {s['rows_truncated']:,} truncated{dropped}",
             f"train: {s['samples']:,} samples -> {_stats_line(s)} (seq_len {s['seq_len']})"]
    if len(s.get("sources", [])) > 1:
        for src in s["sources"]:
            lines.append(f"  {src['path']} (weight {src['weight']}): {src['rows_kept']:,} rows kept, "
                         f"{src['samples']:,} samples in the mixture")
    if s.get("masks"):
        lines.append(_masks_line(s["masks"]))
    e = s.get("eval")
    if e:
        rows = (f"{e['rows_read']:,} rows read, {e['rows_kept']:,} kept, skipped: {_reasons(e['rows_skipped'])}; "
                if e["from"] == "eval_path" else "held out from the training rows; ")
        stats = _stats_line(e) if "sequences" in e else "no sequences"
        lines.append(f"eval ({e['from']}): {rows}{e['samples']:,} samples -> {stats}")
    else:
        lines.append("eval: none (set data.eval_path or data.eval_fraction)")
    how = "cache hit: reused" if s["cache_hit"] else f"built in {s['build_seconds']:.1f} s"
    lines.append(f"cache: {s['cache_dir']} ({how})")
    return "\n".join(lines)


def summary_metrics(s: dict) -> dict:
    """The summary flattened for metrics.jsonl / wandb (`data/...` keys), skip counts per reason included."""
    out = {f"data/{k}": s[k] for k in ("rows_read", "rows_kept", "rows_truncated", "samples", "sequences", "tokens",
                                      "trained_tokens", "pad_tokens", "packing_efficiency")}
    out.update({f"data/skipped/{reason}": n for reason, n in s["rows_skipped"].items()})
    out.update({f"data/masks/{method}": n for method, n in s.get("masks", {}).get("rows", {}).items()})
    out["data/cache_hit"] = int(bool(s.get("cache_hit")))
    return out
