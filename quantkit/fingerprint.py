"""The fingerprint of a quantization run: a hash over everything that decides its output, contents included.

A finished output, or partial progress, whose fingerprint differs from the run's is not this run's: it is never
called unchanged, never resumed, never mixed in. Its parts: the sha256 of every file of the source model folder
(weights, config, tokenizer), the calibration text, the recipe, every setting, the formats' versions and the extra
steps. Hashing a large model's weights takes a while, so a file's digest is cached by path, size, mtime and inode
(``$QUANTKIT_CACHE/digests``) and recomputed whenever one of them differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from quantkit.config.recipe import Recipe
from quantkit.formats import get_format
from quantkit.loading import ModelSource, cache_dir

__all__ = ["file_digest", "fingerprint", "source_digests", "text_digest"]

logger = logging.getLogger(__name__)


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes, from the cache while its size, mtime and inode are unchanged."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    entry = cache_dir() / "digests" / hashlib.sha256(str(path).encode()).hexdigest()
    try:
        cached_stamp, digest = entry.read_text().split()
        if cached_stamp == stamp:
            return digest
    except (OSError, ValueError):
        pass
    if st.st_size > 2**28:
        logger.info("hashing %s (%.1f GB; once)", path, st.st_size / 1e9)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**22), b""):
            h.update(block)
    digest = h.hexdigest()
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{entry.name}.{os.getpid()}")
        tmp.write_text(f"{stamp} {digest}\n")
        os.replace(tmp, entry)
    except OSError:  # a read-only cache costs time, not correctness
        pass
    return digest


def source_digests(folder: Path) -> dict[str, str]:
    """The digest of every file at the top of a model folder (weights, config, tokenizer, generation config)."""
    return {p.name: file_digest(p) for p in sorted(Path(folder).iterdir()) if p.is_file()}


def text_digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8", "surrogatepass")).digest())
    return h.hexdigest()


def fingerprint(source: ModelSource, recipe: Recipe, calib: dict[str, Any], device: str, steps: Any) -> str:
    """``calib`` holds the calibration settings and the digest of its text (empty when no step needs data).
    Contents, not names: the same weights and text under other paths give the same fingerprint."""
    formats = sorted({(s.scheme.format, get_format(s.scheme.format).version) for s in recipe.schemes})
    blob = json.dumps({"files": source_digests(source.folder), "recipe": recipe.to_dict(),
                       "calibration": calib, "device": device, "formats": formats, "steps": steps}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
