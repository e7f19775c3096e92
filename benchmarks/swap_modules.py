"""Which modules make one quantized model better or worse than another?

Loads two quantized checkpoints of the same model (A and B), then for each regex swaps the matching modules of
A for B's and measures perplexity on the first N windows: of WikiText-2 test, or with ``--data c4`` of the held-out
C4 text of ``c4_select.py`` (what choices between recipe variants should be made on). Used to find that GPTQ's
value projections, not its MLPs, put GPTQ W4 above round-to-nearest on SmolLM2 (BENCHMARKS.md).

    python benchmarks/swap_modules.py A B 're:.*\\.v_proj' 're:.*\\.mlp\\..*' [--windows 8] [--data c4]
"""

from __future__ import annotations

import argparse
import os
import re

import torch

from quantkit.eval.perplexity import perplexity, wikitext2_perplexity
from quantkit.loading import load_model


def _set(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, module)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("patterns", nargs="*", help="full-match regexes of module names to take from B")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--data", choices=["wikitext2", "c4"], default="wikitext2")
    args = p.parse_args()

    a, tok = load_model(args.a, dtype=torch.float32)
    b, _ = load_model(args.b, dtype=torch.float32)
    a_mods, b_mods = dict(a.named_modules()), dict(b.named_modules())
    if args.data == "c4":
        from c4_select import heldout_c4_text  # beside this script

        ids = tok(heldout_c4_text(os.environ["QUANTKIT_DATA_DIR"])[0], return_tensors="pt").input_ids

    def score() -> float:
        if args.data == "c4":
            return perplexity(a, ids, seqlen=2048, windows=args.windows, progress=False).ppl
        return wikitext2_perplexity(a, tok, windows=args.windows, progress=False).ppl

    print(f"| modules from B | swapped | ppl, first {args.windows} windows |\n|---|---|---|")
    for pattern in ["(none)", *args.patterns]:
        names = [] if pattern == "(none)" else [n for n in a_mods if re.fullmatch(pattern.removeprefix("re:"), n)
                                                and type(a_mods[n]) is type(b_mods.get(n))
                                                and not list(a_mods[n].children())]
        for n in names:
            _set(a, n, b_mods[n])
        ppl = score()
        print(f"| `{pattern}` | {len(names)} | {ppl:.3f} |", flush=True)
        for n in names:
            _set(a, n, a_mods[n])


if __name__ == "__main__":
    main()
