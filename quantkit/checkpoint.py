"""Writing a quantized checkpoint: safetensors shards, config, tokenizer files, published atomically."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["write_shards", "atomic_path", "atomic_write_text", "save_tensors", "folder_size", "REPORT_NAME"]

REPORT_NAME = "quantkit_report.json"
WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json")


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
    """``model.safetensors``, or numbered shards plus ``model.safetensors.index.json`` past ``max_shard_bytes``."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    if len(shards) == 1:
        save_tensors(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_tensors(shard, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config and other small files; not weights, not config.json, not hidden files (a
    quantkit marker of a source that is itself an output), not a report."""
    for p in sorted(src.iterdir()):
        if (p.is_file() and p.name not in ("config.json", REPORT_NAME) and not p.name.startswith(".")
                and not any(p.match(g) for g in WEIGHT_FILES)):
            shutil.copy2(p, dst / p.name)


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
