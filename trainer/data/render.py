"""Render samples with the tokenizer's chat template and mark, token by token, what carries loss.

The trained spans come from the template itself: the text of the conversation up to an assistant
turn (with the generation prompt) and up to the end of that turn are both prefixes of the full
rendering, so the characters between them are exactly the assistant's content and end-of-turn
token. Tokens are then labelled through the tokenizer's character offsets: a token carries loss when
it covers any character of a trained span, so no part of an answer is ever left unlabelled. No role
strings are searched for, so it holds for any template that renders conversations prefix-stably,
and says so when one does not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from launcher.contract.errors import UserError
from trainer.data.formats import BadRow, Conversation

IGNORE = -100

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML}


class TemplateError(UserError):
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


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: Optional[tuple[tuple[int, int], ...]]
    """Sorted, disjoint character spans that carry loss; None for a plain document (every token)."""


def labels_from_offsets(ids: np.ndarray, offsets: np.ndarray, spans: tuple[tuple[int, int], ...]) -> np.ndarray:
    """ids where the token overlaps a trained span, IGNORE elsewhere; one vectorised pass per sample."""
    if not spans or not len(ids):
        return np.full(len(ids), IGNORE, dtype=np.int32)
    starts = offsets[:, 0]
    ends = np.maximum(offsets[:, 1], starts + 1)  # a zero-width token still sits at its position
    span_starts = np.array([s for s, _ in spans])
    span_ends = np.array([e for _, e in spans])
    # The first span that ends after the token starts is the only one the token can overlap.
    k = np.searchsorted(span_ends, starts, side="right")
    inside = k < len(spans)
    inside[inside] = span_starts[k[inside]] < ends[inside]
    return np.where(inside, ids, IGNORE).astype(np.int32)


def _compiled_template(tokenizer):
    """The tokenizer's compiled template (transformers caches it), or None where that internal API is gone."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        return _compile_jinja_template(tokenizer.get_chat_template())
    except Exception:  # noqa: BLE001 - any failure just means the public (slower) path is used
        return None


class Renderer:
    """Sample -> (input_ids, labels) with labels = IGNORE wherever no loss is taken.

    A row renders 1 + 2 × (assistant turns) times, so rendering dominates preprocessing. Rows are
    already plain dicts of strings, so they go to the compiled template directly, skipping the deep
    copy apply_chat_template makes of every input; the first conversation is rendered both ways,
    and any difference switches back to apply_chat_template for good.
    """

    def __init__(self, tokenizer, train_on: str = "assistant"):
        self.tok = tokenizer
        self.train_on = train_on
        self.eos = tokenizer.eos_token_id
        self._template = None
        self._checked = False
        self._special: dict = {}

    def __getstate__(self) -> dict:  # datasets ships the renderer to its workers; compiled templates do not pickle
        return {**self.__dict__, "_template": None, "_checked": False}

    def _slow(self, messages: Conversation, generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _render(self, messages: Conversation, generation_prompt: bool) -> str:
        if not self._checked:
            self._checked = True
            self._template = _compiled_template(self.tok)
            self._special = dict(self.tok.special_tokens_map)
            if self._template is not None and any(
                    self._fast(messages, gp) != self._slow(messages, gp) for gp in (False, True)):
                self._template = None
        if self._template is None:
            return self._slow(messages, generation_prompt)
        return self._fast(messages, generation_prompt)

    def _fast(self, messages: Conversation, generation_prompt: bool) -> str:
        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=generation_prompt, **self._special)
        except Exception:  # noqa: BLE001 - let the public path raise the template's own error
            return self._slow(messages, generation_prompt)

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
            # A conversation usually ends with its last answer: then that turn's prefix is the whole thing.
            through = full if i + 1 == len(messages) else self._render(messages[: i + 1], False)
            if not (full.startswith(before) and full.startswith(through) and len(through) > len(before)):
                raise TemplateError(
                    "the chat template does not render conversations prefix-stably (turn "
                    f"{i} renders differently inside the whole conversation), so exact masks cannot be derived; "
                    "set data.chat_template to a template that does")
            # The turn ends with its end-of-turn token; whitespace after it is layout, not something to learn.
            spans.append((len(before), len(through.rstrip())))
        return full, spans

    def render(self, sample: Union[str, Conversation]) -> Rendered:
        if isinstance(sample, str):
            return Rendered(sample, None)
        text, spans = self.trained_spans(sample)
        return Rendered(text, tuple(spans))

    def encode_many(self, rendered: list[Rendered]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Tokenize a batch in one call into the Rust tokenizer; labels come from offsets, not Python loops."""
        out: list[tuple[np.ndarray, np.ndarray]] = [None] * len(rendered)  # type: ignore[list-item]
        docs = [i for i, r in enumerate(rendered) if r.spans is None]
        chats = [i for i, r in enumerate(rendered) if r.spans is not None]
        if docs:
            enc = self.tok([rendered[i].text for i in docs], add_special_tokens=True)["input_ids"]
            for i, ids in zip(docs, enc):
                if self.eos is not None and (not ids or ids[-1] != self.eos):
                    ids = ids + [self.eos]
                arr = np.asarray(ids, dtype=np.int32)
                out[i] = (arr, arr.copy())
        if chats:
            enc = self.tok([rendered[i].text for i in chats], add_special_tokens=False, return_offsets_mapping=True)
            for i, ids, offsets in zip(chats, enc["input_ids"], enc["offset_mapping"]):
                arr = np.asarray(ids, dtype=np.int32)
                out[i] = (arr, labels_from_offsets(arr, np.asarray(offsets, dtype=np.int64).reshape(-1, 2),
                                                   rendered[i].spans))
        return out

    def encode(self, sample: Union[str, Conversation]) -> tuple[np.ndarray, np.ndarray]:
        return self.encode_many([self.render(sample)])[0]


def num_targets(labels: np.ndarray) -> int:
    """Positions that predict a trained token: a label counts from the second token on (shifted loss)."""
    return int((np.asarray(labels[1:]) != IGNORE).sum())


def fit_length(ids: np.ndarray, labels: np.ndarray, seq_len: int, truncation: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """Apply data.truncation; returns the (maybe cut) sample and whether it was cut. Raises BadRow to drop."""
    if len(ids) <= seq_len:
        return ids, labels, False
    if truncation == "drop":
        raise BadRow("too_long", f"{len(ids)} tokens > seq_len {seq_len} (data.truncation=drop)")
    return ids[:seq_len], labels[:seq_len], True
