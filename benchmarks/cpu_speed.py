"""Speed of quantkit on CPU: the Hadamard transform, one forward, and SmolLM2 dense against packed, in one run.

    python benchmarks/cpu_speed.py --hadamard                 # hadamard_transform at 1 and 1024 rows, model widths
    python benchmarks/cpu_speed.py --forward FOLDER [FOLDER]  # one forward of a [16, 64] batch of token ids
    python benchmarks/cpu_speed.py --compare Q1 [Q2 ...]      # SmolLM2 fp32 and bf16 against packed folders

``--compare`` loads the bundled SmolLM2 (``quantkit.loading.resolve_model("smollm2-135m")``) in fp32 and in bf16,
then each quantized folder with bf16 activations (served by the CPU kernels, :mod:`quantkit.kernels.cpu`) and with
fp32 activations (the exact fp32 path by default, ``cpu-dequant``; and the bf16 kernels with
``QUANTKIT_CPU_KERNELS=bf16``: the kernel column says "(bf16)"), each dtype again by the PyTorch reference
(``QUANTKIT_CPU_KERNELS=0``) unless ``--no-reference``. For each
it times greedy decoding, batch 1: the prompt's forward (``--prompt-len`` tokens, untimed) gives the first token,
then ``--new-tokens`` - 1 timed steps each run the model's forward on the last token with its KV cache and take the
argmax (tokens/s = those steps / their time); and one forward of a [16, 64] batch. It prints one table: the ratios
to fp32 (fp32's time over the row's, so above 1 is faster), the kernel that served (``quantkit.nn.kernel_for``),
and for kernel rows whether the greedy tokens equal the reference's and the relative difference of the [16, 64]
forward's last logits from the reference's.

Times are the best of ``--reps`` wall-clock runs after a warm-up (reference rows: one run), with torch's threads
(``--threads`` to set them). Used to compare commits: run it under each commit's install (e.g.
``PYTHONPATH=site-of-that-commit``). The figures are the machine's: run it on a quiet one to record them.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import torch

import quantkit  # noqa: F401  (registers the quantized format with transformers)
from quantkit.rotations import hadamard_layout
from quantkit.rotations.randomized import hadamard_transform

ENV = "QUANTKIT_CPU_KERNELS"


def best_of(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@dataclass
class Row:
    name: str
    act: str  # activation dtype
    kernel: str
    tok_s: float
    forward_s: float
    tokens: list[int]
    logits: torch.Tensor  # last position of the [16, 64] forward, fp32
    same_tokens: str = ""
    logit_diff: str = ""


def greedy_decode(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    """Seconds of ``new_tokens`` greedy steps after the prompt's forward, and the tokens."""
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        cache, tok = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [tok.item()]
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=tok, cache=cache, use_cache=True)
            cache, tok = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(tok.item())
        return time.perf_counter() - t0, tokens


def measure(name: str, model, act: torch.dtype, args, reps: int) -> Row:
    from quantkit.nn import kernel_for

    model = model.to(act).eval()
    try:
        kernel = kernel_for(model, act)
    except ValueError:  # a dense model
        kernel = "dense"
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 1000, (1, args.prompt_len), generator=gen)
    ids = torch.randint(0, 1000, (16, 64), generator=gen)
    greedy_decode(model, prompt, 4)  # warm-up (the CPU kernels repack each layer on its first call)
    decode = [greedy_decode(model, prompt, args.new_tokens) for _ in range(reps)]
    seconds = min(t for t, _ in decode)
    with torch.no_grad():
        forward = best_of(lambda: model(input_ids=ids), reps)
        logits = model(input_ids=ids).logits[:, -1].float()
    row = Row(name, str(act).removeprefix("torch."), kernel, (args.new_tokens - 1) / seconds, forward,
              decode[0][1], logits)
    print(f"  measured {name} {row.act} {kernel}: {row.tok_s:.2f} tok/s, forward {forward:.3f} s", flush=True)
    return row


def compare(args) -> list[Row]:
    from transformers import AutoModelForCausalLM

    from quantkit.loading import resolve_model

    base = resolve_model("smollm2-135m").folder
    rows = []
    for act in (torch.float32, torch.bfloat16):
        rows.append(measure("smollm2 dense", AutoModelForCausalLM.from_pretrained(base, dtype=act), act, args,
                            args.reps))
    saved = os.environ.get(ENV)
    try:
        for folder in args.compare:
            name = os.path.basename(os.path.normpath(folder))
            # bf16 activations: the kernels' own dtype; fp32: the exact fp32 path by default, the bf16 kernels with
            # QUANTKIT_CPU_KERNELS=bf16
            for act, modes in ((torch.bfloat16, ("1",)), (torch.float32, ("1", "bf16"))):
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=act)
                fast_rows = []
                for mode in modes:
                    os.environ[ENV] = mode
                    fast_rows.append(measure(name, model, act, args, args.reps))
                    if mode == "bf16":
                        fast_rows[-1].kernel += " (bf16)"
                rows += fast_rows
                if args.no_reference:
                    continue
                os.environ[ENV] = "0"
                ref = measure(name, model, act, args, 1)
                rows.append(ref)
                for fast in fast_rows:
                    diverge = [i for i, (a, b) in enumerate(zip(fast.tokens, ref.tokens, strict=True)) if a != b]
                    fast.same_tokens = f"from {diverge[0]}" if diverge else "yes"
                    fast.logit_diff = f"{((fast.logits - ref.logits).norm() / ref.logits.norm()).item():.1e}"
    finally:
        if saved is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = saved
    return rows


def print_table(rows: list[Row], args) -> None:
    fp32 = rows[0]
    print(f"greedy decode: prompt {args.prompt_len}, {args.new_tokens} new tokens, batch 1; forward: [16, 64]; "
          f"best of {args.reps} (reference rows: 1)")
    head = (f"{'model':<34} {'act':<9} {'kernel':<18} {'decode tok/s':>12} {'x fp32':>7} {'fwd [16,64] s':>13} "
            f"{'x fp32':>7}  {'tokens = ref':<12} {'logits vs ref':<13}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.name:<34} {r.act:<9} {r.kernel:<18} {r.tok_s:>12.2f} {r.tok_s / fp32.tok_s:>7.2f} "
              f"{r.forward_s:>13.3f} {fp32.forward_s / r.forward_s:>7.2f}  {r.same_tokens:<12} {r.logit_diff:<13}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hadamard", action="store_true")
    p.add_argument("--forward", nargs="*", default=[])
    p.add_argument("--compare", nargs="*", default=None, metavar="FOLDER",
                   help="quantized folders to time against SmolLM2 fp32 and bf16")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-reference", action="store_true", help="skip the reference rows of --compare")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, quantkit at {quantkit.__file__}")
    if args.hadamard:
        for n in (576, 1536, 4096, 11008):
            lay = hadamard_layout(n)
            for rows in (1, 1024):
                x = torch.randn(rows, n)
                t = best_of(lambda: hadamard_transform(x, lay), 20)  # noqa: B023 (called before the next iteration)
                print(f"hadamard_transform n={n} ({lay.describe()}), {rows} rows: {t * 1e6:.1f} µs")
    if args.forward:
        from transformers import AutoModelForCausalLM

        for folder in args.forward:
            model = AutoModelForCausalLM.from_pretrained(folder).eval()
            ids = torch.randint(0, 1000, (16, 64), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                t = best_of(lambda: model(ids), 3)  # noqa: B023
            print(f"forward [16, 64] of {folder}: {t:.3f} s")
    if args.compare is not None:
        print_table(compare(args), args)


if __name__ == "__main__":
    main()
