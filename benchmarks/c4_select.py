"""Perplexity on held-out C4 text, for choosing between recipe variants without touching the WikiText-2 test set.

Scores the first N windows of the second half of the local C4 sample (documents 500–999 of
``c4/c4-train.00000-of-01024.first1000.jsonl`` under the data folder, joined by blank lines). Data-free recipes see
no calibration text at all; calibrated ones draw their windows from the whole sample, so for those this is not a
held-out set. Used to decide which linears the data-free Hadamard presets keep unrotated (BENCHMARKS.md).

    python benchmarks/c4_select.py MODEL [MODEL ...] [--windows 8] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import os

import torch

from quantkit.data import C4_SAMPLE, load_calibration_texts
from quantkit.errors import QuantkitError
from quantkit.eval.perplexity import perplexity
from quantkit.loading import load_model


def heldout_c4_text(root: str) -> tuple[str, str]:
    """Documents 500–999 of the local C4 sample joined by blank lines, and a label saying which documents."""
    docs = load_calibration_texts("c4", root)  # the local sample, as calibration reads it
    if len(docs) < 2:
        raise QuantkitError(f"{root}/{C4_SAMPLE}: too few documents to hold half out")
    return "\n\n".join(docs[len(docs) // 2 :]), f"documents {len(docs) // 2}–{len(docs) - 1}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="quantized folders, or anything `quantkit eval` accepts")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--data-dir", default=None, help="local data folder (default: $QUANTKIT_DATA_DIR)")
    args = p.parse_args()

    root = args.data_dir or os.environ.get("QUANTKIT_DATA_DIR")
    if not root:
        raise SystemExit("c4_select: needs the local data folder (--data-dir or QUANTKIT_DATA_DIR)")
    text, which = heldout_c4_text(root)
    print(f"| model | C4 ppl, first {args.windows} x {args.seqlen} of {which} |")
    print("|---|---|")
    for spec in args.models:
        model, tok = load_model(spec, dtype=torch.float32)
        ids = tok(text, return_tensors="pt").input_ids
        r = perplexity(model, ids, seqlen=args.seqlen, windows=args.windows, progress=False)
        print(f"| {spec} | {r.ppl:.3f} |", flush=True)


if __name__ == "__main__":
    main()
