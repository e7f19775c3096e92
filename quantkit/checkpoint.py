"""Writing a quantized checkpoint: safetensors shards, config, tokenizer files, published atomically."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["write_shards", "atomic_path", "atomic_write_text", "publish", "folder_size", "REPORT_NAME"]

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


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


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
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config and other small files; not weights, not config.json."""
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name != "config.json" and not any(p.match(g) for g in WEIGHT_FILES):
            shutil.copy2(p, dst / p.name)


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def publish(tmp: Path, out: Path, *, overwrite: bool) -> None:
    """Move the finished ``tmp`` folder to ``out`` in one rename; an old ``out`` is replaced only at the end."""
    if out.exists():
        if not overwrite:
            raise FileExistsError(out)
        old = out.with_name(out.name + ".quantkit-old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
