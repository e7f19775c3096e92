"""Loaders for quantkit's offline zero-shot task configs (the ``*_local.yaml`` files next to this one).

Each loader reads a public release file from the data folder and returns the records in the schema of the
Hugging Face dataset that lm-eval's built-in task reads (``allenai/ai2_arc``, ``baber/piqa``,
``allenai/winogrande``, ``EleutherAI/lambada_openai``), so the built-in prompts, choices and targets apply
unchanged. lm-eval calls them as ``custom_dataset(**metadata, **dataset_kwargs)``.

The data folder is the task metadata's ``data_dir`` (``TaskManager(metadata=...)``, or ``--metadata`` on the
``lm_eval`` command line), else ``$QUANTKIT_DATA_DIR``. This file is loaded by lm-eval from its path, so it
imports nothing from quantkit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import datasets

__all__ = ["arc", "piqa", "winogrande", "lambada", "data_root", "read_jsonl"]


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    root = data_dir or os.environ.get("QUANTKIT_DATA_DIR")
    if not root:
        raise FileNotFoundError(
            "quantkit's local zero-shot tasks need the data folder: set QUANTKIT_DATA_DIR, or pass "
            "--metadata '{\"data_dir\": \"PATH\"}' to lm_eval"
        )
    return Path(root).expanduser()


def _path(data_dir: str | os.PathLike | None, rel: str) -> Path:
    path = data_root(data_dir) / rel
    if not path.is_file():
        raise FileNotFoundError(f"zero-shot data file not found: {path}")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _dataset(split: str, records: list[dict[str, Any]]) -> datasets.DatasetDict:
    return datasets.DatasetDict({split: datasets.Dataset.from_list(records)})


def arc(*, data_file: str, split: str, data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """AI2 ARC JSONL (``question.stem``, ``question.choices[{text, label}]``) -> the ``allenai/ai2_arc`` rows."""
    rows = []
    for r in read_jsonl(_path(data_dir, data_file)):
        choices = r["question"]["choices"]
        rows.append({
            "id": r["id"],
            "question": r["question"]["stem"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            "answerKey": r["answerKey"],
        })
    return _dataset(split, rows)


def piqa(*, data_file: str, labels_file: str, split: str, data_dir: str | None = None,
         **_: Any) -> datasets.DatasetDict:
    """PIQA ``valid.jsonl`` (goal, sol1, sol2) with ``valid-labels.lst`` (one 0/1 per line) -> ``label`` ints."""
    records = read_jsonl(_path(data_dir, data_file))
    labels = _path(data_dir, labels_file).read_text(encoding="utf-8").split()
    if len(labels) != len(records):
        raise ValueError(f"PIQA: {len(records)} records but {len(labels)} labels")
    rows = [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)}
            for r, y in zip(records, labels, strict=True)]
    return _dataset(split, rows)


def winogrande(*, data_file: str, split: str, data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """WinoGrande ``dev.jsonl`` already has the fields of ``allenai/winogrande`` (answer "1"/"2")."""
    rows = [{k: r[k] for k in ("sentence", "option1", "option2", "answer")}
            for r in read_jsonl(_path(data_dir, data_file))]
    return _dataset(split, rows)


def lambada(*, data_file: str, split: str, data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """OpenAI's detokenized LAMBADA test (field ``text``), the ``EleutherAI/lambada_openai`` default config."""
    return _dataset(split, [{"text": r["text"]} for r in read_jsonl(_path(data_dir, data_file))])
