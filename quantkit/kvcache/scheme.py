"""KV-cache schemes: typed, validated configs of one cache quantization method, each registered by name.

Canonical form (``to_dict``; ``parse_kv_scheme`` accepts it, a scheme, or the command-line shorthand
``"kivi:bits=2,group_size=64"``)::

    {"method": "kivi", "bits": 2, "group_size": 64, "residual": 64, "sink": 0}
    {"method": "cq", "bits": 2, "channels": 4, "residual": 64, "sink": 0, "keys": "post-rope", "outliers": 0,
     "value_outliers": 0}
    {"method": "quanto", "bits": 4, "group_size": 64, "residual": 128, "axis_key": 0, "axis_value": 0}
    {"method": "fp"}

``bits`` is bits per element for the scalar methods and bits per *channel* for CQ (a code of ``channels · bits``
bits per group of ``channels`` channels). ``residual``: the most recent tokens kept in full precision; ``sink``:
the first tokens kept in full precision (attention sinks); CQ's ``outliers`` (``value_outliers``): per token and
KV head, the key (value) channels the code reproduces worst kept exactly (fp16 value and channel index:
KVQuant's dense-and-sparse form). Errors name the field: ``field 'kv_cache.bits': ...``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

from quantkit.config.spec import FieldError, Spec
from quantkit.errors import QuantkitError, RecipeError
from quantkit.registry import KV_METHODS

__all__ = ["CQScheme", "FPScheme", "HFScheme", "KIVIScheme", "KV_METHODS", "KVScheme", "parse_kv_scheme"]



@dataclasses.dataclass(frozen=True)
class KVScheme(Spec):
    """Base of the KV-cache schemes. ``method`` is the registered name."""

    part = "kv_cache"
    name: ClassVar[str] = ""
    method: str

    def validate(self) -> None:
        if self.method != self.name:
            raise self.bad("method", f"must be {self.name!r} for {type(self).__name__}")

    def _nonneg(self, *fields: str) -> None:
        for f in fields:
            if getattr(self, f) < 0:
                raise self.bad(f, "must be a non-negative integer")

    def check_model(self, head_dim: int) -> None:
        """Refuse a head size the scheme cannot tile (before any cache is built)."""

    @property
    def label(self) -> str:
        """Short name for tables: ``kivi-2 g64 r64``."""
        return self.method


@KV_METHODS.register("fp")
@dataclasses.dataclass(frozen=True)
class FPScheme(KVScheme):
    """No quantization: transformers' ``DynamicCache`` (the reference)."""

    name: ClassVar[str] = "fp"


@KV_METHODS.register("kivi")
@dataclasses.dataclass(frozen=True)
class KIVIScheme(KVScheme):
    """KIVI: keys per channel in groups of ``group_size`` tokens, values per token in groups of ``group_size``
    channels (the whole head when it has fewer), asymmetric min/max, fp16 scale and zero per group."""

    name: ClassVar[str] = "kivi"
    bits: int = 2
    group_size: int = 64
    residual: int = 64
    sink: int = 0

    def validate(self) -> None:
        super().validate()
        if self.bits not in (2, 4, 8):
            raise self.bad("bits", "must be 2, 4 or 8")
        if self.group_size < 1:
            raise self.bad("group_size", "must be a positive integer")
        self._nonneg("residual", "sink")

    def value_group(self, head_dim: int) -> int:
        return min(self.group_size, head_dim)

    def check_model(self, head_dim: int) -> None:
        if head_dim % self.value_group(head_dim):
            raise self.bad("group_size", f"must divide the head size {head_dim} (values are grouped along "
                                         "channels)")

    @property
    def label(self) -> str:
        return f"kivi-{self.bits} g{self.group_size} r{self.residual}" + (f" s{self.sink}" if self.sink else "")


