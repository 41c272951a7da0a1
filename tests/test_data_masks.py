"""Loss masks: exactly the assistant content and its end-of-turn token carry labels, for any template.

Each check decodes the labelled tokens of every prepared sample and compares them with the strings
the rows hold, so a mask that is off by one token anywhere fails.
"""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
from transformers import AutoTokenizer

from launcher.cli import prepare as prepare_command
from launcher.contract.config import load_config
from trainer.data.collate import collate
from trainer.data.prepare import DataError, prepare
from trainer.data.render import IGNORE, Renderer

from conftest import tiny_config

# The same conversations in other layouts: multi-token text headers instead of special tokens, a BOS,
# trimmed content; and a Mistral-style one with no assistant header, the system prompt folded into
# the first user turn and a space that belongs to the assistant's turn.
LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL_STYLE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' }}"
    "{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
EOS = "<|im_end|>"
# What each template renders as an assistant turn's trained text, from the content.
TURN_TEXT = {None: lambda c: c + EOS, LLAMA3_STYLE: lambda c: c.strip() + EOS, MISTRAL_STYLE: lambda c: " " + c + EOS}

WORDS = "the cat sat on a mat; café 中文 naïve dog bird 42 3.14 (yes) no! json {\"k\": 1} tree".split()


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """Unique multi-turn conversations, half with a system prompt, with unicode and punctuation."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        msgs = [{"role": "system", "content": f"You are assistant {i}. Be brief."}] if i % 2 else []
        for t in range(1 + i % 3):
            msgs.append({"role": "user", "content": f"q{i}.{t}: " + " ".join(rng.choices(WORDS, k=rng.randint(1, 8)))})
            msgs.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 10)))})
        rows.append({"messages": msgs})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def labelled_runs(ids: np.ndarray, labels: np.ndarray, tok) -> list[str]:
    """Each maximal stretch of labelled tokens, decoded."""
    on = labels != IGNORE
    runs, start = [], None
    for t in range(len(ids) + 1):
        if t < len(ids) and on[t] and start is None:
            start = t
        elif (t == len(ids) or not on[t]) and start is not None:
            runs.append(tok.decode(ids[start:t].tolist(), skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False))
            start = None
    return runs


def samples_of(data):
    for k in range(len(data)):
        ids, labels, lens = data.sequence(k)
        for a, b in zip(np.cumsum(lens) - lens, np.cumsum(lens)):
            yield np.asarray(ids[a:b]), np.asarray(labels[a:b])


def by_rendering(rows, tok, template):
    """The conversation of each row, keyed by its full rendering through the public transformers API."""
    return {tok.apply_chat_template(r["messages"], tokenize=False, chat_template=template): r["messages"] for r in rows}


@pytest.mark.parametrize("template", [None, LLAMA3_STYLE, MISTRAL_STYLE],
                         ids=["chatml", "llama3-style", "mistral-style"])
@pytest.mark.parametrize("train_on", ["assistant", "last_assistant"])
def test_labels_are_exactly_assistant_content_and_end_of_turn(tmp_path, tiny_model, tokenizer, template, train_on):
    rows = chat_rows(40)
    data = {"path": write_jsonl(tmp_path / "chat.jsonl", rows), "format": "messages", "seq_len": 512,
            "train_on": train_on}
    if template:
        data["chat_template"] = template
    prepared = prepare(load_config(tiny_config(tmp_path, tiny_model, data=data)), log=lambda _: None)
    convs = by_rendering(rows, tokenizer, template)
    seen = 0
    for ids, labels in samples_of(prepared.train):
        text = tokenizer.decode(ids.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        messages = convs[text]  # every sample is one whole row, unchanged
        answers = [TURN_TEXT[template](m["content"]) for m in messages if m["role"] == "assistant"]
        assert labelled_runs(ids, labels, tokenizer) == (answers if train_on == "assistant" else answers[-1:])
        seen += 1
    assert prepared.summary["rows_skipped"] == {} and seen == len(rows)


def test_train_on_all_labels_every_token(tmp_path, tiny_model):
    rows = chat_rows(10)
    data = {"path": write_jsonl(tmp_path / "chat.jsonl", rows), "format": "messages", "seq_len": 256, "train_on": "all"}
    prepared = prepare(load_config(tiny_config(tmp_path, tiny_model, data=data)), log=lambda _: None)
    samples = list(samples_of(prepared.train))
    assert all(np.array_equal(ids, labels) for ids, labels in samples)
    # every token but each sample's first is a target
    assert prepared.summary["trained_tokens"] == sum(len(ids) - 1 for ids, _ in samples)


def test_show_json_is_what_collate_feeds_the_model(tmp_path, tiny_model, tokenizer, capsys):
    """`prepare --show N --json`: positions restart at every sample, labels are only assistant turns + eos."""
    rows = chat_rows(30)
    cfg_path = tiny_config(tmp_path, tiny_model, data={"path": write_jsonl(tmp_path / "chat.jsonl", rows),
                                                       "format": "messages", "seq_len": 256})
    prepare_command(str(cfg_path), json=True, show=4)
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 4
    cfg = load_config(cfg_path)
    prepared = prepare(cfg, log=lambda _: None)
    order = np.random.default_rng([cfg.train.seed, 0]).permutation(len(prepared.train))  # the sampler's epoch 0
    assert [r["sequence"] for r in records] == order[:4].tolist()
    convs = by_rendering(rows, tokenizer, None)
    multi_sample = 0
    for r in records:
        ids, labels, positions = (np.array(r[k]) for k in ("input_ids", "labels", "position_ids"))
        batch = collate(prepared.train, np.array([r["sequence"]]), tokenizer.pad_token_id)
        n = len(ids)
        assert np.array_equal(batch.input_ids[0, :n].numpy(), ids)
        assert np.array_equal(batch.position_ids[0, :n].numpy(), positions)
        assert np.array_equal(batch.targets[0, :n - 1].numpy(), labels[1:])  # HF convention: shifted by the model
        starts = np.cumsum(r["sample_lengths"]) - r["sample_lengths"]
        assert np.array_equal(positions, np.concatenate([np.arange(length) for length in r["sample_lengths"]]))
        assert (labels[starts] == IGNORE).all()
        multi_sample += len(starts) > 1
        for a, length in zip(starts, r["sample_lengths"]):
            sample_ids, sample_labels = ids[a:a + length], labels[a:a + length]
            text = tokenizer.decode(sample_ids.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
            answers = [m["content"] + EOS for m in convs[text] if m["role"] == "assistant"]
            assert labelled_runs(sample_ids, sample_labels, tokenizer) == answers
    assert multi_sample, "no shown sequence packs more than one sample"


def test_show_human_highlights_trained_spans_and_marks_samples(tmp_path, tiny_model, capsys):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "reverse: cat dog"},
                          {"role": "assistant", "content": "dog cat"}, {"role": "user", "content": "count: a b"},
                          {"role": "assistant", "content": "2"}]},
            {"messages": [{"role": "user", "content": "sort: b a"}, {"role": "assistant", "content": "a b"}]}]
    cfg_path = tiny_config(tmp_path, tiny_model, data={"path": write_jsonl(tmp_path / "c.jsonl", rows),
                                                       "format": "messages", "seq_len": 128})
    prepare_command(str(cfg_path), show=1)
    out = capsys.readouterr().out  # not a tty: brackets, no colour codes
    assert "packing efficiency" in out and "\033[" not in out
    assert "--- sample 1/2" in out and "--- sample 2/2" in out
    assert out.count("«") == 3
    for answer in ("dog cat", "2", "a b"):
        assert f"«{answer}{EOS}»" in out
    assert "«" not in out.split("reverse: cat dog")[0]  # system and user text are not highlighted


def test_alpaca_sharegpt_and_custom_field_names(tmp_path, tiny_model, tokenizer):
    """alpaca and sharegpt map onto messages; renamed columns give the same tokens."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "count: a b\n\nextra"},
                {"role": "assistant", "content": "2"}]
    variants = {
        "messages": ({"messages": messages}, {}),
        "alpaca": ({"instruction": "count: a b", "input": "extra", "output": "2", "system": "Be brief."}, {}),
        "sharegpt": ({"conversations": [{"from": "system", "value": "Be brief."},
                                        {"from": "human", "value": "count: a b\n\nextra"},
                                        {"from": "gpt", "value": "2"}]}, {}),
    }
    renamed = {
        "messages": ({"chat": [{"speaker": m["role"], "text": m["content"]} for m in messages]},
                     {"messages": "chat", "role": "speaker", "content": "text"}),
        "alpaca": ({"prompt": "count: a b", "context": "extra", "completion": "2", "sys": "Be brief."},
                   {"instruction": "prompt", "input": "context", "output": "completion", "system": "sys"}),
        "sharegpt": ({"turns": [{"who": "SYSTEM", "says": "Be brief."}, {"who": "Human", "says": "count: a b\n\nextra"},
                                {"who": "GPT", "says": "2"}]},
                     {"conversations": "turns", "speaker": "who", "value": "says"}),
    }
    renderer = Renderer(tokenizer)
    expected = renderer.encode_many([renderer.render(messages)])[0]
    cases = [(fmt, fmt, case) for fmt, case in variants.items()] + [(f"{fmt}-renamed", fmt, case)
                                                                    for fmt, case in renamed.items()]
    for name, fmt, (row, fields) in cases:
        sub = tmp_path / name
        sub.mkdir()
        data = {"path": write_jsonl(sub / "d.jsonl", [row]), "format": fmt, "seq_len": 64, "fields": fields}
        prepared = prepare(load_config(tiny_config(sub, tiny_model, data=data)), log=lambda _: None)
        ids, labels, _ = prepared.train.sequence(0)
        assert np.array_equal(ids, expected[0]) and np.array_equal(labels, expected[1]), name


