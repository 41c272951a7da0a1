"""Evaluation helpers for chat models: batched greedy generation, exact match, and the
loss on assistant tokens.

Device-agnostic (inputs go to the model's device) and free of DeepSpeed, so the same
code scores a base model, a consolidated checkpoint, or a model inside a training
process. Rows are in ``messages`` format::

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

Messages = list[dict[str, str]]

# End-of-turn tokens of common chat templates; those present in the vocabulary stop
# generation in addition to the tokenizer's and the generation config's EOS.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _messages_of(row: Any) -> Messages:
    if isinstance(row, dict):
        return row["messages"]
    return list(row)


def _require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "The tokenizer has no chat template; evaluation renders prompts with "
            "tokenizer.apply_chat_template and needs one."
        )


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end an assistant turn (EOS of tokenizer and generation config,
    plus known end-of-turn tokens such as ``<|im_end|>`` if in the vocabulary)."""
    ids: list[int] = []

    def add(x):
        if x is None:
            return
        for i in x if isinstance(x, (list, tuple)) else [x]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))

    add(tokenizer.eos_token_id)
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None:
        add(gen_cfg.eos_token_id)
    vocab = tokenizer.get_vocab()
    for t in _END_OF_TURN_TOKENS:
        if t in vocab:
            add(vocab[t])
    if not ids:
        raise ValueError("Cannot tell where a turn ends: the tokenizer has no EOS token.")
    return ids


def _pad_id(tokenizer, stops: Sequence[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(stops[0])  # any id works under the attention mask


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    prompts_messages: list[Messages],
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers to each conversation, in input order.

    Each prompt is a list of messages ending with the turn to answer; a trailing
    assistant message (the reference answer of an eval row) is dropped. Prompts are
    rendered with the chat template and ``add_generation_prompt=True``, left-padded
    (independently of ``tokenizer.padding_side``), grouped by length, and decoded
    greedily until an end-of-turn token or ``max_new_tokens``. The answers are
    decoded without special tokens and are not stripped.
    """
    _require_chat_template(tokenizer)
    stops = stop_token_ids(model, tokenizer)
    pad = _pad_id(tokenizer, stops)
    device = _model_device(model)

    encoded: list[list[int]] = []
    for msgs in prompts_messages:
        msgs = list(msgs)
        if msgs and msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        encoded.append(tokenizer(text, add_special_tokens=False)["input_ids"])

    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids = encoded[i]
                input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attention[row, width - len(ids):] = 1
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=stops,
                pad_token_id=pad,
            )
            new = out[:, width:].tolist()
            for row, i in enumerate(idx):
                toks = new[row]
                for j, t in enumerate(toks):
                    if t in stops:
                        toks = toks[:j]
                        break
                answers[i] = tokenizer.decode(toks, skip_special_tokens=True)
    finally:
        if was_training:
            model.train()
    return answers


def exact_match(pred: str, ref: str) -> bool:
    """True if prediction and reference are equal after stripping surrounding whitespace."""
    return pred.strip() == ref.strip()


def read_eval_rows(path: str) -> list[Messages]:
    """Conversations of a messages-format file (the last assistant turn is the reference answer)."""
    from launcher.config import DataFields
    from trainer.data.formats import BadRow, parse_json, to_sample
    from trainer.data.sources import read_rows

    rows = []
    for raw in read_rows(path):
        try:
            rows.append(to_sample(parse_json(raw.text), "messages", DataFields()))
        except BadRow as exc:
            raise ValueError(f"{raw.where}: {exc}") from None
    return rows


@torch.no_grad()
def eval_loss(model, tokenizer, rows: Iterable[Any], batch_size: int = 8) -> float:
    """Token-weighted mean cross-entropy on the assistant tokens, masked exactly as in training."""
    from trainer.data.collate import collate
    from trainer.data.packing import build_packed, one_per_sequence
    from trainer.data.render import Renderer
    from trainer.model import token_loss_sum

    import numpy as np

    renderer = Renderer(tokenizer, "assistant")
    encoded = [renderer.encode(_messages_of(r)) for r in rows]
    ids = [np.asarray(i) for i, _ in encoded]
    packed = build_packed(ids, [np.asarray(lab) for _, lab in encoded], one_per_sequence(ids))
    pad = _pad_id(tokenizer, stop_token_ids(model, tokenizer))
    device = _model_device(model)
    order = np.argsort([len(i) for i in ids], kind="stable")
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = collate(packed, order[start:start + batch_size], pad).to(device)
            total += float(token_loss_sum(model(**batch.model_inputs()).logits, batch.targets))
            count += int((batch.targets != -100).sum())
    finally:
        if was_training:
            model.train()
    if count == 0:
        raise ValueError("No assistant tokens to score.")
    return total / count


def evaluate_model(model_dir: str, data: str, max_new_tokens: int = 48, batch_size: int = 16, examples: int = 3) -> dict:
    """Exact match of greedy answers and assistant-token loss of a Hugging Face model on a messages file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = read_eval_rows(data)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    references = [r[-1]["content"] for r in rows]
    answers = generate_answers(model, tokenizer, rows, max_new_tokens, batch_size)
    hits = [exact_match(a, ref) for a, ref in zip(answers, references)]
    loss = eval_loss(model, tokenizer, rows, batch_size=8)
    return {"model": str(model_dir), "data": str(data), "rows": len(rows), "exact_match": sum(hits) / len(rows),
            "eval_loss": loss, "perplexity": float(torch.tensor(loss).exp()),
            "examples": [{"prompt": r[-2]["content"], "reference": ref, "answer": a, "correct": h}
                         for r, ref, a, h in list(zip(rows, references, answers, hits))[:examples]]}


def format_report(result: dict) -> str:
    """A short table: exact match and loss, before and after when both are there, and example answers."""
    runs = [("before", result["before"]), ("after", result["after"])] if "after" in result else [("model", result)]
    lines = [f"{'':8} {'exact match':>12} {'eval loss':>10}  model"]
    lines += [f"{name:8} {r['exact_match']:>12.3f} {r['eval_loss']:>10.4f}  {r['model']}" for name, r in runs]
    final = runs[-1][1]
    for i, example in enumerate(final["examples"]):
        lines += ["", f"example {i + 1}: {example['prompt']}", f"  reference: {example['reference']}"]
        for name, r in runs:
            if i < len(r["examples"]):
                mark = "ok " if r["examples"][i]["correct"] else "no "
                lines.append(f"  {name:9}{mark}{r['examples'][i]['answer'].strip()}")
    return "\n".join(lines)
