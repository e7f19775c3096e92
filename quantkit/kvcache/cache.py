"""Building a quantized KV cache for a loaded model, and counting its stored bits.

``kv_cache(model, scheme)`` returns a transformers ``Cache`` to pass as ``cache`` (``past_key_values`` before
transformers 5.25) to a forward or to ``generate``: ``QuantizedKVCache`` (one KIVI or CQ layer per decoder
layer), transformers' own ``QuantizedCache`` (quanto, HQQ) or a ``DynamicCache`` (fp). Each scheme class
registers its builder here.

**Bits per element** (DESIGN.md, "KV-cache bits"): every stored bit of a cache holding ``context`` tokens at batch
1 — codes, fp16 scales and zeros, CQ tables (whose size does not grow with the context, so they are amortized
over it) and the full-precision sink and residual tokens at 16 bits — divided by the number of cached key and
value elements. A CQ cache that codes keys before RoPE also keeps each stored token's position (32 bits per token
and layer, shared by the layer's KV heads); one with ``outliers`` (keys) or ``value_outliers`` keeps, per token and KV
head, that many fp16 values with their one-byte channel indices (24 bits each).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import DynamicCache
from transformers.cache_utils import Cache

from quantkit.errors import QuantkitError
from quantkit.kvcache.layers import CQLayer, KIVILayer, QuantizedKVLayer
from quantkit.kvcache.rope import Rope
from quantkit.kvcache.scheme import CQScheme, FPScheme, HFScheme, KIVIScheme, KVScheme, parse_kv_scheme
from quantkit.kvcache.tables import CQTables

__all__ = ["QuantizedKVCache", "bits_per_element", "head_dim_of", "kv_cache", "quantized_tokens"]

_BUILDERS: dict[type, Callable[..., Cache]] = {}


class QuantizedKVCache(Cache):
    """One :class:`~quantkit.kvcache.layers.QuantizedKVLayer` per decoder layer; ``scheme`` says which."""

    def __init__(self, layers: list[QuantizedKVLayer], scheme: KVScheme, tables: CQTables | None = None):
        super().__init__(layers=layers)
        self.scheme, self.tables = scheme, tables

    def stored_bits(self) -> int:
        """Bits held now: every layer's sink, store and residual, plus the CQ tables."""
        return 8 * sum(layer.stored_bytes() for layer in self.layers) + (
            self.tables.table_bits() if self.tables is not None else 0)


def _register(cls: type) -> Callable[[Callable[..., Cache]], Callable[..., Cache]]:
    def wrap(fn: Callable[..., Cache]) -> Callable[..., Cache]:
        _BUILDERS[cls] = fn
        return fn

    return wrap


def head_dim_of(config) -> int:
    c = config.get_text_config(decoder=True)
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _check_full_attention(config, scheme: KVScheme) -> None:
    c = config.get_text_config(decoder=True)
    other = sorted({t for t in (getattr(c, "layer_types", None) or []) if t != "full_attention"})
    if other:
        raise QuantkitError(f"kv_cache method {scheme.method!r} supports full-attention layers only; the model "
                            f"has {', '.join(other)} layers")


def kv_cache(model, scheme: KVScheme | dict[str, Any] | str, tables: CQTables | None = None) -> Cache:
    """A cache for ``model`` (or its config) quantized by ``scheme``; CQ needs its fitted ``tables``
    (``quantkit.kvcache.calibrate_cq``). CQ with pre-RoPE keys takes the rotary embedding from the model's own
    ``inv_freq`` buffer, or from the config's ``rope_parameters``."""
    scheme = parse_kv_scheme(scheme)
    config = getattr(model, "config", model)
    if not isinstance(scheme, FPScheme):
        scheme.check_model(head_dim_of(config))
        _check_full_attention(config, scheme)
    for cls in type(scheme).__mro__:
        if cls in _BUILDERS:
            return _BUILDERS[cls](scheme, config, tables, model)
    raise QuantkitError(f"no cache builder for KV-cache method {scheme.method!r}")


@_register(FPScheme)
def _fp(scheme: FPScheme, config, tables: CQTables | None, model) -> Cache:
    return DynamicCache(config=config)


@_register(KIVIScheme)
def _kivi(scheme: KIVIScheme, config, tables: CQTables | None, model) -> Cache:
    n = config.get_text_config(decoder=True).num_hidden_layers
    g = scheme.value_group(head_dim_of(config))
    return QuantizedKVCache([KIVILayer(bits=scheme.bits, group_size=scheme.group_size, value_group=g,
                                       residual=scheme.residual, sink=scheme.sink) for _ in range(n)], scheme)


