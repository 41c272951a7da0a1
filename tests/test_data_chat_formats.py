"""Today's chat data: templates that are not prefix-stable, tool calls, reasoning traces.

Three templates are written here for the tests: the built-in ChatML (prefix-stable), one that behaves
like Qwen3's (reasoning and empty think blocks only after the last user query, so a turn renders
differently once later turns follow) and a Hermes / Qwen2.5-style one with tools. Expected renderings
and trained spans are written out by hand from what each template is documented to do, never taken
from the code under test; labels are then checked token by token.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter

import numpy as np
import pytest
from test_data_masks import LLAMA3_STYLE, MISTRAL_STYLE, chat_rows, labelled_runs, samples_of, write_jsonl
from transformers import AutoTokenizer

from launcher.cli import prepare as prepare_command
from launcher.contract.config import DataFields, load_config
from trainer.data.formats import to_chat
from trainer.data.prepare import DataError, prepare
from trainer.data.render import IGNORE, Renderer

from conftest import EXAMPLES, read_metrics, shardtune, tiny_config

EOS = "<|im_end|>"
TOOLS_FILE = EXAMPLES / "data" / "tiny_tools_sharegpt.jsonl"

# Like Qwen3: the system prompt (and with tools, a tool list) first; an assistant turn after the last
# user message shows its reasoning (`reasoning_content`, or inline <think>...</think> moved out of the
# content) in a think block, and the last message gets one even when empty; earlier turns lose their
# reasoning. Tool calls follow the content as <tool_call> JSON; tool results are a user turn of
# <tool_response> blocks.
QWEN3_STYLE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}"
    "{%- set content = m.content %}{%- set reasoning = '' %}"
    "{%- if m.reasoning_content is string %}{%- set reasoning = m.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{- content }}"
    "{%- for call in m.tool_calls or [] %}"
    "{{- ('\\n' if content or not loop.first else '') + '<tool_call>\\n{\"name\": \"' + call.function.name"
    " + '\", \"arguments\": ' + (call.function.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{%- if messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Hermes / Qwen2.5 style: tools listed in the system turn, calls as <tool_call>{"name", "arguments"}
# JSON after the content, results as a user turn of <tool_response> blocks. Prefix-stable.
HERMES_TOOLS = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\nCall a tool as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'system' and not (loop.first and tools)) %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + m.content }}"
    "{%- for call in m.tool_calls or [] %}"
    "{{- ('\\n' if m.content or not loop.first else '') + '<tool_call>\\n' }}"
    "{{- {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}"
    "{{- '\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{%- if messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
HERMES_RULE = '\n</tools>\nCall a tool as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n'


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def quiet(_: str) -> None:
    pass


def prepared_for(tmp_path, tiny_model, rows_or_path, fmt: str = "messages", **data):
    tmp_path.mkdir(parents=True, exist_ok=True)
    rows = isinstance(rows_or_path, list)
    path = write_jsonl(tmp_path / "rows.jsonl", rows_or_path) if rows else str(rows_or_path)
    cfg = tiny_config(tmp_path, tiny_model, data={"path": path, "format": fmt, "seq_len": 1024, **data})
    return prepare(load_config(cfg), log=quiet)


def by_hand(tok, text: str, trained: list[str]) -> tuple[list[int], list[int]]:
    """Token ids of `text` and their labels when exactly the `trained` substrings (in order) carry loss."""
    spans, at = [], 0
    for piece in trained:
        start = text.index(piece, at)
        spans.append((start, start + len(piece)))
        at = start + len(piece)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [t if any(a < e and s < b for s, e in spans) else IGNORE
              for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]
    return enc["input_ids"], labels


def assert_samples(prepared, tok, expected: dict[str, list[str]]) -> None:
    """The prepared samples are exactly the expected texts, each labelled token by token as written by hand."""
    seen = []
    for ids, labels in samples_of(prepared.train):
        text = tok.decode(ids.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert text in expected, f"unexpected sample {text!r}"
        want_ids, want_labels = by_hand(tok, text, expected[text])
        assert ids.tolist() == want_ids and labels.tolist() == want_labels, text
        assert labelled_runs(ids, labels, tok) == expected[text]  # no token straddles a span edge here
        seen.append(text)
    assert sorted(seen) == sorted(expected)


# --- a template that is not prefix-stable -------------------------------------------------------------------

SYSTEM, Q1, Q2 = "<|im_start|>system\nBe brief.<|im_end|>\n", "count: red blue", "sort: dog cat"
REASONING_ROW = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": Q1},
    {"role": "assistant", "content": "<think>\ntwo words\n</think>\n\n2"},
    {"role": "user", "content": Q2},
    {"role": "assistant", "content": "cat dog", "reasoning_content": "alphabetical order"}]}
# As the last message, turn 1 keeps its (inline) reasoning; once turn 2 follows, it is only "2".
TURN1_ALONE = f"{SYSTEM}<|im_start|>user\n{Q1}{EOS}\n<|im_start|>assistant\n<think>\ntwo words\n</think>\n\n2{EOS}\n"
WHOLE = (f"{SYSTEM}<|im_start|>user\n{Q1}{EOS}\n<|im_start|>assistant\n2{EOS}\n<|im_start|>user\n{Q2}{EOS}\n"
         f"<|im_start|>assistant\n<think>\nalphabetical order\n</think>\n\ncat dog{EOS}\n")
TURN1 = f"<think>\ntwo words\n</think>\n\n2{EOS}"
TURN2 = f"<think>\nalphabetical order\n</think>\n\ncat dog{EOS}"


def test_qwen3_style_template_renders_as_documented(tokenizer):
    m = REASONING_ROW["messages"]
    assert tokenizer.apply_chat_template(m, tokenize=False, chat_template=QWEN3_STYLE) == WHOLE
    assert tokenizer.apply_chat_template(m[:3], tokenize=False, chat_template=QWEN3_STYLE) == TURN1_ALONE


def test_default_trains_each_turn_of_a_qwen3_style_chat_in_its_own_sample(tmp_path, tiny_model, tokenizer):
    prepared = prepared_for(tmp_path, tiny_model, [REASONING_ROW], chat_template=QWEN3_STYLE)
    assert_samples(prepared, tokenizer, {TURN1_ALONE: [TURN1], WHOLE: [TURN2]})
    assert prepared.summary["masks"] == {"multi_turn": "auto", "rows": {"per_turn": 1}, "samples": {"per_turn": 2}}


def test_train_on_reasoning_false_masks_reasoning_text_and_trains_the_rest(tmp_path, tiny_model, tokenizer):
    prepared = prepared_for(tmp_path, tiny_model, [REASONING_ROW], chat_template=QWEN3_STYLE,
                            train_on_reasoning=False)
    assert_samples(prepared, tokenizer, {TURN1_ALONE: ["<think>\n", f"\n</think>\n\n2{EOS}"],
                                         WHOLE: ["<think>\n", f"\n</think>\n\ncat dog{EOS}"]})


def test_whole_trains_every_turn_where_it_stands_in_one_rendering(tmp_path, tiny_model, tokenizer):
    prepared = prepared_for(tmp_path, tiny_model, [REASONING_ROW], chat_template=QWEN3_STYLE, multi_turn="whole")
    assert_samples(prepared, tokenizer, {WHOLE: [f"2{EOS}", TURN2]})
    masked = prepared_for(tmp_path / "no-reasoning", tiny_model, [REASONING_ROW], chat_template=QWEN3_STYLE,
                          multi_turn="whole", train_on_reasoning=False)
    assert_samples(masked, tokenizer, {WHOLE: [f"2{EOS}", "<think>\n", f"\n</think>\n\ncat dog{EOS}"]})


def test_last_assistant_is_one_sample_and_per_turn_splits_even_prefix_stable_chats(tmp_path, tiny_model, tokenizer):
    last = prepared_for(tmp_path, tiny_model, [REASONING_ROW], chat_template=QWEN3_STYLE, train_on="last_assistant")
    assert_samples(last, tokenizer, {WHOLE: [TURN2]})
    row = {"messages": [{"role": "user", "content": Q1}, {"role": "assistant", "content": "2"},
                        {"role": "user", "content": Q2}, {"role": "assistant", "content": "cat dog"}]}
    first = f"<|im_start|>user\n{Q1}{EOS}\n<|im_start|>assistant\n2{EOS}\n"
    split = prepared_for(tmp_path / "chatml", tiny_model, [row], multi_turn="per_turn")  # the tokenizer's ChatML
    assert_samples(split, tokenizer, {first: [f"2{EOS}"],
                                      f"{first}<|im_start|>user\n{Q2}{EOS}\n<|im_start|>assistant\ncat dog{EOS}\n":
                                      [f"cat dog{EOS}"]})


def test_acceptance_qwen3_style_multi_turn_chats_train_every_assistant_turn(tmp_path, tiny_model, tokenizer, capsys):
    """The shipped multi-turn chats at the default train_on: prepare succeeds and trains every assistant turn."""
    data = EXAMPLES / "data" / "tiny_chat.jsonl"
    rows = [json.loads(line)["messages"] for line in data.read_text().splitlines()]
    every = prepared_for(tmp_path, tiny_model, data, chat_template=QWEN3_STYLE, seq_len=512)
    last = prepared_for(tmp_path / "last", tiny_model, data, chat_template=QWEN3_STYLE, seq_len=512,
                        train_on="last_assistant")
    assert every.summary["rows_kept"] == len(rows) and every.summary["rows_skipped"] == {}
    # As the last message every turn gets the (empty) think block: each answer is trained once, in its own sample.
    trained = Counter(run for ids, labels in samples_of(every.train) for run in labelled_runs(ids, labels, tokenizer))
    answers = Counter(f"<think>\n\n</think>\n\n{m['content']}{EOS}"
                      for r in rows for m in r if m["role"] == "assistant")
    assert trained == answers
    multi = sum(1 for r in rows if sum(m["role"] == "assistant" for m in r) > 1)
    assert 0 < multi < len(rows)
    assert every.summary["masks"]["rows"] == {"prefix_stable": len(rows) - multi, "per_turn": multi}
    assert every.summary["trained_tokens"] > last.summary["trained_tokens"]

    cfg = tiny_config(tmp_path, tiny_model, data={"path": str(data), "format": "messages", "seq_len": 512,
                                                  "chat_template": QWEN3_STYLE})
    prepare_command(str(cfg), show=3)
    out = capsys.readouterr().out
    assert f"masks (data.multi_turn=auto): {len(rows) - multi} rows rendered once (prefix-stable); {multi} rows " \
           f"per_turn (a sample per assistant turn) -> {every.summary['masks']['samples']['per_turn']} samples" in out
    assert "per_turn (trains assistant turn 2) ---" in out and "«<think>\n\n</think>\n\n" in out
    for shown in re.findall(r"«(.*?)»", out, flags=re.S):
        assert shown in answers
    prepare_command(str(cfg), json=True, show=3)
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(len(r["sample_methods"]) == len(r["sample_lengths"]) == len(r["sample_turns"]) for r in records)
    assert {"per_turn", "prefix_stable"} >= {m for r in records for m in r["sample_methods"]}


@pytest.mark.parametrize("template", [None, LLAMA3_STYLE, MISTRAL_STYLE],
                         ids=["chatml", "llama3-style", "mistral-style"])
def test_whole_locates_the_same_spans_as_the_prefix_method_on_prefix_stable_templates(tmp_path, tiny_model, template):
    rows = chat_rows(30, seed=3)
    extra = {"chat_template": template} if template else {}
    reference = prepared_for(tmp_path, tiny_model, rows, **extra)
    whole = prepared_for(tmp_path / "whole", tiny_model, rows, multi_turn="whole", **extra)
    assert reference.summary["masks"]["rows"] == {"prefix_stable": 30}
    assert whole.summary["masks"]["rows"] == {"whole": 30}
    assert np.array_equal(reference.train.tokens, whole.train.tokens)
    assert np.array_equal(reference.train.labels, whole.train.labels)


def test_per_turn_samples_pack_apart_and_eval_holds_out_whole_conversations(tmp_path, tiny_model, tokenizer):
    rows = chat_rows(40)  # row i opens with "q{i}.0:" and has 1 + i % 3 assistant turns
    prepared = prepared_for(tmp_path, tiny_model, rows, chat_template=QWEN3_STYLE, eval_fraction=0.25)

    def rows_of(data) -> Counter:
        found = Counter()
        for ids, labels in samples_of(data):
            text = tokenizer.decode(ids.tolist(), skip_special_tokens=False)
            found[int(re.search(r"q(\d+)\.0:", text).group(1))] += 1
            assert len(labelled_runs(ids, labels, tokenizer)) == 1  # one trained turn per sample
        return found

    train, held = rows_of(prepared.train), rows_of(prepared.eval)
    assert not set(train) & set(held) and len(held) == 10 and len(train) == 30
    for i, n in (train + held).items():
        assert n == 1 + i % 3  # every turn of a conversation, on one side of the split
    assert prepared.summary["samples"] == sum(train.values())
    packed = [len(prepared.train.sequence(k)[2]) for k in range(len(prepared.train))]
    assert max(packed) > 1  # per_turn samples share sequences, kept apart by the packer's sample boundaries


def test_a_per_turn_sample_too_long_drops_only_that_turn(tmp_path, tiny_model):
    row = {"messages": [{"role": "user", "content": "count: a"}, {"role": "assistant", "content": "1"},
                        {"role": "user", "content": "sort: " + "b a " * 60}, {"role": "assistant", "content": "a b"}]}
    prepared = prepared_for(tmp_path, tiny_model, [row], chat_template=QWEN3_STYLE, seq_len=64)
    s = prepared.summary
    assert (s["rows_kept"], s["samples"], s["rows_skipped"], s["turns_dropped"]) == (1, 1, {}, {"too_long": 1})


# --- tools ------------------------------------------------------------------------------------------------------

TOOL = {"type": "function", "function": {"name": "reverse_words", "description": "Reverse words.",
                                         "parameters": {"type": "object", "properties": {"words": {"type": "array"}}}}}
CALL_JSON = '{"name": "reverse_words", "arguments": {"words": ["red", "blue"]}}'
OPENAI_ROW = {"messages": [
    {"role": "user", "content": "reverse: red blue"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "reverse_words", "arguments": '{"words": ["red", "blue"]}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "name": "reverse_words", "content": "blue red"},
    {"role": "assistant", "content": "blue red"}], "tools": [TOOL]}
LLAMA_FACTORY_ROW = {"conversations": [
    {"from": "human", "value": "reverse: red blue"}, {"from": "function_call", "value": CALL_JSON},
    {"from": "observation", "value": "blue red"}, {"from": "gpt", "value": "blue red"}],
    "tools": json.dumps([TOOL["function"]])}
TOOL_TEXT = (f"<|im_start|>system\n# Tools\n<tools>\n{json.dumps(TOOL)}{HERMES_RULE}"
             f"<|im_start|>user\nreverse: red blue{EOS}\n"
             f"<|im_start|>assistant\n<tool_call>\n{CALL_JSON}\n</tool_call>{EOS}\n"
             f"<|im_start|>user\n<tool_response>\nblue red\n</tool_response>{EOS}\n"
             f"<|im_start|>assistant\nblue red{EOS}\n")
TOOL_TRAINED = [f"<tool_call>\n{CALL_JSON}\n</tool_call>{EOS}", f"blue red{EOS}"]


@pytest.mark.parametrize("fmt,row", [("messages", OPENAI_ROW), ("sharegpt", LLAMA_FACTORY_ROW)],
                         ids=["openai-messages", "llama-factory-sharegpt"])
def test_tool_calls_are_trained_and_tool_results_never(tmp_path, tiny_model, tokenizer, fmt, row):
    prepared = prepared_for(tmp_path, tiny_model, [row], fmt, chat_template=HERMES_TOOLS)
    assert_samples(prepared, tokenizer, {TOOL_TEXT: TOOL_TRAINED})
    assert prepared.summary["masks"]["rows"] == {"prefix_stable": 1}


def test_tool_call_arguments_as_string_or_object_render_alike(tokenizer):
    as_object = json.loads(json.dumps(OPENAI_ROW))
    as_object["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"words": ["red", "blue"]}
    flat = json.loads(json.dumps(OPENAI_ROW))
    flat["messages"][1]["tool_calls"] = [{"name": "reverse_words", "arguments": {"words": ["red", "blue"]}}]
    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = HERMES_TOOLS
    renderer = Renderer(tok)
    texts = {renderer.render(to_chat(r, "messages", DataFields())).text for r in (OPENAI_ROW, as_object, flat)}
    assert texts == {TOOL_TEXT}


def test_fast_path_renders_tools_and_extra_keys_like_apply_chat_template(tokenizer):
    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = QWEN3_STYLE
    renderer = Renderer(tok)
    for row in (OPENAI_ROW, REASONING_ROW):
        chat = to_chat(row, "messages", DataFields())
        for n in range(1, len(chat.messages) + 1):
            for gp in (False, True):
                public = tok.apply_chat_template(chat.messages[:n], tools=chat.tools, tokenize=False,
                                                 add_generation_prompt=gp)
                assert renderer._render(chat.messages[:n], gp, chat.tools) == public
    assert renderer._compiled[False] is not None and renderer._compiled[True] is not None


def test_acceptance_llama_factory_tool_rows_all_kept_results_untrained_calls_trained(tmp_path, tiny_model, tokenizer):
    rows = [json.loads(line) for line in TOOLS_FILE.read_text().splitlines()]
    for template in (HERMES_TOOLS, QWEN3_STYLE):
        prepared = prepared_for(tmp_path / str(len(template)), tiny_model, TOOLS_FILE, "sharegpt",
                                chat_template=template)
        s = prepared.summary
        assert (s["rows_read"], s["rows_kept"], s["rows_skipped"]) == (len(rows), len(rows), {})
        trained = "\n".join(run for ids, labels in samples_of(prepared.train)
                            for run in labelled_runs(ids, labels, tokenizer))
        for row in rows:
            for turn in row["conversations"]:
                if turn["from"] == "observation":
                    assert json.dumps(turn["value"])[1:-1] not in trained and turn["value"] not in trained
                if turn["from"] == "function_call":
                    calls = json.loads(re.sub(r"<think>.*?</think>\s*", "", turn["value"], flags=re.S))
                    for call in calls if isinstance(calls, list) else [calls]:
                        rendered = json.dumps({"name": call["name"], "arguments": call["arguments"]})
                        assert f"<tool_call>\n{rendered}\n</tool_call>" in trained
        assert "<tool_response>" not in trained and "# Tools" not in trained


def test_templates_without_tool_support_refuse_naming_the_rows(tmp_path, tiny_model):
    with pytest.raises(DataError) as err:  # the tokenizer's plain ChatML ignores tools and tool calls
        prepared_for(tmp_path, tiny_model, TOOLS_FILE, "sharegpt")
    message = str(err.value)
    assert message.startswith("32 bad row(s)")
    assert f"{TOOLS_FILE}:1: template_ignores_tools: the row has 3 tool definition(s)" in message
    no_tools = {"messages": OPENAI_ROW["messages"]}
    with pytest.raises(DataError, match=r"rows.jsonl:1: template_ignores_tool_calls: turn 1 calls tools"):
        prepared_for(tmp_path / "calls", tiny_model, [no_tools])


def test_bad_tool_data_is_named_by_line_and_field(tmp_path, tiny_model):
    def lf(value) -> dict:
        return {"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": value},
                                  {"from": "observation", "value": "x"}, {"from": "gpt", "value": "ok"}]}

    rows = [lf(CALL_JSON), lf('{"name": "f", "arguments": '), lf('{"arguments": {}}'),
            {**lf(CALL_JSON), "tools": "[{oops"}, {**lf(CALL_JSON), "tools": [{"description": "no name"}]},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "observation", "value": "x"},
                               {"from": "gpt", "value": "ok"}]}]
    with pytest.raises(DataError) as err:
        prepared_for(tmp_path, tiny_model, rows, "sharegpt", chat_template=HERMES_TOOLS)
    listed = [line.strip().split(": ")[:2] for line in str(err.value).splitlines() if line.startswith("  ")]
    assert [(w.rsplit(":", 1)[1], r) for w, r in listed] == [
        ("2", "bad_tool_call"), ("3", "bad_tool_call"), ("4", "bad_tools"), ("5", "bad_tools"),
        ("6", "tool_without_call")]
    assert "turn 1 'value' is not valid JSON" in str(err.value) and "'tools'[0] has neither" in str(err.value)


def test_qwen3_style_tool_chain_with_reasoning_per_turn_and_whole(tmp_path, tiny_model, tokenizer):
    """A tool-call turn with reasoning, its result, an answer, then a new question: earlier reasoning disappears."""
    call = {"type": "function", "function": {"name": "reverse_words", "arguments": {"words": ["red", "blue"]}}}
    row = {"messages": [{"role": "user", "content": "reverse: red blue"},
                        {"role": "assistant", "content": "", "tool_calls": [call], "reasoning_content": "use the tool"},
                        {"role": "tool", "content": "blue red"}, {"role": "assistant", "content": "blue red"},
                        {"role": "user", "content": Q2}, {"role": "assistant", "content": "cat dog"}]}
    user = f"<|im_start|>user\nreverse: red blue{EOS}\n"
    tool_call = f"<tool_call>\n{CALL_JSON}\n</tool_call>{EOS}"
    result = f"<|im_start|>user\n<tool_response>\nblue red\n</tool_response>{EOS}\n"
    thought_call = f"<think>\nuse the tool\n</think>\n\n{tool_call}"
    empty = "<think>\n\n</think>\n\n"
    first = f"{user}<|im_start|>assistant\n{thought_call}\n"
    second = f"{first}{result}<|im_start|>assistant\n{empty}blue red{EOS}\n"
    whole = (f"{user}<|im_start|>assistant\n{tool_call}\n{result}<|im_start|>assistant\nblue red{EOS}\n"
             f"<|im_start|>user\n{Q2}{EOS}\n<|im_start|>assistant\n{empty}cat dog{EOS}\n")
    per_turn = prepared_for(tmp_path, tiny_model, [row], chat_template=QWEN3_STYLE)
    assert_samples(per_turn, tokenizer, {first: [thought_call], second: [f"{empty}blue red{EOS}"],
                                         whole: [f"{empty}cat dog{EOS}"]})
    located = prepared_for(tmp_path / "whole", tiny_model, [row], chat_template=QWEN3_STYLE, multi_turn="whole")
    assert_samples(located, tokenizer, {whole: [tool_call, f"blue red{EOS}", f"{empty}cat dog{EOS}"]})


# --- reasoning --------------------------------------------------------------------------------------------------

def test_acceptance_reasoning_content_reaches_the_template_and_is_trained_unless_turned_off(tmp_path, tiny_model,
                                                                                            tokenizer):
    row = {"messages": [{"role": "user", "content": Q2},
                        {"role": "assistant", "content": "cat dog", "reasoning_content": "alphabetical order"}]}
    text = (f"<|im_start|>user\n{Q2}{EOS}\n<|im_start|>assistant\n"
            f"<think>\nalphabetical order\n</think>\n\ncat dog{EOS}\n")
    on = prepared_for(tmp_path, tiny_model, [row], chat_template=QWEN3_STYLE)
    assert_samples(on, tokenizer, {text: [TURN2]})
    off = prepared_for(tmp_path / "off", tiny_model, [row], chat_template=QWEN3_STYLE, train_on_reasoning=False)
    assert_samples(off, tokenizer, {text: ["<think>\n", f"\n</think>\n\ncat dog{EOS}"]})
    with pytest.raises(DataError, match=r"rows.jsonl:1: template_ignores_reasoning: turn 1 has reasoning_content"):
        prepared_for(tmp_path / "chatml", tiny_model, [row])  # ChatML would drop it silently
    row["messages"][1]["reasoning_content"] = ""  # nothing to drop: mixed datasets carry "" on turns without
    plain = f"<|im_start|>user\n{Q2}{EOS}\n<|im_start|>assistant\ncat dog{EOS}\n"
    assert_samples(prepared_for(tmp_path / "empty", tiny_model, [row]), tokenizer, {plain: [f"cat dog{EOS}"]})


def test_inline_think_in_a_template_that_renders_content_verbatim(tmp_path, tiny_model, tokenizer):
    row = {"messages": [{"role": "user", "content": Q1},
                        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\n2"}]}
    text = f"<|im_start|>user\n{Q1}{EOS}\n<|im_start|>assistant\n<think>\nhmm\n</think>\n\n2{EOS}\n"
    assert_samples(prepared_for(tmp_path, tiny_model, [row]), tokenizer, {text: [f"<think>\nhmm\n</think>\n\n2{EOS}"]})
    off = prepared_for(tmp_path / "off", tiny_model, [row], train_on_reasoning=False)
    assert_samples(off, tokenizer, {text: ["<think>\n", f"\n</think>\n\n2{EOS}"]})


# --- training ---------------------------------------------------------------------------------------------------

def test_two_ranks_train_on_llama_factory_tool_calling_data(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model, data={"path": str(TOOLS_FILE), "format": "sharegpt", "seq_len": 1024,
                                                  "chat_template": QWEN3_STYLE},
                      train={"max_steps": 8, "micro_batch_size": 1, "grad_accum_steps": 2, "warmup_steps": 1})
    shardtune("launch", str(cfg))
    rows = read_metrics(tmp_path / "run")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all(math.isfinite(r["loss"]) for r in steps) and steps[-1]["loss"] < 0.9 * steps[0]["loss"]
    data = next(r for r in rows if "data/rows_read" in r)
    assert data["data/rows_read"] == data["data/rows_kept"] == 32
    assert data["data/masks/per_turn"] > 0 and not any(k.startswith("data/skipped/") for k in data)


@pytest.mark.parametrize("template,row,samples", [
    (QWEN3_STYLE, REASONING_ROW, {TURN1_ALONE: [TURN1], WHOLE: [TURN2]}),
    (HERMES_TOOLS, OPENAI_ROW, {TOOL_TEXT: TOOL_TRAINED}),
], ids=["per-turn", "tools"])
def test_eval_loss_scores_a_conversation_as_training_renders_it(tmp_path, tiny_model, template, row, samples):
    """`shardtune eval` scores the samples training makes of a row: a chat the template does not render
    prefix-stably as one sample per assistant turn (it raised TemplateError before), a row with tools with its tool
    definitions in the prompt (they were dropped before). The loss is the token-weighted mean over those samples,
    each labelled by hand."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from trainer.tools.exact_match import eval_loss, read_eval_rows

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = template
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    got = eval_loss(model, tok, read_eval_rows(write_jsonl(tmp_path / "eval.jsonl", [row])))
    total, count = 0.0, 0
    with torch.no_grad():
        for text, trained in samples.items():
            ids, labels = by_hand(tok, text, trained)
            logits = model(torch.tensor([ids])).logits[0, :-1]
            targets = torch.tensor(labels[1:])
            total += float(F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum"))
            count += int((targets != IGNORE).sum())
    assert got == pytest.approx(total / count, rel=1e-5)


def test_eval_references_a_tool_call_answer_as_the_template_renders_it(tmp_path, tiny_model):
    """`shardtune eval` on a row whose answer is a tool call: the reference is the call as training renders and
    trains it (hand-written here from the template), not the message's empty content. Before, the reference was
    that empty content, so a model making the right call scored 0 (the end-to-end check below fails on it)."""
    import shutil

    from trainer.tools.exact_match import evaluate_model, read_eval_rows, reference_answers

    call = {"messages": OPENAI_ROW["messages"][:2], "tools": [TOOL]}
    path = write_jsonl(tmp_path / "eval.jsonl", [call, OPENAI_ROW])
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = HERMES_TOOLS
    expected = [f"<tool_call>\n{CALL_JSON}\n</tool_call>", "blue red"]
    assert reference_answers(tok, read_eval_rows(str(path))) == expected

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    tok.save_pretrained(model_dir)
    result = evaluate_model(str(model_dir), str(path), max_new_tokens=4, examples=2)
    assert result["rows"] == 2 and [e["reference"] for e in result["examples"]] == expected
    assert [e["prompt"] for e in result["examples"]] == ["reverse: red blue"] * 2  # the user's, not the tool's
