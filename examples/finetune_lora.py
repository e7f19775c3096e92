"""Fine-tune LoRA adapters on a quantized model with PEFT and transformers' Trainer (QLoRA-style: the packed base
stays frozen, only the adapters train), then save the adapter and check that it reloads to the same logits.

    python examples/finetune_lora.py QUANTIZED_DIR [--tokens 512] [--seqlen 128] [--steps 8] [--out ADAPTER_DIR]

QUANTIZED_DIR is a folder written by ``quantkit quantize``. The text is the first ``--tokens`` tokens of C4
($QUANTKIT_DATA_DIR/c4/c4-train.00000-of-01024.first1000.jsonl unless ``--data``), cut into ``--seqlen`` blocks; a
few steps over them show the loss falling (the adapters fit this small text, which is all a smoke test asks).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

import quantkit  # noqa: F401  (registers the quantkit method with transformers, and LoRA on its layers with PEFT)

C4 = "c4/c4-train.00000-of-01024.first1000.jsonl"


def c4_blocks(path: Path, tokenizer, tokens: int, seqlen: int) -> Dataset:
    """The first ``tokens`` tokens of the documents in ``path`` (JSON lines with a ``text`` field), in blocks."""
    ids: list[int] = []
    with path.open() as f:
        for line in f:
            ids += tokenizer(json.loads(line)["text"] + tokenizer.eos_token)["input_ids"]
            if len(ids) >= tokens:
                break
    n = tokens // seqlen * seqlen
    if n == 0 or len(ids) < n:
        raise SystemExit(f"{path}: fewer than {max(n, seqlen)} tokens")
    blocks = torch.tensor(ids[:n]).view(-1, seqlen).tolist()
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


class PrintLoss(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            print(f"step {state.global_step:3d}  loss {logs['loss']:.4f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="a folder written by quantkit quantize")
    p.add_argument("--data", type=Path, default=None,
                   help=f"JSON lines with a text field (default: $QUANTKIT_DATA_DIR/{C4})")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="all-linear", help="'all-linear' or comma-separated module names")
    p.add_argument("--out", type=Path, default=None, help="where to save the adapter (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    data = args.data or Path(os.environ.get("QUANTKIT_DATA_DIR", "data")) / C4

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    model.print_trainable_parameters()
    train = c4_blocks(data, tokenizer, args.tokens, args.seqlen)
    print(f"{len(train)} blocks of {args.seqlen} tokens from {data}")

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "adapter"
        training = TrainingArguments(
            output_dir=str(Path(tmp) / "trainer"), per_device_train_batch_size=args.batch, max_steps=args.steps,
            learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
            report_to=[], seed=args.seed, disable_tqdm=True)
        trainer = Trainer(model=model, args=training, train_dataset=train, callbacks=[PrintLoss()])
        trainer.train()

        model.save_pretrained(out)
        model.eval()
        x = torch.tensor(train[0]["input_ids"])[None]
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), out)
        with torch.no_grad():
            diff = (reloaded(input_ids=x).logits - model(input_ids=x).logits).abs().max().item()
        where = out if args.out else "a temporary folder"
        print(f"adapter saved to {where}; reloaded on a fresh base: max |logit difference| {diff:.3g}")


if __name__ == "__main__":
    main()
