"""C4 validation perplexity, GPTQ's convention (Frantar et al., 2022, ``datautils.get_c4``). Online only.

From the ``allenai/c4`` shard ``en/c4-validation.00000-of-00008.json.gz``, 256 windows of ``seqlen`` tokens:
with Python's ``random`` seeded 0, each window draws a random document until one is longer than ``seqlen``
tokens, then a random start inside it; the windows are concatenated and scored by ``perplexity`` as
non-overlapping windows. (GPTQ accepts a document of exactly ``seqlen`` tokens and then fails drawing the
start; we draw another document instead, which changes nothing in any run GPTQ completes.)

Offline there is no C4 validation data: the local C4 file is a *train* sample, used for calibration, and
scoring a model on its own calibration text would not be a held-out figure. Hence the error.
"""

from __future__ import annotations

import logging
import os
import random

import torch

from quantkit.errors import QuantkitError

__all__ = ["C4_VALIDATION_SHARD", "C4_WINDOWS", "c4_validation_ids"]

logger = logging.getLogger(__name__)

C4_VALIDATION_SHARD = "en/c4-validation.00000-of-00008.json.gz"
C4_WINDOWS = 256


def _validation_texts() -> list[str]:
    from datasets import load_dataset

    try:
        ds = load_dataset("allenai/c4", data_files={"validation": C4_VALIDATION_SHARD}, split="validation")
    except Exception as e:
        raise QuantkitError(f"could not load the C4 validation shard {C4_VALIDATION_SHARD} from the Hub "
                            f"({type(e).__name__})") from e
    return ds["text"]


def c4_validation_ids(tokenizer, *, seqlen: int = 2048, nsamples: int = C4_WINDOWS, seed: int = 0,
                      data: str | os.PathLike | None = None) -> torch.Tensor:
    """[nsamples * seqlen] token ids: GPTQ's C4 validation windows, concatenated."""
    if data is not None:
        raise QuantkitError(
            "no C4 validation data offline: the data folder's C4 file is a train sample (calibration data); "
            "run --ppl c4 online (without --data-dir / QUANTKIT_DATA_DIR) or use --ppl wikitext2"
        )
    texts = _validation_texts()
    rng = random.Random(seed)
    windows = []
    for _ in range(nsamples):
        while True:
            ids = tokenizer(texts[rng.randint(0, len(texts) - 1)], return_tensors="pt").input_ids[0]
            if ids.numel() > seqlen:
                break
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    logger.info("C4 validation: %d windows of %d tokens (seed %d)", nsamples, seqlen, seed)
    return torch.cat(windows)
