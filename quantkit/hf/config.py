"""``config.json["quantization_config"]`` of a quantkit checkpoint.

Layout version 3 (written since the format registry)::

    {"quant_method": "quantkit", "version": 3, "recipe": NAME,
     "modules": {MODULE: {"scheme": LayerScheme.to_dict(), "format": {"name": ..., "version": ...}}}}

Versions 1 and 2 (one format for the whole checkpoint, ``quantkit-uniform``, with the flat scheme of each module)
are read as version 3 with that format at that version for every module.

Since the strict loader, a written config also holds ``modules_sha256``, the sha256 of the canonical JSON of
``modules``: a field edited by hand or damaged on disk (a group size that leaves every tensor's shape as it was
reads the packed weights wrong) is refused. Configs without it (written earlier) are read as before. A config
without ``modules``, or with none, is refused: there would be nothing to load the packed tensors into — unless
it quantizes the KV cache.

A recipe with a ``kv_cache`` section adds ``"kv_cache": {"scheme": KVScheme.to_dict(), "file": NAME or null,
"tables": CQTables header or null}`` (quantkit.kvcache.stored); ``modules`` may then be empty (a KV-only recipe:
dense weights, quantized cache).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from quantkit.config.scheme import LayerScheme
from quantkit.errors import QuantkitError, RecipeError
from quantkit.registry import FORMATS

__all__ = ["CONFIG_VERSION", "QuantkitConfig", "QUANT_METHOD", "modules_digest"]

QUANT_METHOD = "quantkit"
CONFIG_VERSION = 3
_LEGACY_FORMAT = "quantkit-uniform"  # the one format of layout versions 1 and 2


class QuantkitConfig(QuantizationConfigMixin):
    """The recipe name and, for every quantized linear (keyed by module name), its scheme and the name and version
    of the format its tensors are stored in."""

    def __init__(
        self,
        modules: dict[str, dict[str, Any]] | None = None,
        version: int = CONFIG_VERSION,
        recipe: str | None = None,
        quant_method: str = QUANT_METHOD,
        format: str | None = None,
        modules_sha256: str | None = None,
        kv_cache: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        if quant_method != QUANT_METHOD:
            raise QuantkitError(f"not a quantkit config: quant_method={quant_method!r}")
        if modules is None:
            raise QuantkitError("quantization_config has no 'modules': it does not say which layers are quantized")
        if not isinstance(modules, dict) or not all(isinstance(k, str) for k in modules):
            raise QuantkitError("quantization_config: 'modules' must map module names to their entries")
        if not modules and kv_cache is None:
            raise QuantkitError("quantization_config: 'modules' is empty: no layer is quantized")
        self.quant_method = QUANT_METHOD
        self.version = version
        self.recipe = recipe
        self.format = format  # layout versions 1–2 only
        self.modules = dict(modules)
        self.kv_cache = kv_cache
        if modules_sha256 is not None and modules_sha256 != modules_digest(self.modules):
            raise QuantkitError("quantization_config: 'modules' does not match its modules_sha256: the config was "
                                "edited or damaged after quantkit wrote it")
        self.post_init()

    @classmethod
    def for_schemes(cls, schemes: dict[str, LayerScheme], recipe: str | None = None,
                    kv_cache: dict[str, Any] | None = None) -> QuantkitConfig:
        modules = {name: {"scheme": s.to_dict(),
                          "format": {"name": s.format, "version": FORMATS.get(s.format).version}}
                   for name, s in schemes.items()}
        return cls(modules=modules, recipe=recipe, kv_cache=kv_cache)

    def post_init(self) -> None:
        if type(self.version) is not int or self.version < 1:
            raise QuantkitError(f"quantization_config: version {self.version!r} is not a checkpoint format version")
        if self.version > CONFIG_VERSION:
            raise QuantkitError(
                f"checkpoint format version {self.version} is newer than this quantkit supports "
                f"({CONFIG_VERSION}); upgrade quantkit"
            )
        if self.version < 3 and self.format != _LEGACY_FORMAT:
            raise QuantkitError(f"unknown quantkit format {self.format!r}; version {self.version} checkpoints are "
                                f"{_LEGACY_FORMAT!r}")
        self.schemes()  # validate every entry now, not at first forward
        self.kv_scheme()

    def kv_scheme(self):
        """The stored KV-cache scheme (quantkit.kvcache.KVScheme), or None."""
        if self.kv_cache is None:
            return None
        from quantkit.kvcache.scheme import parse_kv_scheme

        if not isinstance(self.kv_cache, dict) or not isinstance(self.kv_cache.get("scheme"), dict):
            raise QuantkitError("quantization_config: 'kv_cache' must be a mapping with a 'scheme'")
        try:
            return parse_kv_scheme(self.kv_cache["scheme"])
        except (RecipeError, QuantkitError) as e:
            raise QuantkitError(f"quantization_config: {e}") from None

    def _entry(self, name: str, entry: Any) -> tuple[LayerScheme, int]:
        if self.version < 3:
            if not isinstance(entry, dict):
                raise QuantkitError(f"quantization_config: module {name!r}: expected a scheme mapping")
            return LayerScheme.from_dict({**entry, "format": _LEGACY_FORMAT}), self.version
        if not isinstance(entry, dict) or set(entry) != {"scheme", "format"}:
            raise QuantkitError(f"quantization_config: module {name!r}: expected 'scheme' and 'format'")
        fmt, scheme = entry["format"], entry["scheme"]
        if not isinstance(fmt, dict) or set(fmt) != {"name", "version"} or not isinstance(scheme, dict):
            raise QuantkitError(f"quantization_config: module {name!r}: 'format' must be {{name, version}} and "
                                "'scheme' a mapping")
        return LayerScheme.from_dict({**scheme, "format": fmt["name"]}), fmt["version"]

    def schemes(self) -> dict[str, LayerScheme]:
        out = {}
        for name, entry in self.modules.items():
            try:
                scheme, version = self._entry(name, entry)
            except RecipeError as e:
                raise QuantkitError(f"quantization_config: module {name!r}: {e}") from None
            except (TypeError, ValueError, KeyError, AttributeError) as e:  # a value of a type no field takes
                raise QuantkitError(f"quantization_config: module {name!r}: invalid scheme "
                                    f"({type(e).__name__}: {e})") from None
            try:
                FORMATS.get(scheme.format).check_version(version)
            except QuantkitError as e:
                raise QuantkitError(f"quantization_config: module {name!r}: {e}") from None
            out[name] = scheme
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {
            "quant_method": self.quant_method,
            "version": self.version,
            "recipe": self.recipe,
            "modules": {k: dict(v) for k, v in self.modules.items()},
        }
        if self.version >= 3:
            d["modules_sha256"] = modules_digest(d["modules"])
        if self.format is not None:
            d["format"] = self.format
        if self.kv_cache is not None:
            d["kv_cache"] = self.kv_cache
        return d


def modules_digest(modules: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of a config's ``modules``."""
    text = json.dumps(modules, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()
