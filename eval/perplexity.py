"""Perplexity on WikiText-2 raw test, with the protocol of DESIGN.md ("What the numbers mean").

Rows are the file's lines, a lone-space line read as an empty row and every other line keeping its trailing
newline (exactly the Hugging Face ``wikitext-2-raw-v1`` test rows); rows are joined with ``"\\n\\n"`` and
tokenized once; the token stream is cut into non-overlapping windows of ``seqlen`` (remainder dropped); the
token NLL is averaged over all windows and exponentiated. Full: every window (148 of 2048 for SmolLM2).
Quick: the first 16.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from quantkit.errors import QuantkitError

__all__ = ["PerplexityResult", "QUICK_WINDOWS", "perplexity", "wikitext2_perplexity", "wikitext2_text", "data_dir"]

QUICK_WINDOWS = 16
_LOG_FLOAT_MAX = math.log(sys.float_info.max)  # ~709.78: exp of more overflows a float


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean token NLL (nats)
    windows: int
    seqlen: int
    tokens: int  # size of the whole tokenized text


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    d = explicit or os.environ.get("QUANTKIT_DATA_DIR")
    return Path(d) if d else None


def wikitext2_text(data: str | os.PathLike | None = None) -> str:
    """The test split as one string: the offline file under ``data``/QUANTKIT_DATA_DIR, else the Hub split."""
    root = data_dir(data)
    if root is not None:
        path = root / "wikitext-2-raw" / "wiki.test.raw"
        if not path.is_file():
            raise QuantkitError(f"WikiText-2 test file not found: {path}")
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        rows = ["" if line in (" \n", " ") else line for line in lines]
        return "\n\n".join(rows)
    from datasets import load_dataset

    try:
        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    except Exception as e:
        raise QuantkitError(f"could not load wikitext-2-raw-v1 from the Hub ({type(e).__name__}); "
                            "set QUANTKIT_DATA_DIR to a local data folder") from e
    return "\n\n".join(rows)


@torch.no_grad()
def perplexity(
    model, input_ids: torch.Tensor, *, seqlen: int = 2048, windows: int | None = None, progress: bool = True
) -> PerplexityResult:
    """``input_ids`` [n]: the whole tokenized text. ``windows=None`` scores every full window.

    A window whose mean NLL is not finite (a model whose logits hold NaN or inf) ends the run there: the result's
    ``nll`` and ``ppl`` are then NaN or inf and ``windows`` counts the windows scored, the last one the culprit.
    A finite mean NLL too large to exponentiate (past ~709 nats) gives ``ppl = inf``."""
    if seqlen < 2:
        raise QuantkitError(f"a perplexity window needs at least 2 tokens (the first is never scored), got {seqlen}")
    ids = input_ids.reshape(-1)
    available = ids.numel() // seqlen
    if available == 0:
        raise QuantkitError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    n = available if windows is None else min(windows, available)
    device = next(model.parameters()).device
    total = 0.0
    for w in tqdm(range(n), desc=f"perplexity ({n} x {seqlen})", disable=not progress):
        x = ids[w * seqlen : (w + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(x, use_cache=False).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="mean").item()
        if not math.isfinite(nll):  # the mean is lost whatever the other windows give
            return PerplexityResult(ppl=nll if nll > 0 else math.nan, nll=nll, windows=w + 1, seqlen=seqlen,
                                    tokens=ids.numel())
        total += nll
    mean = total / n
    ppl = math.exp(mean) if mean < _LOG_FLOAT_MAX else math.inf
    return PerplexityResult(ppl=ppl, nll=mean, windows=n, seqlen=seqlen, tokens=ids.numel())


def wikitext2_perplexity(model, tokenizer, *, seqlen: int = 2048, windows: int | None = None,
                         data: str | os.PathLike | None = None, progress: bool = True) -> PerplexityResult:
    ids = tokenizer(wikitext2_text(data), return_tensors="pt").input_ids
    return perplexity(model, ids, seqlen=seqlen, windows=windows, progress=progress)


def main(argv: list[str] | None = None) -> None:
    from quantkit.loading import load_model

    p = argparse.ArgumentParser(description="WikiText-2 perplexity of a model (DESIGN.md protocol)")
    p.add_argument("--model", default=None, help="HF id, folder, .gguf, or smollm2-135m (default)")
    p.add_argument("--windows", type=int, default=None, help=f"first N windows (quick: {QUICK_WINDOWS}); default all")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    a = p.parse_args(argv)
    model, tok = load_model(a.model, dtype=torch.float32)
    r = wikitext2_perplexity(model, tok, seqlen=a.seqlen, windows=a.windows, data=a.data_dir)
    print(json.dumps({"model": a.model, **asdict(r)}, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps({"model": a.model, **asdict(r)}, indent=2))


if __name__ == "__main__":
    main()
