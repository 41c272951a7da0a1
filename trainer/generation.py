"""Greedy answers from a chat model: rendered with its own chat template, stopped at its end-of-turn token.

Used at the end of a run (the sample answer), by `shardtune eval` and by `shardtune chat`, so all three
see a model the same way. Device-agnostic (inputs go to the model's device) and free of DeepSpeed.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch

from trainer.data.collate import pad_id_of
from trainer.data.formats import Chat
from trainer.model import load_saved_model

Messages = list[dict[str, Any]]

# End-of-turn tokens of common chat templates; those present in the vocabulary stop
# generation in addition to the tokenizer's and the generation config's EOS.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def messages_of(row: Any) -> Messages:
    if isinstance(row, Chat):
        return row.messages
    if isinstance(row, dict):
        return row["messages"]
    return list(row)


def tools_of(row: Any) -> Optional[list[dict]]:
    """The tool definitions a conversation's template is given: a Chat's (validated by to_chat); None otherwise."""
    return row.tools if isinstance(row, Chat) else None


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


def generation_pad_id(tokenizer, stops: Sequence[int]) -> int:
    pad = pad_id_of(tokenizer)
    return int(stops[0]) if pad is None else pad  # any id works under the attention mask


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    prompts_messages: list[Messages | Chat],
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers to each conversation, in input order.

    Each prompt is a list of messages ending with the turn to answer, or a Chat whose
    tool definitions the template is given too; a trailing assistant message (the
    reference answer of an eval row) is dropped. Prompts are
    rendered with the chat template and ``add_generation_prompt=True``, left-padded
    (independently of ``tokenizer.padding_side``), grouped by length, and decoded
    greedily until an end-of-turn token or ``max_new_tokens``. The answers are
    decoded without special tokens and are not stripped.
    """
    _require_chat_template(tokenizer)
    stops = stop_token_ids(model, tokenizer)
    pad = generation_pad_id(tokenizer, stops)
    device = model_device(model)

    encoded: list[list[int]] = []
    for prompt in prompts_messages:
        msgs = list(messages_of(prompt))
        if msgs and msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]
        text = tokenizer.apply_chat_template(msgs, tools=tools_of(prompt), tokenize=False, add_generation_prompt=True)
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


def generate_reply(model_dir: str, prompt: str, system: str | None = None, max_new_tokens: int = 256,
                   dtype: str | torch.dtype = torch.float32, trust_remote_code: bool = False) -> str:
    """One greedy answer of a saved model to one user message (dtype "auto": the dtype it was saved in, which
    holds a bf16 model in half the memory fp32 would take)."""
    from transformers import AutoTokenizer

    model = load_saved_model(model_dir, dtype, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return generate_answers(model, tokenizer, [messages], max_new_tokens, batch_size=1)[0].strip()
