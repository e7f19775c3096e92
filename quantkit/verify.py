"""Checking a quantkit checkpoint without running it: ``quantkit verify DIR``.

The structural check is the strict loader's (quantkit.hf.checks: every tensor present with its shape and dtype,
nothing else); :func:`verify` also re-hashes the tensors whose sha256 ``write_shards`` stored
(quantkit.checkpoint.CHECKSUMS_KEY) and checks the ``quantization_config`` as the loader reads it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.checkpoint import CHECKSUMS_KEY
from quantkit.errors import QuantkitError
from quantkit.hf.checks import StoredTensor, check_tensors, drop_ignored, expected_tensors, read_headers, weight_files

__all__ = ["VerifyReport", "verify"]

@dataclass
class VerifyReport:
    """What :func:`verify` checked: the folder, the weight files, how many tensors, and how many of them had a
    stored checksum that matched."""

    folder: Path
    files: list[str] = field(default_factory=list)
    tensors: int = 0
    checksums: int = 0

    def summary(self) -> str:
        if self.checksums == self.tensors:
            sums = "checksums verified"
        elif self.checksums == 0:
            sums = "no checksums stored (structure checked only)"
        else:
            sums = f"checksums verified for {self.checksums} (the others have none stored)"
        return f"ok {self.folder}: {self.tensors} tensors, {sums}"


def _load_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not folder.is_dir():
        raise QuantkitError(f"{folder}: not a folder")
    if not path.is_file():
        raise QuantkitError(f"{path}: missing; not a model folder")
    try:
        config = json.loads(path.read_bytes())
        assert isinstance(config, dict)
    except (UnicodeDecodeError, ValueError, AssertionError):
        raise QuantkitError(f"{path}: not valid JSON (a JSON object)") from None
    q = config.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "quantkit":
        raise QuantkitError(f"{path}: no quantkit quantization_config (quant_method "
                            f"{q.get('quant_method') if isinstance(q, dict) else None!r}); not a quantkit checkpoint")
    return config


def _skeleton(folder: Path, config: dict[str, Any]) -> nn.Module:
    """The model of ``config.json`` on the meta device with its quantized linears swapped in, as the loader
    builds it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantkit.hf.config import QuantkitConfig
    from quantkit.hf.quantizer import replace_linears

    qcfg = QuantkitConfig.from_dict(config["quantization_config"])
    try:
        model_config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise QuantkitError(f"{folder / 'config.json'}: not a usable model config ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
    replace_linears(model, qcfg.schemes())
    return model


def _hash(t: StoredTensor) -> str:
    h = hashlib.sha256()
    with open(t.file, "rb") as f:
        f.seek(t.begin)
        left = t.end - t.begin
        while left:
            chunk = f.read(min(left, 2**24))
            if not chunk:
                raise QuantkitError(f"{t.file}: truncated while reading")
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _check_checksums(found: dict[str, StoredTensor], metadata: dict[Path, dict]) -> int:
    """Re-hash every tensor whose file stores checksums; returns how many were checked."""
    checked = 0
    for path, meta in metadata.items():
        if CHECKSUMS_KEY not in meta:
            continue
        try:
            sums = json.loads(meta[CHECKSUMS_KEY])
            assert isinstance(sums, dict)
        except (ValueError, AssertionError):
            raise QuantkitError(f"{path}: garbled checksums in the safetensors metadata") from None
        stored = {n for n, t in found.items() if t.file == path}
        for name in sorted(stored ^ set(sums)):
            where = "has no stored checksum" if name in stored else "has a checksum but is not in the file"
            raise QuantkitError(f"{name}: {where} ({path.name}): the file was changed after quantkit wrote it")
        for name in sorted(stored, key=lambda n: found[n].begin):
            if _hash(found[name]) != sums[name]:
                raise QuantkitError(f"{name}: checksum mismatch in {path.name}: its bytes changed after quantkit "
                                    "wrote them (a corrupted file)")
            checked += 1
    return checked


def verify(folder: str | Path) -> VerifyReport:
    """Check a checkpoint folder written by ``quantkit quantize``: config.json and its ``quantization_config``,
    every expected tensor present with its shape and dtype and nothing else, and the stored checksums. Raises one
    ``QuantkitError`` naming the file or tensor; returns what was checked."""
    folder = Path(folder)
    config = _load_config(folder)
    model = _skeleton(folder, config)
    files, weight_map = weight_files(folder)
    found, metadata = read_headers(files, weight_map)
    check_tensors(expected_tensors(model), drop_ignored(model, found))
    checked = _check_checksums(found, metadata)
    return VerifyReport(folder, [p.name for p in files], len(found), checked)
