"""A tiny random Llama with a small locally trained tokenizer, for tests and smoke runs.

Nothing can be downloaded on a compute node without network (or in CI), so the smallest real
Hugging Face causal LM is built here: a real LlamaForCausalLM and a real fast BPE tokenizer with a
ChatML chat template, saved with save_pretrained like any hub model.

    python -m examples.tiny_model OUT_DIR [--hidden 64 --layers 2]
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from trainer.data.render import CHATML

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]

# The vocabulary the tokenizer is trained on; bench/ writes its synthetic text from it too (~1.1 tokens a word).
WORDS = ("the a an of to in is was for on with as by at from that this it be are or not have has had "
         "one two three four five six seven eight nine ten red blue green cat dog bird fish tree river "
         "city house book water fire light stone answer question please tell me what which who how why "
         "yes no hello world reverse sort list word words number numbers capital country France Paris "
         "system user assistant you are helpful json name age color item items count first last").split()


def _corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 999)))
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ":", ",", ""]))
    return lines + ["{\"name\": \"x\", \"age\": 1}", "0123456789", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"]


def make_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer (any text encodes) with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<pad>", unk_token=None)
    fast.chat_template = CHATML
    return fast


def make_tiny_llama(out_dir: str | Path, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    intermediate: int = 128, vocab_size: int = 512, tie_embeddings: bool = False,
                    seed: int = 0) -> Path:
    """Save a random LlamaForCausalLM and its tokenizer to out_dir (a normal Hugging Face directory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = make_tokenizer(vocab_size)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=tie_embeddings,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    return save_with_tokenizer(LlamaForCausalLM(config), tokenizer, out)


def save_with_tokenizer(model, tokenizer, out: Path) -> Path:
    """Write a freshly built model with its tokenizer, generation ending at the tokenizer's eos."""
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv_heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--tie_embeddings", action="store_true")
    args = parser.parse_args()
    print(make_tiny_llama(args.out_dir, args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate,
                          tie_embeddings=args.tie_embeddings))


if __name__ == "__main__":
    main()
