"""Render samples with the tokenizer's chat template and mark, token by token, what carries loss.

The trained spans come from the template itself: the text of the conversation up to an assistant
turn (with the generation prompt) and up to the end of that turn are both prefixes of the full
rendering, so the characters between them are exactly the assistant's content and end-of-turn
token. Tokens are then labelled through the tokenizer's character offsets. No role strings are
searched for, so it holds for any template that renders conversations prefix-stably, and says so
when one does not.
"""
from __future__ import annotations

from typing import Union

from trainer.data.formats import BadRow, Conversation

IGNORE = -100

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML}


class TemplateError(Exception):
    """The chat template cannot give exact masks (missing, or not prefix-stable)."""


def install_template(tokenizer, template: str | None, needs_template: bool) -> None:
    """Use the configured template (a built-in name or Jinja text), or insist on the tokenizer's own."""
    if template:
        tokenizer.chat_template = BUILTIN_TEMPLATES.get(template, template)
    if needs_template and not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; set data.chat_template "
            f"to Jinja text or a built-in ({', '.join(BUILTIN_TEMPLATES)})")
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError("exact loss masks need a fast (Rust) tokenizer with character offsets")


class Renderer:
    """Sample -> (input_ids, labels) with labels = IGNORE wherever no loss is taken."""

    def __init__(self, tokenizer, train_on: str = "assistant"):
        self.tok = tokenizer
        self.train_on = train_on
        self.eos = tokenizer.eos_token_id

    def _render(self, messages: Conversation, generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def trained_spans(self, messages: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """The full rendering and the character spans that carry loss."""
        full = self._render(messages, False)
        if self.train_on == "all":
            return full, [(0, len(full))]
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.train_on == "last_assistant":
            turns = turns[-1:]
        spans = []
        for i in turns:
            before = self._render(messages[:i], True)
            through = self._render(messages[: i + 1], False)
            if not (full.startswith(before) and full.startswith(through) and len(through) > len(before)):
                raise TemplateError(
                    "the chat template does not render conversations prefix-stably (turn "
                    f"{i} renders differently inside the whole conversation), so exact masks cannot be derived; "
                    "set data.chat_template to a template that does")
            # The turn ends with its end-of-turn token; whitespace after it is layout, not something to learn.
            spans.append((len(before), len(through.rstrip())))
        return full, spans

    def encode(self, sample: Union[str, Conversation]) -> tuple[list[int], list[int]]:
        if isinstance(sample, str):
            ids = self.tok(sample, add_special_tokens=True)["input_ids"]
            if self.eos is not None and (not ids or ids[-1] != self.eos):
                ids = ids + [self.eos]
            return ids, list(ids)
        text, spans = self.trained_spans(sample)
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        labels = []
        for token, (start, _end) in zip(enc["input_ids"], enc["offset_mapping"]):
            inside = any(s <= start < e for s, e in spans)
            labels.append(token if inside else IGNORE)
        return enc["input_ids"], labels


def num_targets(labels: list[int]) -> int:
    """Positions that predict a trained token: a label counts from the second token on (shifted loss)."""
    return sum(1 for x in labels[1:] if x != IGNORE)


def fit_length(ids: list[int], labels: list[int], seq_len: int, truncation: str) -> tuple[list[int], list[int], str]:
    """Apply data.truncation; returns the (maybe cut) sample and a note: '', 'truncated'. Raises to drop."""
    if len(ids) <= seq_len:
        return ids, labels, ""
    if truncation == "drop":
        raise BadRow("too_long", f"{len(ids)} tokens > seq_len {seq_len}")
    return ids[:seq_len], labels[:seq_len], "truncated"
