"""Try a model: one-shot generation for scripts and an interactive chat for people.

Both render with the model's own chat template and stop at its end-of-turn token, exactly as the
evaluation does (they share generate_answers).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from launcher.contract.run_dir import FINAL, RunDir
from trainer.generation import generate_answers, generate_reply
from trainer.model import load_saved_model

HELP = "commands: /reset starts a new conversation, /system TEXT sets a system prompt, /exit (or Ctrl-D) quits"


def model_dir_of(target: str | Path) -> Path:
    """A model directory from itself or from a run directory (its final/ model)."""
    p = Path(target)
    if (p / "config.json").is_file():
        return p
    final = RunDir(p).final
    if (final / "config.json").is_file():
        return final
    raise FileNotFoundError(f"{p}: neither a Hugging Face model directory nor a run directory with {FINAL}/")


def load(target: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    directory = model_dir_of(target)
    return (load_saved_model(directory, torch.float32, trust_remote_code),
            AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code))


def generate(target: str, prompt: str, system: str | None = None, max_new_tokens: int = 256,
             trust_remote_code: bool = False) -> str:
    return generate_reply(str(model_dir_of(target)), prompt, system, max_new_tokens,
                          trust_remote_code=trust_remote_code)


def chat(target: str, system: str | None = None, max_new_tokens: int = 256, trust_remote_code: bool = False,
         stdin=sys.stdin, stdout=sys.stdout) -> None:
    """Read a user turn, answer it with the whole conversation as context, repeat."""
    model, tokenizer = load(target, trust_remote_code)
    print(f"chatting with {model_dir_of(target)} ({HELP})", file=stdout, flush=True)
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            print(file=stdout)
            return
        text = line.strip()
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            print("(new conversation)", file=stdout, flush=True)
            continue
        if text.startswith("/system"):
            messages = [{"role": "system", "content": text[len("/system"):].strip()}]
            print("(new conversation with that system prompt)", file=stdout, flush=True)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        answer = generate_answers(model, tokenizer, [messages], max_new_tokens, batch_size=1)[0].strip()
        messages.append({"role": "assistant", "content": answer})
        print(f"model> {answer}", file=stdout, flush=True)
