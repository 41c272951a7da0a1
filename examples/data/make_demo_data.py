"""Generate the `make demo` task: extract a person's name, age and city from one
sentence and answer with one line of compact JSON.

    python examples/data/make_demo_data.py            # writes demo_train.jsonl, demo_eval.jsonl here
    python examples/data/make_demo_data.py --check    # exit 1 if the committed files differ

Example row (messages format, one JSON object per line):

    user:      Return the name, age and city from this text as JSON on one line.

               Meet Greta Novak, a 37-year-old from Porto.
    assistant: {"name":"Greta Novak","age":37,"city":"Porto"}

The answer follows entirely from the prompt, so a short fine-tune can teach it. Before
fine-tuning SmolLM2-135M-Instruct answers in other formats (fenced, pretty-printed JSON
with spaces) and sometimes with wrong values, so its exact match is about 0.

The eval split uses first names that never occur in the train split, so it checks
that the model extracts rather than memorises. No row's prompt occurs in both splits.
Standard library only; the output is the same for the same seed on every machine.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 1234
N_TRAIN = 320
N_EVAL = 64

INSTRUCTION = "Return the name, age and city from this text as JSON on one line."

FIRST_TRAIN = [
    "Maria", "John", "Aisha", "Kenji", "Lucas", "Emma", "Omar", "Sofia", "Liam", "Chloe",
    "Ivan", "Priya", "Noah", "Elena", "Mateo", "Hana", "Oscar", "Zara", "Felix", "Nina",
    "Hugo", "Leila", "Tomas", "Yuki", "Adam", "Clara", "Diego", "Mina", "Pavel", "Rosa",
]
FIRST_EVAL = [
    "Ahmed", "Greta", "Rafael", "Ingrid", "Kofi", "Lucia",
    "Marco", "Nadia", "Olga", "Sven", "Tara", "Victor",
]
LAST = [
    "Lopez", "Smith", "Khan", "Tanaka", "Silva", "Brown", "Haddad", "Rossi", "Murphy", "Martin",
    "Petrov", "Patel", "Kim", "Novak", "Garcia", "Sato", "Berg", "Ali", "Weber", "Costa",
]
CITIES = [
    "Lisbon", "Denver", "Lagos", "Osaka", "Porto", "Leeds", "Cairo", "Milan", "Dublin", "Lyon",
    "Kazan", "Pune", "Busan", "Prague", "Seville", "Kyoto", "Bergen", "Tunis", "Bremen", "Recife",
    "Quito", "Perth", "Austin", "Gdansk",
]
SENTENCES = [
    "{name} is {age} years old and lives in {city}.",
    "Living in {city}, {name} turned {age} this year.",
    "{name} ({age}) moved to {city} last spring.",
    "Meet {name}, a {age}-year-old from {city}.",
    "From {city}: {name}, age {age}.",
    "At {age}, {name} still calls {city} home.",
    "{city} is where {name}, {age}, works as a teacher.",
    "Our new member {name} is {age} and comes from {city}.",
]


def make_row(rng: random.Random, first_names: list[str]) -> dict:
    name = f"{rng.choice(first_names)} {rng.choice(LAST)}"
    age = rng.randint(18, 89)
    city = rng.choice(CITIES)
    text = rng.choice(SENTENCES).format(name=name, age=age, city=city)
    answer = json.dumps({"name": name, "age": age, "city": city}, separators=(",", ":"))
    return {
        "messages": [
            {"role": "user", "content": f"{INSTRUCTION}\n\n{text}"},
            {"role": "assistant", "content": answer},
        ]
    }


def make_splits(seed: int = SEED, n_train: int = N_TRAIN, n_eval: int = N_EVAL) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    seen: set[str] = set()

    def draw(first_names: list[str], n: int) -> list[dict]:
        rows = []
        while len(rows) < n:
            row = make_row(rng, first_names)
            prompt = row["messages"][0]["content"]
            if prompt not in seen:
                seen.add(prompt)
                rows.append(row)
        return rows

    eval_rows = draw(FIRST_EVAL, n_eval)
    train_rows = draw(FIRST_TRAIN, n_train)
    return train_rows, eval_rows


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the files in --out-dir differ from the generated ones")
    args = parser.parse_args(argv)

    train_rows, eval_rows = make_splits(args.seed)
    outputs = {"demo_train.jsonl": to_jsonl(train_rows), "demo_eval.jsonl": to_jsonl(eval_rows)}
    if args.check:
        stale = [n for n, text in outputs.items()
                 if not (args.out_dir / n).is_file()
                 or (args.out_dir / n).read_text(encoding="utf-8") != text]
        if stale:
            print(f"out of date: {', '.join(stale)} (run {Path(__file__).name} to regenerate)", file=sys.stderr)
            return 1
        print("demo data up to date")
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in outputs.items():
        (args.out_dir / name).write_text(text, encoding="utf-8", newline="\n")
        print(f"wrote {args.out_dir / name} ({text.count(chr(10))} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
