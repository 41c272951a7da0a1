"""Write the tool-calling example in LLaMA-Factory's sharegpt format (seeded, so the file never changes).

    python examples/data/make_tools_data.py

Each row has a `tools` column (a JSON string of bare function definitions) and `conversations` where
`function_call` turns hold JSON {"name", "arguments"} (a list for parallel calls, optionally after a
<think>…</think> thought) and `observation` turns hold the tool's result, as LLaMA-Factory's
function-calling demo data does. The tools reverse, sort and count words, so the answer follows from
the results and a tiny model can learn the format.
"""
import json
import random
from pathlib import Path

WORDS = "red blue green cat dog bird fish tree river city house book water fire light stone".split()
HERE = Path(__file__).resolve().parent
WORDS_PARAM = {"type": "object", "required": ["words"],
               "properties": {"words": {"type": "array", "items": {"type": "string"}, "description": "the words"}}}
TOOLS = [{"name": "reverse_words", "description": "Reverse the order of a list of words.", "parameters": WORDS_PARAM},
         {"name": "sort_words", "description": "Sort a list of words alphabetically.", "parameters": WORDS_PARAM},
         {"name": "count_words", "description": "Count a list of words.", "parameters": WORDS_PARAM}]
RUN = {"reverse_words": lambda w: " ".join(reversed(w)), "sort_words": lambda w: " ".join(sorted(w)),
       "count_words": lambda w: str(len(w))}
VERB = {"reverse_words": "reverse", "sort_words": "sort", "count_words": "count"}


def turn(speaker: str, value) -> dict:
    return {"from": speaker, "value": value if isinstance(value, str) else json.dumps(value)}


def call(name: str, words: list[str]) -> dict:
    return {"name": name, "arguments": {"words": words}}


def one_call(rng: random.Random, thought: bool) -> list[dict]:
    name, words = rng.choice(list(RUN)), rng.sample(WORDS, rng.randint(2, 5))
    value = json.dumps(call(name, words))
    if thought:
        value = f"<think>The user wants to {VERB[name]} {len(words)} words; the tool does that.</think>\n{value}"
    return [turn("human", f"Use a tool to {VERB[name]}: {' '.join(words)}"), turn("function_call", value),
            turn("observation", {"result": RUN[name](words)}), turn("gpt", RUN[name](words))]


def parallel_calls(rng: random.Random) -> list[dict]:
    first, second = rng.sample(list(RUN), 2)
    words = rng.sample(WORDS, rng.randint(2, 4))
    results = [{"name": n, "result": RUN[n](words)} for n in (first, second)]
    return [turn("human", f"Use tools to {VERB[first]} and {VERB[second]}: {' '.join(words)}"),
            turn("function_call", [call(first, words), call(second, words)]), turn("observation", results),
            turn("gpt", f"{RUN[first](words)}; {RUN[second](words)}")]


def chained_calls(rng: random.Random) -> list[dict]:
    words = rng.sample(WORDS, rng.randint(2, 4))
    reversed_words = RUN["reverse_words"](words)
    return [turn("human", f"Reverse, then sort: {' '.join(words)}"),
            turn("function_call", call("reverse_words", words)), turn("observation", {"result": reversed_words}),
            turn("function_call", call("sort_words", reversed_words.split())),
            turn("observation", {"result": RUN["sort_words"](words)}), turn("gpt", RUN["sort_words"](words))]


def row(rng: random.Random, k: int) -> dict:
    kind = k % 8
    if kind == 5:
        conversation = parallel_calls(rng)
    elif kind == 6:
        conversation = chained_calls(rng)
    elif kind == 7:  # a plain answer first, then a tool call in the second turn
        words = rng.sample(WORDS, 3)
        conversation = [turn("human", f"Say these words: {' '.join(words)}"), turn("gpt", " ".join(words))]
        conversation += one_call(rng, thought=False)
    else:
        conversation = one_call(rng, thought=kind == 4)
    return {"conversations": conversation, "tools": json.dumps(TOOLS)}


def main() -> None:
    rng = random.Random(4321)
    rows = [row(rng, k) for k in range(32)]
    path = HERE / "tiny_tools_sharegpt.jsonl"
    with open(path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {path} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
