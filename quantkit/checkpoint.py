"""Writing a quantized checkpoint: safetensors shards, config, tokenizer files, published atomically."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["CHECKSUMS_KEY", "GUARD_SHAPE", "guard_key", "guard_tensor",
           "write_shards", "atomic_path", "atomic_write_text", "save_tensors", "folder_size",
           "REPORT_NAME"]

REPORT_NAME = "quantkit_report.json"
CHECKSUMS_KEY = "quantkit.sha256"  # safetensors metadata: JSON {tensor name: sha256 of its stored bytes}
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
                       torch.float8_e5m2: "F8_E5M2"}
WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json")
GUARD_SHAPE = (1,)


def guard_key(quantized) -> str:
    """Where a checkpoint stores its guard: the ``weight`` of its first quantized linear by name.

    The guard is a float32 tensor of shape ``GUARD_SHAPE`` stored under that name. transformers without quantkit
    (not installed, or ``QUANTKIT_AUTOLOAD=0``) does not know ``quant_method: "quantkit"``. It would build plain
    ``nn.Linear`` layers and initialize them at random, since their weights are missing. With the guard, the
    ``[1]`` tensor does not fit the layer's ``[out, in]`` weight, and transformers raises. quantkit's loader
    expects the guard where it is written (quantkit.hf.checks) and keeps it out of the model. Checkpoints written
    before the guard load as before."""
    return f"{min(quantized)}.weight"


def guard_tensor() -> torch.Tensor:
    return torch.zeros(GUARD_SHAPE, dtype=torch.float32)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to: on success it is fsynced and renamed onto `path`, on failure
    removed, so a reader sees the old file or the whole new one, never a torn one. The temporary keeps `path`'s
    suffix (`x.tmp.png`) for writers that read the format from it."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, whose I/O errors (a ``SafetensorError`` reading "os error 28") become the
    ``OSError`` they are, naming ``path``."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except OSError:
        raise
    except Exception as e:
        m = re.search(r"os error (\d+)", str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from e


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        save_tensors(tensors, tmp, metadata=metadata)


def write_shards(tensors: dict[str, torch.Tensor], folder: Path, *, max_shard_bytes: int = 4 * 2**30) -> None:
    """``model.safetensors``, or numbered shards plus ``model.safetensors.index.json`` past ``max_shard_bytes``.
    Each file's metadata holds, under ``CHECKSUMS_KEY``, the sha256 of every tensor's bytes (``quantkit verify``
    re-hashes them). The files are written here rather than by ``safetensors.torch.save_file``, which orders
    metadata keys at random (a Rust HashMap): the same tensors always give the same bytes."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    for name, shard in zip(names, shards, strict=True):
        _write_safetensors(shard, folder / name)
    if len(shards) == 1:
        return
    weight_map = {k: name for name, shard in zip(names, shards, strict=True) for k in shard}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """One safetensors file with sorted metadata (``format: pt`` and the tensors' sha256): the header, padded to
    8 bytes, then the tensors' bytes, widest dtype first so each stays aligned."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    raw = {k: tensors[k].reshape(-1).view(torch.uint8).numpy() for k in order}
    sums = {k: hashlib.sha256(raw[k]).hexdigest() for k in sorted(tensors)}
    header: dict[str, object] = {"__metadata__": {"format": "pt",
                                                  CHECKSUMS_KEY: json.dumps(sums, separators=(",", ":"))}}
    at = 0
    for k in order:
        t = tensors[k]
        header[k] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                     "data_offsets": [at, at + raw[k].nbytes]}
        at += raw[k].nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    try:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for k in order:
                f.write(raw[k].data)
    except OSError as e:  # a full disk says so without the file
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config and other small files; not weights, not config.json, not hidden files (a
    quantkit marker of a source that is itself an output), not a report."""
    for p in sorted(src.iterdir()):
        if (p.is_file() and p.name not in ("config.json", REPORT_NAME) and not p.name.startswith(".")
                and not any(p.match(g) for g in WEIGHT_FILES)):
            shutil.copy2(p, dst / p.name)


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
