"""Greedy text of one quantized folder through the fused kernels (CUDA) and through the PyTorch reference (CPU).

    python benchmarks/kernel_vs_reference.py FOLDER [--tokens 48] [--dtype float32] [--prompt "..."]

The folder (written by ``quantkit quantize``) is loaded twice: on the CPU, where every ``QuantizedLinear`` runs the
reference (dequantize, then matmul), and on CUDA, where it runs the Triton kernels; the script checks which path
each copy's layers dispatch to, generates greedily from the same chat prompts on both, and prints both texts, the
number of equal tokens and the largest logit difference on the prompt. Exit status 0 if every prompt's tokens
are equal, 1 otherwise. Both copies compute in ``--dtype`` (float32 by default, so the comparison is of the
kernels, not of fp16 against fp32 rounding).

Getting a SmolLM2 folder onto the GPU machine: a device call carries at most 64 MiB, and a W4 g128 SmolLM2 folder
is about 170 MB (its fp32 embedding is 108 MiB of it). Pack it (``tar cf``), ``split -b 60M`` it into an ignored
folder, and carry one part per call while the machine stays warm (calls less than 30 s apart), each call appending
its part to one file under /tmp there; the last call unpacks it and runs this script
(``QK_FOLDER=/tmp/FOLDER bash benchmarks/gpu_session.sh generate``).
"""

from __future__ import annotations

import argparse
import sys

import torch

PROMPTS = ["What is the capital of France?", "Write one sentence about the ocean.", "List three prime numbers."]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per prompt")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    ap.add_argument("--prompt", action="append", help="a user message (repeatable); default: three fixed ones")
    ap.add_argument("--device", default="cuda", help="the kernel side's device (cpu only to try the script)")
    args = ap.parse_args(argv)
    from quantkit.loading import load_model
    from quantkit.nn import kernel_for

    dtype = getattr(torch, args.dtype)
    ref, tok = load_model(args.folder, dtype=dtype, device="cpu")
    fast, _ = load_model(args.folder, dtype=dtype, device=args.device)
    paths = kernel_for(ref), kernel_for(fast)
    print(f"{args.folder}: reference side runs {paths[0]} on cpu, kernel side runs {paths[1]} on {args.device}; "
          f"{args.dtype}, {args.tokens} new tokens, greedy")
    if paths[0] != "pytorch-reference" or (args.device != "cpu" and paths[1] == "pytorch-reference"):
        print("the two copies do not run the two paths being compared", file=sys.stderr)
        return 2
    all_equal = True
    for prompt in args.prompt or PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            logit_diff = (ref(ids).logits.float() - fast(ids.to(args.device)).logits.float().cpu()).abs().max().item()
            a = ref.generate(ids, max_new_tokens=args.tokens, do_sample=False)[0, ids.shape[1]:]
            b = fast.generate(ids.to(args.device), max_new_tokens=args.tokens, do_sample=False)[0, ids.shape[1]:].cpu()
        n = min(len(a), len(b))
        same = int((a[:n] == b[:n]).cumprod(0).sum())
        equal = len(a) == len(b) == same
        all_equal &= equal
        print(f"\nprompt: {prompt!r}\n  max |logit difference| on the prompt: {logit_diff:.3e}\n"
              f"  tokens equal: {same} of {max(len(a), len(b))}{'' if equal else '  <- DIFFERENT'}\n"
              f"  reference: {tok.decode(a, skip_special_tokens=True)!r}\n"
              f"  kernels:   {tok.decode(b, skip_special_tokens=True)!r}")
    print("\nsame greedy text on every prompt" if all_equal else "\nthe greedy texts differ")
    return 0 if all_equal else 1


if __name__ == "__main__":
    sys.exit(main())
