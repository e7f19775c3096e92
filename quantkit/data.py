"""Calibration data: C4 (the local sample under the data folder, else the Hub shard), WikiText-2 train (Hub),
or a local ``.txt`` / ``.jsonl`` file (field ``text``).

Documents are tokenized, joined into one stream with the EOS token between them, and ``nsamples`` windows of
``seqlen`` tokens are cut at random offsets drawn from a generator seeded with ``seed``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from quantkit.errors import QuantkitError

__all__ = ["C4_SAMPLE", "load_calibration_texts", "calibration_ids"]

C4_SAMPLE = "c4/c4-train.00000-of-01024.first1000.jsonl"


def _data_dir(explicit: str | os.PathLike | None) -> Path | None:
    d = explicit or os.environ.get("QUANTKIT_DATA_DIR")
    return Path(d) if d else None


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise QuantkitError(f"calibration file not found: {path}" if not path.exists()
                            else f"calibration path is not a file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QuantkitError(f"calibration file is not UTF-8 text (byte {e.start}): {path}") from None
    if "\x00" in text:
        raise QuantkitError(f"calibration file holds binary data (NUL bytes), not text: {path}")
    return text


def _read_file(path: Path) -> list[str]:
    if path.suffix not in (".jsonl", ".txt"):
        raise QuantkitError(f"calibration file must be .txt or .jsonl: {path}")
    text = _read_text(path)
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise QuantkitError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise QuantkitError(f"{path}:{i}: each JSONL record needs a string field 'text'")
            texts.append(record["text"])
    else:
        texts = [text]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise QuantkitError(f"calibration file has no text: {path}")
    return texts


def load_calibration_texts(calib: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    root = _data_dir(data_dir)
    if calib == "c4":
        if root is not None:
            return _read_file(root / C4_SAMPLE)
        return _hub_texts("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
    if calib == "wikitext2":
        return _hub_texts("wikitext", "wikitext-2-raw-v1", split="train")
    return _read_file(Path(calib).expanduser())


def _hub_texts(*args, **kwargs) -> list[str]:
    from datasets import load_dataset

    try:
        ds = load_dataset(*args, **kwargs)
    except Exception as e:
        raise QuantkitError(
            f"could not load calibration data {args[0]!r} from the Hub ({type(e).__name__}); offline, set "
            "QUANTKIT_DATA_DIR (or --data-dir) to a data folder, or pass a .txt/.jsonl file"
        ) from e
    return [t for t in ds["text"] if t.strip()]


def calibration_ids(tokenizer, texts: list[str], *, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """[nsamples, seqlen] token ids."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
    if len(stream) < seqlen:
        raise QuantkitError(f"calibration text has {len(stream)} tokens, fewer than one sequence of {seqlen}")
    ids = torch.tensor(stream, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seqlen + 1, (nsamples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