@_register(CQScheme)
def _cq(scheme: CQScheme, config, tables: CQTables | None, model) -> Cache:
    if tables is None:
        raise QuantkitError("kv_cache method 'cq' needs fitted tables (quantkit.kvcache.calibrate_cq, or "
                            "--kv-tables FILE)")
    if (tables.scheme.bits, tables.scheme.channels) != (scheme.bits, scheme.channels):
        raise QuantkitError(f"the CQ tables were fitted for bits={tables.scheme.bits}, "
                            f"channels={tables.scheme.channels}, not bits={scheme.bits}, channels={scheme.channels}")
    if tables.scheme.keys != scheme.keys:
        raise QuantkitError(f"the CQ tables were fitted on {tables.scheme.keys} keys, the scheme codes "
                            f"{scheme.keys} keys")
    c = config.get_text_config(decoder=True)
    if tables.num_layers != c.num_hidden_layers:
        raise QuantkitError(f"the CQ tables hold {tables.num_layers} layers, the model {c.num_hidden_layers}")
    kw = tables.key_weights or [None] * tables.num_layers
    vw = tables.value_weights or [None] * tables.num_layers
    rope = Rope.of(model) if scheme.pre_rope else None
    layers = [CQLayer(code_bits=scheme.code_bits, key_centroids=tables.key_centroids[i],
                      value_centroids=tables.value_centroids[i], key_weights=kw[i], value_weights=vw[i],
                      residual=scheme.residual, sink=scheme.sink, rope=rope, outliers=scheme.outliers,
                      value_outliers=scheme.value_outliers)
              for i in range(tables.num_layers)]
    return QuantizedKVCache(layers, scheme, tables)


@_register(HFScheme)
def _hf(scheme: HFScheme, config, tables: CQTables | None, model) -> Cache:
    from transformers.cache_utils import QuantizedCache

    try:
        return QuantizedCache(scheme.method, config, nbits=scheme.bits, axis_key=scheme.axis_key,
                              axis_value=scheme.axis_value, q_group_size=scheme.group_size,
                              residual_length=scheme.residual)
    except ImportError as e:
        raise QuantkitError(f"kv_cache method {scheme.method!r} needs its backend: {str(e).splitlines()[0]}") from e


def quantized_tokens(scheme: KIVIScheme | CQScheme, context: int) -> int:
    """Tokens of a ``context``-token cache held quantized (the rest are sink or residual, in full precision)."""
    block = scheme.group_size if isinstance(scheme, KIVIScheme) else 1
    rest = max(0, context - scheme.sink)
    return max(0, (rest - scheme.residual) // block * block)


def bits_per_element(scheme: KVScheme | dict[str, Any] | str, head_dim: int, context: int,
                     kv_heads: int = 1) -> float:
    """Stored bits per cached key/value element of a ``context``-token cache at batch 1 with ``kv_heads`` KV
    heads per layer (module docstring). quanto/HQQ: codes plus an fp16 scale and zero per group, their residual
    not counted (an estimate)."""
    scheme = parse_kv_scheme(scheme)
    if isinstance(scheme, FPScheme):
        return 16.0
    if isinstance(scheme, HFScheme):
        return scheme.bits + 32 / scheme.group_size
    q = quantized_tokens(scheme, context)
    fp_bits = 16.0 * (context - q) * head_dim * 2  # keys and values, per head
    if isinstance(scheme, KIVIScheme):
        g = scheme.value_group(head_dim)
        key_bits = q * head_dim * scheme.bits + (q // scheme.group_size) * head_dim * 32
        value_bits = q * head_dim * scheme.bits + q * (head_dim // g) * 32
        return (fp_bits + key_bits + value_bits) / (2 * context * head_dim)
    if isinstance(scheme, CQScheme):
        groups = head_dim // scheme.channels
        code_bits = 2 * q * groups * scheme.code_bits
        table_bits = 2 * groups * 2**scheme.code_bits * scheme.channels * 16
        position_bits = 32 * q / kv_heads if scheme.pre_rope else 0
        outlier_bits = q * (scheme.outliers + scheme.value_outliers) * (16 + 8)  # fp16 value, one-byte index
        return (fp_bits + code_bits + table_bits + position_bits + outlier_bits) / (2 * context * head_dim)
    raise QuantkitError(f"no bits count for KV-cache method {scheme.method!r}")
