"""`shardtune prepare CONFIG [section.field=value …] [--json] [--show N]`: preprocess ahead of time.

Run it on a CPU node before a GPU job: the job's ranks then find the cache built (same key) and
start training at once, and a bad row fails here instead of after a day in the queue. `--show N`
prints the first N sequences of epoch 0 exactly as the model will see them.

The trainer (and so torch and transformers) is imported inside the command: the launcher must stay
instant for `plan` on a login node.
"""
from __future__ import annotations

import json as _json
import sys

from launcher.config import load_config


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def prepare_command(config: str, *overrides: str, json: bool = False, show: int = 0) -> None:
    """Tokenize, mask, pack and cache a run config's data; print the summary, or N sequences with --show N.

    --json: one JSON object (the summary); with --show N, N JSON lines instead (input_ids, labels with -100
    where no loss is taken, position_ids, sample_lengths), and the summary goes to stderr.
    """
    cfg = load_config(config, [str(o) for o in overrides])
    from trainer.build_once import BuildFailed
    from trainer.data.prepare import DataError, load_tokenizer, prepare
    from trainer.data.render import TemplateError
    from trainer.data.show import first_in_training_order, format_record, format_summary, sequence_record
    from trainer.data.sources import SourceError

    try:
        tokenizer = load_tokenizer(cfg)
        prepared = prepare(cfg, tokenizer, log=_stderr)
    except (DataError, TemplateError, SourceError, BuildFailed) as exc:
        _stderr(f"shardtune prepare: {exc}")
        raise SystemExit(1) from None
    summary = prepared.summary
    if not show:
        print(_json.dumps(summary, indent=2) if json else format_summary(summary))
        return
    if json:
        _stderr(format_summary(summary))
    else:
        print(format_summary(summary))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    color = sys.stdout.isatty()
    order = first_in_training_order(prepared.train, int(show), cfg.train.seed, cfg.data.shuffle)
    for n, k in enumerate(order, start=1):
        record = sequence_record(prepared.train, int(k), pad_id)
        print(_json.dumps(record) if json else "\n" + format_record(record, tokenizer, n, cfg.data.seq_len, color))
