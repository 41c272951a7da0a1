"""Render samples with the tokenizer's chat template and mark, token by token, what carries loss.

Which characters of a rendering are trained is decided in `turn_spans` from the template itself
(prefix-stable conversations in one sample, others per turn or located with sentinels); this module
renders, keeps each row's tools and extra per-message keys on their way to the template, and labels
tokens through the tokenizer's character offsets: a token carries loss when it covers any character
of a trained span, so no part of an answer is ever left unlabelled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from launcher.contract.errors import UserError
from trainer.data.formats import BadRow, Chat, Conversation
from trainer.data.template_support import Support, check_support, probe
from trainer.data.turn_spans import (
    Renders,
    Span,
    assistant_turns,
    per_turn_samples,
    prefix_stable_spans,
    reasoning_spans,
    whole_spans,
    without,
)

IGNORE = -100

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML}


class TemplateError(UserError):
    """The chat template cannot give exact masks (missing, or a conversation that needs several samples)."""


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


METHODS = ("document", "all", "prefix_stable", "per_turn", "whole")
"""How a sample's trained spans were found (stored per sample as the index into this tuple)."""


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: Optional[tuple[tuple[int, int], ...]]
    """Sorted, disjoint character spans that carry loss; None for a plain document (every token)."""
    method: str = "document"
    """One of METHODS."""
    turn: int = 0
    """per_turn: the assistant turn (1-based) this sample trains; 0 when a sample trains all of its row's turns."""


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


class Renderer:
    """Sample -> one or more (input_ids, labels), with labels = IGNORE wherever no loss is taken.

    Rendering dominates preprocessing (a row renders 1 + 2 x its assistant turns times), so rows, which
    are already plain JSON data, go to the compiled template directly, skipping the deep copy
    apply_chat_template makes of every input. The first conversation (with and without tools) is
    rendered both ways, and any difference switches back to apply_chat_template for good.
    """

    def __init__(self, tokenizer, train_on: str = "assistant", multi_turn: str = "auto",
                 train_on_reasoning: bool = True):
        self.tok = tokenizer
        self.train_on, self.multi_turn, self.train_on_reasoning = train_on, multi_turn, train_on_reasoning
        self.eos = tokenizer.eos_token_id
        self._compiled: dict[bool, object] = {}
        self._special: dict = {}
        self._support: Optional[Support] = None

    def __getstate__(self) -> dict:  # datasets ships the renderer to its workers; compiled templates do not pickle
        return {**self.__dict__, "_compiled": {}}

    def _slow(self, messages: Conversation, generation_prompt: bool, tools: Optional[list]) -> str:
        try:
            return self.tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                                add_generation_prompt=generation_prompt)
        except Exception as exc:  # noqa: BLE001 - a template that fails on a row makes that row bad, not the run
            raise BadRow("template_error",
                         f"the chat template fails on this row: {type(exc).__name__}: {exc}") from None

    def _check_fast_path(self, messages: Conversation, tools: Optional[list]) -> None:
        """Compile the template for rows with (or without) tools and keep it if it renders like the public API.

        Decided on the first conversation that renders at all: one the template fails on decides nothing.
        """
        self._special = dict(self.tok.special_tokens_map)
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            template = _compile_jinja_template(self.tok.get_chat_template(None, tools))
            direct = [self._direct(template, messages, gp, tools) for gp in (False, True)]
        except Exception:  # noqa: BLE001 - the internal API is gone, or this row fails: the public path decides
            template, direct = None, None
        public = [self._slow(messages, gp, tools) for gp in (False, True)]  # raises BadRow for a failing row
        self._compiled[tools is not None] = template if direct == public else None

    def _direct(self, template, messages: Conversation, generation_prompt: bool, tools: Optional[list]) -> str:
        return template.render(messages=messages, tools=tools, documents=None,
                               add_generation_prompt=generation_prompt, **self._special)

    def _render(self, messages: Conversation, generation_prompt: bool, tools: Optional[list] = None) -> str:
        if (tools is not None) not in self._compiled:
            self._check_fast_path(messages, tools)
        template = self._compiled[tools is not None]
        if template is not None:
            try:
                return self._direct(template, messages, generation_prompt, tools)
            except Exception:  # noqa: BLE001 - let the public path raise the template's own error
                pass
        return self._slow(messages, generation_prompt, tools)

    @property
    def support(self) -> Support:
        """What the template renders beyond roles and content (probed once per process)."""
        if self._support is None:
            self._support = probe(self._render)
        return self._support

    def render_samples(self, sample: Union[str, Conversation, Chat]) -> list[Rendered]:
        """A row's training samples: one, or one per assistant turn where it renders per_turn."""
        if isinstance(sample, str):
            return [Rendered(sample, None)]
        chat = sample if isinstance(sample, Chat) else Chat(list(sample))
        check_support(chat.messages, chat.tools, self.support)
        r = Renders(lambda messages, gp: self._render(messages, gp, chat.tools), chat.messages)
        if self.train_on == "all":
            return [Rendered(r.full, ((0, len(r.full)),), "all")]
        turns = assistant_turns(chat.messages, last_only=self.train_on == "last_assistant")
        if self.multi_turn == "whole":
            return [self._masked(r, len(chat.messages), r.full, list(zip(turns, whole_spans(r, turns))), "whole")]
        if self.multi_turn == "auto":
            spans = prefix_stable_spans(r, turns)
            if spans is not None:
                return [self._masked(r, len(chat.messages), r.full, list(zip(turns, spans)), "prefix_stable")]
        numbers = {i: k for k, i in enumerate(assistant_turns(chat.messages, last_only=False), start=1)}
        return [self._masked(r, i + 1, text, [(i, span)], "per_turn", numbers[i])
                for i, (text, span) in zip(turns, per_turn_samples(r, turns))]

    def _masked(self, r: Renders, n: int, text: str, turn_spans: list[tuple[int, Span]], method: str,
                turn: int = 0) -> Rendered:
        """The sample with its turns' spans, reasoning cut out of them under data.train_on_reasoning=false."""
        spans = []
        for i, span in turn_spans:
            holes = [] if self.train_on_reasoning else reasoning_spans(r, n, i, text)
            spans.extend(without([span], holes))
        return Rendered(text, tuple(spans), method, turn)

    def render(self, sample: Union[str, Conversation, Chat]) -> Rendered:
        """The one sample a row renders to; a TemplateError where it renders as one per assistant turn."""
        samples = self.render_samples(sample)
        if len(samples) != 1:
            raise TemplateError(f"the conversation renders as {len(samples)} samples (one per assistant turn: the "
                                "chat template does not render it prefix-stably); use render_samples")
        return samples[0]

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


def num_targets(labels: np.ndarray) -> int:
    """Positions that predict a trained token: a label counts from the second token on (shifted loss)."""
    return int((np.asarray(labels[1:]) != IGNORE).sum())


def fit_length(ids: np.ndarray, labels: np.ndarray, seq_len: int,
               truncation: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """Apply data.truncation; returns the (maybe cut) sample and whether it was cut. Raises BadRow to drop."""
    if len(ids) <= seq_len:
        return ids, labels, False
    if truncation == "drop":
        raise BadRow("too_long", f"{len(ids)} tokens > seq_len {seq_len} (data.truncation=drop)")
    return ids[:seq_len], labels[:seq_len], True
