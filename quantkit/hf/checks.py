"""The strict loader's check of a checkpoint against the model it loads into (quantkit.hf.quantizer), shared
with ``quantkit verify`` (quantkit.verify).

A checkpoint is refused unless every tensor the model expects is stored with its shape and dtype, and nothing
else is: for a quantized linear, exactly the tensors its format declares (``Format.layer_specs``) plus its bias;
for every other parameter and persistent buffer, its shape (its dtype may be any float: transformers casts on
load). Tied weights (``lm_head.weight`` under ``tie_word_embeddings``) may be absent. The safetensors headers are
read here, by hand, so that a truncated file, a garbled header or a shard the index names but the folder lacks is
one error naming the file, before any tensor data is read.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantkit.checkpoint import GUARD_SHAPE, guard_key
from quantkit.errors import QuantkitError
from quantkit.nn import QuantizedLinear

__all__ = ["INDEX_NAME", "Expected", "StoredTensor", "check_checkpoint", "check_tensors", "expected_tensors",
           "drop_ignored", "read_headers", "weight_files"]

INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100 * 2**20  # what the safetensors library accepts
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class StoredTensor:
    """One entry of a safetensors header: the file, the dtype's safetensors name, the shape, and the absolute
    offsets of its bytes in the file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Expected:
    """What the model needs stored under one name. ``dtype`` None: any floating-point dtype (a dense parameter,
    cast to the model's dtype on load); ``optional``: a tied weight, or one the model class lets be missing
    (``_keys_to_ignore_on_load_missing``), which may be absent."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None
    optional: bool = False
    owner: QuantizedLinear | None = None  # the quantized linear storing it, for the messages


def _dtype_name(dtype: torch.dtype) -> str:
    return _NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _read_header(path: Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """The tensors and the ``__metadata__`` of one safetensors file, each entry checked as the safetensors library
    checks it (known dtype, byte count matching the shape, tensors tiling the data exactly)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            raw = f.read(n) if n is not None and n <= min(size - 8, _MAX_HEADER) else None
    except FileNotFoundError:
        raise QuantkitError(f"{path}: missing") from None
    if size == 0:
        raise QuantkitError(f"{path}: empty file (0 bytes), not a safetensors file")
    if raw is None:
        raise QuantkitError(f"{path}: not a safetensors file (truncated or garbled header: "
                            f"{'length ' + str(n) if n is not None else str(size) + ' bytes'})")
    try:
        doc = json.loads(raw.decode("utf-8"))
        assert isinstance(doc, dict)
    except (UnicodeDecodeError, ValueError, AssertionError):
        raise QuantkitError(f"{path}: not a safetensors file (its header is not a JSON object)") from None
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise QuantkitError(f"{path}: garbled safetensors header (__metadata__ is not a map of strings)")
    data_start, data_size = 8 + n, size - 8 - n
    tensors: dict[str, StoredTensor] = {}
    for name, e in doc.items():
        try:
            dtype, shape, (begin, end) = e["dtype"], e["shape"], e["data_offsets"]
            assert isinstance(dtype, str) and isinstance(shape, list) and all(
                type(d) is int and d >= 0 for d in (*shape, begin, end))
        except (TypeError, KeyError, ValueError, AssertionError):
            raise QuantkitError(f"{path}: garbled safetensors header entry for {name!r}") from None
        if dtype not in _DTYPES:
            raise QuantkitError(f"{path}: {name}: unknown dtype {dtype!r} in the safetensors header")
        if end - begin != math.prod(shape) * _DTYPES[dtype].itemsize:
            raise QuantkitError(f"{path}: {name}: header gives {end - begin} bytes for {dtype} {shape}")
        tensors[name] = StoredTensor(path, dtype, tuple(shape), data_start + begin, data_start + end)
    at = 0
    for t in sorted(tensors.values(), key=lambda t: t.begin):
        if t.begin - data_start != at:
            raise QuantkitError(f"{path}: garbled safetensors header (tensor data overlaps or has gaps)")
        at = t.end - data_start
    if at != data_size:
        what = "truncated" if at > data_size else "has trailing bytes"
        raise QuantkitError(f"{path}: {what}: the header describes {at} bytes of tensor data, the file holds "
                            f"{data_size}")
    return tensors, meta


def weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files transformers reads from ``folder`` (every shard the index names, or
    ``model.safetensors``) and the index's weight map (None without an index)."""
    index = folder / INDEX_NAME
    if not index.is_file():
        single = folder / "model.safetensors"
        if not single.is_file():
            raise QuantkitError(f"{folder}: no weights (neither model.safetensors nor {INDEX_NAME})")
        return [single], None
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
        assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AssertionError):
        raise QuantkitError(f"{index}: not a safetensors index (a JSON object with a 'weight_map')") from None
    files = []
    for name in sorted(set(weight_map.values())):
        if Path(name).name != name:
            raise QuantkitError(f"{index}: names {name!r}, which is not a file in the folder")
        if not (folder / name).is_file():
            raise QuantkitError(f"{index}: names {name}, which is missing from {folder}")
        files.append(folder / name)
    return files, weight_map