def test_text_format_trains_on_every_token_and_ends_with_eos(tmp_path, tiny_model, tokenizer):
    rows = [{"text": "the cat sat on the mat."}, {"text": "café 中文 naïve"}]
    data = {"path": write_jsonl(tmp_path / "t.jsonl", rows), "format": "text", "seq_len": 64}
    prepared = prepare(load_config(tiny_config(tmp_path, tiny_model, data=data)), log=lambda _: None)
    decoded = sorted(tokenizer.decode(ids.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
                     for ids, labels in samples_of(prepared.train) if np.array_equal(ids, labels))
    assert decoded == sorted(r["text"] + EOS for r in rows)


def test_direct_rendering_matches_apply_chat_template(tokenizer):
    """The renderer's fast path renders exactly what transformers' public API renders."""
    for template in (None, LLAMA3_STYLE, MISTRAL_STYLE):
        tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
        if template:
            tok.chat_template = template
        renderer = Renderer(tok)
        for row in chat_rows(10, seed=1):
            for gp in (False, True):
                m = row["messages"]
                assert renderer._render(m, gp) == tok.apply_chat_template(m, tokenize=False, add_generation_prompt=gp)
        assert renderer._compiled[False] is not None, "the fast path was not used"


def test_template_that_drops_earlier_answers_trains_per_turn_or_refuses_whole(tmp_path, tiny_model, tokenizer):
    # Drops earlier assistant turns' content, as some reasoning templates drop earlier reasoning: one rendering
    # cannot hold the earlier answers, but each answer as the last turn can be trained exactly (per_turn).
    unstable = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
                "{{ '<|im_start|>assistant\n' }}"
                "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                "{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    rows = chat_rows(3)  # 1, 2 and 3 assistant turns
    data = {"path": write_jsonl(tmp_path / "c.jsonl", rows), "format": "messages", "seq_len": 256,
            "chat_template": unstable}
    prepared = prepare(load_config(tiny_config(tmp_path, tiny_model, data=data)), log=lambda _: None)
    trained = sorted(run for ids, labels in samples_of(prepared.train) for run in labelled_runs(ids, labels, tokenizer))
    answers = sorted(m["content"] + EOS for r in rows for m in r["messages"] if m["role"] == "assistant")
    assert trained == answers  # every answer exactly once, each in its own sample
    assert prepared.summary["masks"]["rows"] == {"prefix_stable": 1, "per_turn": 2}
    assert prepared.summary["masks"]["samples"] == {"prefix_stable": 1, "per_turn": 5}

    whole = {**data, "multi_turn": "whole"}
    with pytest.raises(DataError) as err:
        prepare(load_config(tiny_config(tmp_path, tiny_model, data=whole)), log=lambda _: None)
    for line in (2, 3):  # the multi-turn rows, by file:line, saying which turn is missing
        assert f"c.jsonl:{line}: turn_not_located: assistant turn 1 (message " in str(err.value)
    assert "leaves its answer out of the whole conversation" in str(err.value)


def test_a_token_overlapping_a_trained_span_is_labelled():
    """Where a template lets a token straddle a span edge, the token is trained, so no answer text goes unlabelled."""
    from trainer.data.render import labels_from_offsets

    ids = np.array([10, 11, 12, 13, 14], dtype=np.int32)
    offsets = np.array([[0, 3], [3, 7], [7, 9], [9, 9], [9, 12]])  # token 3 is zero-width
    assert labels_from_offsets(ids, offsets, ((5, 10),)).tolist() == [IGNORE, 11, 12, 13, 14]
    assert labels_from_offsets(ids, offsets, ((1, 2), (8, 9))).tolist() == [10, IGNORE, 12, IGNORE, IGNORE]
    assert labels_from_offsets(ids, offsets, ()).tolist() == [IGNORE] * 5
