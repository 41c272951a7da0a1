"""Write the small example datasets shipped in examples/data/ (seeded, so the files never change).

    python examples/data/make_tiny_data.py

The task (reverse / sort / count a few words) follows from the prompt, so even a tiny random model
learns it in a few dozen steps and tests can watch the loss fall.
"""
import json
import random
from pathlib import Path

WORDS = "red blue green cat dog bird fish tree river city house book water fire light stone".split()
HERE = Path(__file__).resolve().parent


def task(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(2, 5))
    kind = rng.choice(["reverse", "sort", "count"])
    if kind == "reverse":
        return f"reverse: {' '.join(words)}", " ".join(reversed(words))
    if kind == "sort":
        return f"sort: {' '.join(words)}", " ".join(sorted(words))
    return f"count: {' '.join(words)}", str(len(words))


def chat_row(rng: random.Random) -> dict:
    messages = [{"role": "system", "content": "You are a precise assistant."}] if rng.random() < 0.5 else []
    for _ in range(rng.choice([1, 1, 2, 3])):
        prompt, answer = task(rng)
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def main() -> None:
    rng = random.Random(1234)
    files = {
        "tiny_chat.jsonl": [chat_row(rng) for _ in range(400)],
        "tiny_chat_eval.jsonl": [chat_row(rng) for _ in range(40)],
        "tiny_alpaca.jsonl": [dict(zip(("instruction", "output"), task(rng)), input="") for _ in range(300)],
        "tiny_text.jsonl": [{"text": " ".join(f"{p} -> {a}." for p, a in (task(rng) for _ in range(4)))}
                            for _ in range(300)],
    }
    for name, rows in files.items():
        with open(HERE / name, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"wrote {HERE / name} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
