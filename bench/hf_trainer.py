r"""The peer: the Hugging Face Trainer with its DeepSpeed integration.

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m bench.hf_trainer \
        --model DIR --ds_config ds.json --data rows.json --grad_accum 2 --steps 20 --out result.json

The bench gives it the DeepSpeed config a person writes by hand (batch sizes, AdamW, the stage; the
rest DeepSpeed's defaults), the same one the minimal loop's floor trains with.

Set up the way its documentation shows: TrainingArguments(deepspeed=...) before the model is loaded
(so ZeRO-3 builds it sharded), DataCollatorForSeq2Seq padding each batch to its longest sample with
labels -100 on the padding. The rows come pre-tokenized (prompt labels already -100) in the order
they are to be trained (`train_sampling_strategy="sequential"`), so the bench knows which samples
each rank saw at each step; the collator records them and a callback records when each step ends.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        r = self.rows[i]
        return {"idx": r["idx"], "input_ids": r["input_ids"], "attention_mask": [1] * len(r["input_ids"]),
                "labels": r["labels"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--ds_config", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--grad_accum", type=int, required=True)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    args = parser.parse_args()

    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    ds_config = json.load(open(args.ds_config))
    if not torch.cuda.is_available():
        # On CPU, accelerate (use_cpu below) starts torch.distributed but not DeepSpeed's comm layer, and
        # ZeRO-3's zero.Init would then see a world of 1: start DeepSpeed's first, as on GPUs it is.
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    training_args = TrainingArguments(
        output_dir=args.out + ".trainer", deepspeed=ds_config, per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=args.grad_accum, max_steps=args.steps, learning_rate=args.lr,
        # The Trainer clips through DeepSpeed's gradient_clipping, and insists the two agree.
        lr_scheduler_type="cosine", max_grad_norm=ds_config.get("gradient_clipping", 0.0), weight_decay=0.0,
        seed=args.seed, data_seed=args.seed, train_sampling_strategy="sequential", dataloader_drop_last=True,
        gradient_checkpointing=args.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="no", report_to="none", disable_tqdm=True, ddp_backend="gloo",
        # Without use_cpu, accelerate finds no GPU backend and sets up a world of 1 under torchrun.
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False)  # keep "idx" for the recording collator; it pops it before padding
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False

    pad = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    seen: list[list[int]] = []

    def collate(features: list[dict]) -> dict:
        seen.append([f.pop("idx") for f in features])
        return pad(features)

    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.time())

    rows = json.load(open(args.data))
    trainer = Trainer(model=model, args=training_args, train_dataset=Rows(rows), data_collator=collate,
                      callbacks=[StepTimes()])
    trainer.train()

    rank = training_args.process_index
    engine = trainer.model_wrapped
    result = {"seen": seen, "engine": type(engine).__name__, "world": training_args.world_size,
              "zero_stage": engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None}
    if rank == 0:
        result["step_end_times"] = ends
    with open(f"{args.out}.rank{rank}", "w") as fh:
        json.dump(result, fh)
    # Leaving gloo's threads to the interpreter's exit can abort the process ("terminate called...").
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