def read_headers(files: list[Path],
                 weight_map: dict[str, str] | None = None) -> tuple[dict[str, StoredTensor], dict[Path, dict]]:
    """Every stored tensor by name, and each file's metadata; a name stored twice, or stored elsewhere than the
    index says, is an error."""
    found: dict[str, StoredTensor] = {}
    metadata: dict[Path, dict] = {}
    for path in files:
        tensors, metadata[path] = _read_header(Path(path))
        for name, t in tensors.items():
            if name in found:
                raise QuantkitError(f"{name}: stored twice, in {found[name].file.name} and {t.file.name}")
            found[name] = t
    if weight_map is not None:
        for name in sorted(set(weight_map) | set(found)):
            if name not in found:
                raise QuantkitError(f"{name}: the index puts it in {weight_map[name]}, which does not hold it")
            if weight_map.get(name) != found[name].file.name:
                raise QuantkitError(f"{name}: stored in {found[name].file.name}, but the index says "
                                    f"{weight_map.get(name) or 'nothing'}")
    return found, metadata


def expected_tensors(model: nn.Module) -> dict[str, Expected]:
    """Everything ``model`` (its quantized linears already swapped in) loads from a checkpoint."""
    owners = {f"{name}.": m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    may_miss = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []]
    out: dict[str, Expected] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        prefix, _, leaf = key.rpartition(".")
        owner = owners.get(prefix + ".")
        exact = owner is not None and leaf != "bias" or not t.is_floating_point()
        optional = key in tied or (owner is None and any(p.search(key) for p in may_miss))
        out[key] = Expected(tuple(t.shape), t.dtype if exact else None, optional, owner)
    if owners:  # the guard (quantkit.checkpoint.guard_key); optional: checkpoints written before it lack it
        guard = guard_key(name[:-1] for name in owners)
        out[guard] = Expected(GUARD_SHAPE, torch.float32, True, owners[guard.rpartition(".")[0] + "."])
    return out


def drop_ignored(model: nn.Module, found: dict[str, StoredTensor]) -> dict[str, StoredTensor]:
    """Without the tensors the model class itself says to ignore when unexpected (as transformers does)."""
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    return {k: t for k, t in found.items() if not any(p.search(k) for p in ignore)}


def _describe(owner: QuantizedLinear) -> str:
    s = owner.scheme
    q = ", ".join(f"{k}={v}" for k, v in s.quantizer.to_dict().items() if k != "name")
    return f"format {s.format}, quantizer {s.quantizer.name} ({q})"


def check_tensors(expected: dict[str, Expected], found: dict[str, StoredTensor]) -> None:
    """Raise one ``QuantkitError`` naming the first (by name) tensor that is missing, unexpected, or stored with
    another shape or dtype than ``expected`` says; with a count of the others."""
    problems: list[str] = []
    owners = {name.rpartition(".")[0]: e.owner for name, e in expected.items() if e.owner is not None}
    for name in sorted(set(expected) | set(found)):
        e, t = expected.get(name), found.get(name)
        module = name.rpartition(".")[0]
        if e is None:
            if module in owners and name.endswith(".weight"):
                hint = f"a dense weight under quantized module {module}"
            elif module in owners and name.endswith(".bias"):
                hint = f"{module} has no bias"
            elif module in owners:
                hint = f"not stored by {module}'s scheme: {_describe(owners[module])}"
            elif f"{module}.weight" in expected:
                hint = f"{module} is not quantized in quantization_config: a module missing from it?"
            else:
                hint = "no module of the model stores it"
            problems.append(f"{name}: unexpected tensor in {t.file.name} ({hint})")
        elif t is None:
            if e.optional:
                continue
            packed = sorted(k.rpartition(".")[2] for k in found if k.rpartition(".")[0] == module)
            hint = ""
            if e.owner is not None:
                hint = f" ({module} is quantized: {_describe(e.owner)})"
            elif packed and name.endswith(".weight"):
                hint = (f" ({module} stores {', '.join(packed)} instead: a module missing from "
                        "quantization_config?)")
            problems.append(f"{name}: missing from the checkpoint{hint}")
        elif t.shape != e.shape:
            why = f" ({_describe(e.owner)})" if e.owner is not None else ""
            problems.append(f"{name}: shape {list(t.shape)} in {t.file.name}, expected {list(e.shape)}{why}")
        elif e.dtype is not None and t.dtype != _dtype_name(e.dtype):
            problems.append(f"{name}: dtype {t.dtype} in {t.file.name}, expected {_dtype_name(e.dtype)}")
        elif e.dtype is None and not _DTYPES[t.dtype].is_floating_point:
            problems.append(f"{name}: dtype {t.dtype} in {t.file.name}, expected a floating-point dtype")
    if problems:
        more = {1: "", 2: " (and 1 more problem)"}.get(len(problems), f" (and {len(problems) - 1} more problems)")
        raise QuantkitError(problems[0] + more)


def check_checkpoint(model: nn.Module, files: list[Path]) -> None:
    """The strict loader's check of the safetensors ``files`` transformers is about to load into ``model``,
    against the index beside them when it names exactly these files."""
    weight_map = None
    if (files[0].parent / INDEX_NAME).is_file():
        indexed, weight_map = weight_files(files[0].parent)
        if {p.name for p in indexed} != {p.name for p in files}:
            weight_map = None
    check_tensors(expected_tensors(model), drop_ignored(model, read_headers(files, weight_map)[0]))
