"""Evaluation helpers for chat models: batched greedy generation, exact match, and the
loss on assistant tokens.

Device-agnostic (inputs go to the model's device) and free of DeepSpeed, so the same
code scores a base model, a consolidated checkpoint, or a model inside a training
process. Rows are in ``messages`` format, with ``tools`` where the conversation has them::

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}], "tools": [...]}

A row is rendered as training renders it (tool definitions in the prompt, one sample per assistant turn where
the template is not prefix-stable), so the eval loss is the loss training minimises.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from trainer.data.formats import Chat
from trainer.generation import generate_answers, generation_pad_id, messages_of, model_device, stop_token_ids, tools_of
from trainer.model import load_saved_model


def exact_match(pred: str, ref: str) -> bool:
    """True if prediction and reference are equal after stripping surrounding whitespace."""
    return pred.strip() == ref.strip()


def reference_answers(tokenizer, rows: list[Chat]) -> list[str]:
    """What a correct answer to each row generates: its last assistant message's content, or, where that message
    calls tools, the turn as the chat template renders it (e.g. ``<tool_call>{...}</tool_call>``): the text training
    teaches the model to write, read from the same masks, decoded like a generated answer (no special tokens)."""
    from trainer.data.render import Renderer

    renderer = Renderer(tokenizer, "last_assistant")
    references = []
    for chat in rows:
        last = chat.messages[-1]
        if not last.get("tool_calls"):
            references.append(last.get("content") or "")
            continue
        sample = renderer.render_samples(chat)[-1]
        turn = "".join(sample.text[start:end] for start, end in sample.spans)
        references.append(tokenizer.decode(tokenizer(turn, add_special_tokens=False)["input_ids"],
                                           skip_special_tokens=True))
    return references


def read_eval_rows(path: str) -> list[Chat]:
    """Conversations of a messages-format file with their tool definitions (the last assistant turn is the
    reference answer)."""
    from launcher.contract.config import DataFields
    from trainer.data.formats import BadRow, parse_json, to_chat
    from trainer.data.sources import read_rows

    rows = []
    for raw in read_rows(path):
        try:
            rows.append(to_chat(parse_json(raw.text), "messages", DataFields()))
        except BadRow as exc:
            raise ValueError(f"{raw.where}: {exc}") from None
    return rows


@torch.no_grad()
def eval_loss(model, tokenizer, rows: Iterable[Any], batch_size: int = 8) -> float:
    """Token-weighted mean cross-entropy on the assistant tokens, masked exactly as in training: a conversation the
    chat template does not render prefix-stably is scored as training sees it, one sample per assistant turn."""
    import numpy as np

    from trainer.data.collate import collate
    from trainer.data.packing import build_packed, one_per_sequence
    from trainer.data.render import Renderer
    from trainer.model import token_loss_sum

    renderer = Renderer(tokenizer, "assistant")
    chats = [Chat(messages_of(r), tools_of(r)) for r in rows]
    encoded = renderer.encode_many([sample for chat in chats for sample in renderer.render_samples(chat)])
    ids = [np.asarray(i) for i, _ in encoded]
    packed = build_packed(ids, [np.asarray(lab) for _, lab in encoded], one_per_sequence(ids))
    pad = generation_pad_id(tokenizer, stop_token_ids(model, tokenizer))
    device = model_device(model)
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


def evaluate_model(model_dir: str, data: str, max_new_tokens: int = 48, batch_size: int = 16,
                   examples: int = 3, trust_remote_code: bool = False) -> dict:
    """Exact match of greedy answers and assistant-token loss of a Hugging Face model on a messages file."""
    from transformers import AutoTokenizer

    rows = read_eval_rows(data)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = load_saved_model(model_dir, torch.float32, trust_remote_code)
    references = reference_answers(tokenizer, rows)
    answers = generate_answers(model, tokenizer, rows, max_new_tokens, batch_size)
    hits = [exact_match(a, ref) for a, ref in zip(answers, references)]
    loss = eval_loss(model, tokenizer, rows, batch_size=8)
    return {"model": str(model_dir), "data": str(data), "rows": len(rows), "exact_match": sum(hits) / len(rows),
            "eval_loss": loss, "perplexity": float(torch.tensor(loss).exp()),
            "examples": [{"prompt": _last_user_words(r), "reference": ref, "answer": a, "correct": h}
                         for r, ref, a, h in list(zip(rows, references, answers, hits))[:examples]]}


def _last_user_words(chat: Chat) -> str:
    """The question an example answers: the last user message (the message before the answer can be a tool's
    result, or a tool call with no content)."""
    return next((m.get("content") or "" for m in reversed(chat.messages) if m["role"] == "user"), "")


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
