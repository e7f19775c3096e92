"""Greedy answer of a quantized (or any) folder to one chat prompt: the capital-of-France check of BENCHMARKS.md.

    python benchmarks/prompt.py FOLDER ["What is the capital of France?"] [--max-new-tokens 24]
"""

from __future__ import annotations

import argparse
import sys

import quantkit  # noqa: F401  (registers the quantized format with transformers)


def answer(folder: str, prompt: str, max_new_tokens: int = 24) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("prompt", nargs="?", default="What is the capital of France?")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    a = ap.parse_args(argv)
    print(repr(answer(a.folder, a.prompt, a.max_new_tokens)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
