"""A KV-cache scheme stored with a model, and used by default once the model is loaded.

``quantkit quantize`` with a recipe's ``kv_cache`` section writes the scheme into ``quantization_config``
(``kv_cache``: the scheme, the tables file and its header) and, for CQ, the fitted tables into
``quantkit_kv_cache.safetensors`` beside the weights (the sha256 of each tensor in its metadata, like the weight
files). ``from_pretrained(DIR)`` (quantkit.hf) reads them back, checks them against the model's layers, KV heads
and head size, and attaches them with :func:`use_kv_cache`: a plain forward without a cache, and ``generate()``
without a ``cache`` or ``cache_implementation``, then build the quantized cache instead of transformers'
``DynamicCache``. Opting out: pass a cache (``cache=DynamicCache(config=model.config)``), set
``model.generation_config.cache_implementation = "dynamic"`` for ``generate()``, or call
``use_kv_cache(model, None)``. ``save_pretrained`` of such a model writes the tables it was loaded with beside the
weights again (:func:`save_tables_with`), since its config keeps the ``kv_cache`` entry that names them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from quantkit.errors import QuantkitError
from quantkit.kvcache.cache import head_dim_of, kv_cache
from quantkit.kvcache.scheme import CQScheme, KVScheme, parse_kv_scheme
from quantkit.kvcache.tables import CQTables

__all__ = ["KV_FILE", "KV_PREFIX", "config_entry", "default_kv_cache", "load_stored",
           "save_tables_with", "tables_from_tensors", "use_kv_cache", "write_tables"]

KV_FILE = "quantkit_kv_cache.safetensors"
KV_PREFIX = "kv_cache."  # checkpoint keys of the tables while they travel with the layers' progress
_ATTR = "_quantkit_kv_cache"  # (scheme, tables) on the model; None: the default cache is transformers' own


def config_entry(scheme: KVScheme, tables: CQTables | None) -> dict[str, Any]:
    """``quantization_config["kv_cache"]``."""
    return {"scheme": scheme.to_dict(), "file": KV_FILE if tables is not None else None,
            "tables": tables.to_dict() if tables is not None else None}


def write_tables(tables: CQTables, folder: Path) -> None:
    from quantkit.checkpoint import _write_safetensors

    _write_safetensors(tables.state_dict(), Path(folder) / KV_FILE)


def _read_checked(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    from quantkit.checkpoint import CHECKSUMS_KEY

    if not path.is_file():
        raise QuantkitError(f"{path}: missing (the config's kv_cache names it)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        sums = json.loads(meta[CHECKSUMS_KEY])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QuantkitError(f"{path}: not a quantkit KV-cache tables file ({type(e).__name__}: {e})") from None
    if set(sums) != set(tensors):
        raise QuantkitError(f"{path}: its tensors are not those its checksums name")
    for k, t in tensors.items():
        if hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest() != sums[k]:
            raise QuantkitError(f"{path}: {k}: checksum mismatch (the file changed after quantkit wrote it)")
    return tensors


def check_tables(tables: CQTables, config, where: str | Path) -> None:
    """The tables fit the model: one per decoder layer, ``[KV heads, head_dim / c, 2^(c·b), c]`` each."""
    c = config.get_text_config(decoder=True)
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    D, s = head_dim_of(config), tables.scheme
    if tables.num_layers != c.num_hidden_layers:
        raise QuantkitError(f"{where}: KV-cache tables for {tables.num_layers} layers, the model has "
                            f"{c.num_hidden_layers}")
    if D % s.channels:
        raise QuantkitError(f"{where}: KV-cache tables code {s.channels} channels at a time, which does not divide "
                            f"the model's head size {D}")
    want = (heads, D // s.channels, 2**s.code_bits, s.channels)
    for kind, ts in (("keys", tables.key_centroids), ("values", tables.value_centroids)):
        for i, C in enumerate(ts):
            if tuple(C.shape) != want:
                raise QuantkitError(f"{where}: layers.{i}.{kind}.centroids is {list(C.shape)}, the model needs "
                                    f"{list(want)} ({heads} KV heads, head size {D})")


def load_stored(folder: Path, entry: dict[str, Any], config) -> tuple[KVScheme, CQTables | None]:
    """The scheme and tables a quantized folder stores (``entry``: its config's ``kv_cache``)."""
    scheme = parse_kv_scheme(entry["scheme"])
    if not isinstance(scheme, CQScheme):
        return scheme, None
    name = entry.get("file")
    if not isinstance(name, str) or Path(name).name != name or not isinstance(entry.get("tables"), dict):
        raise QuantkitError(f"{folder}/config.json: quantization_config.kv_cache names no tables file")
    path = Path(folder) / name
    tensors = _read_checked(path)
    try:
        tables = CQTables.from_dict(entry["tables"], tensors)
    except QuantkitError as e:
        raise QuantkitError(f"{path}: {e}") from None
    if tables.scheme.to_dict() != scheme.to_dict():
        raise QuantkitError(f"{path}: tables fitted for {tables.scheme.label}, the config says {scheme.label}")
    check_tables(tables, config, path)
    return scheme, tables


def default_kv_cache(model):
    """A fresh quantized cache for ``model``, or None when it has no stored KV-cache scheme attached."""
    stored = getattr(model, _ATTR, None)
    return None if stored is None else kv_cache(model, stored[0], stored[1])


def _forward_hook(module, args, kwargs):
    if getattr(module, _ATTR, None) is None or kwargs.get("cache") is not None \
            or kwargs.get("past_key_values") is not None:
        return None
    use = kwargs.get("use_cache")
    if use is False or (use is None and not getattr(module.config, "use_cache", True)):
        return None
    return args, {**kwargs, "cache": default_kv_cache(module)}


def use_kv_cache(model, scheme: KVScheme | dict | str | None, tables: CQTables | None = None) -> None:
    """Make ``scheme`` (with its CQ ``tables``) the cache ``model`` builds when none is passed; ``None`` goes back
    to transformers' ``DynamicCache``."""
    if scheme is None:
        setattr(model, _ATTR, None)
        return
    scheme = parse_kv_scheme(scheme)
    kv_cache(model, scheme, tables)  # refuse now what would fail at the first forward
    setattr(model, _ATTR, (scheme, tables))
    if getattr(model, "_quantkit_kv_hooked", False):
        return
    model.register_forward_pre_hook(_forward_hook, with_kwargs=True)
    original = model._prepare_cache_for_generation

    def prepare(generation_config, model_kwargs, *args, **kwargs):
        user = model_kwargs.get("cache") is not None
        out = original(generation_config, model_kwargs, *args, **kwargs)
        made = model_kwargs.get("cache")
        if (not user and type(made) is DynamicCache and generation_config.cache_implementation is None
                and getattr(model, _ATTR, None) is not None):
            model_kwargs["cache"] = default_kv_cache(model)
        return out

    model._prepare_cache_for_generation = prepare
    model._quantkit_kv_hooked = True


def save_tables_with(model, tables: CQTables) -> None:
    """``model.save_pretrained(DIR)`` also writes ``tables`` (those of the folder the model was loaded from) as
    ``DIR/quantkit_kv_cache.safetensors``: the config it writes keeps ``quantization_config.kv_cache``, which names
    that file. transformers has no quantizer hook after saving, so the model's method is wrapped. An adapter-only
    save (PEFT) writes no config and gets no tables."""
    original = model.save_pretrained

    def save_pretrained(save_directory, *args, **kwargs):
        out = original(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True) and not getattr(model, "_hf_peft_config_loaded", False):
            write_tables(tables, Path(save_directory))
        return out

    model.save_pretrained = save_pretrained


def tables_from_tensors(scheme: CQScheme, tensors: dict[str, torch.Tensor], nlayers: int,
                        calibration: dict[str, Any]) -> CQTables:
    """The tables the step left among the checkpoint tensors (removed from ``tensors``)."""
    kc = [tensors.pop(f"{KV_PREFIX}layers.{i}.keys.centroids") for i in range(nlayers)]
    vc = [tensors.pop(f"{KV_PREFIX}layers.{i}.values.centroids") for i in range(nlayers)]
    return CQTables(scheme, kc, vc, calibration=calibration)