@KV_METHODS.register("cq")
@dataclasses.dataclass(frozen=True)
class CQScheme(KVScheme):
    """Coupled quantization: ``channels`` adjacent channels coded jointly by one index of ``channels · bits`` bits
    into a learned table (per layer, KV head and channel group; keys and values apart)."""

    name: ClassVar[str] = "cq"
    bits: int = 2  # per channel
    channels: int = 4
    residual: int = 64
    sink: int = 0
    keys: str = "post-rope"  # or "pre-rope": keys coded before the rotary embedding (quantkit.kvcache.rope)
    outliers: int = 0  # key channels per token and KV head kept in fp16 beside the code (the worst coded)
    value_outliers: int = 0  # the same for values

    def validate(self) -> None:
        super().validate()
        if self.bits not in (1, 2, 4):
            raise self.bad("bits", "must be 1, 2 or 4 (bits per channel)")
        if self.channels not in (1, 2, 4, 8):
            raise self.bad("channels", "must be 1, 2, 4 or 8")
        if self.code_bits > 8:
            raise self.bad("channels", f"times bits ({self.bits}) must be at most 8 (tables of at most 256 "
                                       "centroids)")
        self._nonneg("residual", "sink", "outliers", "value_outliers")
        if self.keys not in ("post-rope", "pre-rope"):
            raise self.bad("keys", "must be 'post-rope' or 'pre-rope'")

    @property
    def pre_rope(self) -> bool:
        return self.keys == "pre-rope"

    @property
    def code_bits(self) -> int:
        return self.channels * self.bits

    def check_model(self, head_dim: int) -> None:
        if head_dim % self.channels:
            raise self.bad("channels", f"must divide the head size {head_dim}")
        for name in ("outliers", "value_outliers"):
            if getattr(self, name) and not (getattr(self, name) < head_dim <= 256):
                raise self.bad(name, f"must be below the head size {head_dim} (of at most 256 channels: one-byte "
                                     "channel indices)")

    @property
    def label(self) -> str:
        return (f"cq-{self.bits} c{self.channels} r{self.residual}" + (f" s{self.sink}" if self.sink else "")
                + (" pre-rope" if self.pre_rope else "") + (f" o{self.outliers}" if self.outliers else "")
                + (f" vo{self.value_outliers}" if self.value_outliers else ""))


@dataclasses.dataclass(frozen=True)
class HFScheme(KVScheme):
    """transformers' own ``QuantizedCache`` with the optimum-quanto or HQQ backend (its residual semantics: the
    full-precision part holds fewer than ``residual`` tokens and is requantized with everything when it fills)."""

    backend_bits: ClassVar[tuple[int, ...]] = ()
    bits: int = 4
    group_size: int = 64
    residual: int = 128
    axis_key: int = 0
    axis_value: int = 0

    def validate(self) -> None:
        super().validate()
        if self.bits not in self.backend_bits:
            raise self.bad("bits", f"must be one of {', '.join(map(str, self.backend_bits))} for {self.name}")
        if self.group_size < 1:
            raise self.bad("group_size", "must be a positive integer")
        self._nonneg("residual")

    @property
    def label(self) -> str:
        return f"{self.method}-{self.bits} g{self.group_size} r{self.residual}"


@KV_METHODS.register("quanto")
@dataclasses.dataclass(frozen=True)
class QuantoScheme(HFScheme):
    name: ClassVar[str] = "quanto"
    backend_bits: ClassVar[tuple[int, ...]] = (2, 4)


@KV_METHODS.register("hqq")
@dataclasses.dataclass(frozen=True)
class HQQScheme(HFScheme):
    name: ClassVar[str] = "hqq"
    backend_bits: ClassVar[tuple[int, ...]] = (1, 2, 3, 4, 8)


def _parse_shorthand(text: str) -> dict[str, Any]:
    """``"kivi:bits=2,residual=64"`` (or a JSON object) -> dict; integer-looking values become ints."""
    text = text.strip()
    if text.startswith("{"):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise QuantkitError(f"KV-cache scheme is not valid JSON ({e.msg}): {text}") from None
        return d
    method, _, rest = text.partition(":")
    d: dict[str, Any] = {"method": method.strip()}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise QuantkitError(f"KV-cache scheme item {item!r} is not key=value (e.g. kivi:bits=2,residual=64)")
        value = value.strip()
        d[key.strip()] = int(value) if value.lstrip("-").isdigit() else value
    return d


def parse_kv_scheme(spec: KVScheme | dict[str, Any] | str) -> KVScheme:
    """A scheme from a dict, the shorthand string, or a scheme (returned as is)."""
    if isinstance(spec, KVScheme):
        return spec
    d = _parse_shorthand(spec) if isinstance(spec, str) else spec
    if not isinstance(d, dict):
        raise RecipeError(f"kv_cache: expected a mapping, got {d!r}")
    if "method" not in d:
        raise FieldError("kv_cache.method", "is required", None)
    if d["method"] not in KV_METHODS:
        raise FieldError("kv_cache.method", f"unknown KV-cache method; known: {', '.join(KV_METHODS.names())}",
                         d["method"])
    return KV_METHODS.get(d["method"]).from_dict(d)
