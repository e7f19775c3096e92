"""Quantized KV caches on transformers' Cache API: KIVI (per-channel keys, per-token values, a full-precision
window of recent tokens) and coupled quantization (CQ: learned tables coding several channels jointly), plus
transformers' own quanto/HQQ caches and the fp reference behind the same scheme syntax.

    cache = quantkit.kv_cache(model, {"method": "kivi", "bits": 2, "group_size": 64, "residual": 64})
    model.generate(ids, cache=cache)  # past_key_values= before transformers 5.25
"""

from __future__ import annotations

from quantkit.kvcache.cache import QuantizedKVCache, bits_per_element, head_dim_of, kv_cache, quantized_tokens
from quantkit.kvcache.calibrate import calibrate_cq, collect_kv
from quantkit.kvcache.layers import CQLayer, KIVILayer, QuantizedKVLayer
from quantkit.kvcache.scheme import (
    KV_METHODS,
    CQScheme,
    FPScheme,
    HFScheme,
    KIVIScheme,
    KVScheme,
    parse_kv_scheme,
)
from quantkit.kvcache.tables import CQTables

__all__ = ["CQLayer", "CQScheme", "CQTables", "FPScheme", "HFScheme", "KIVILayer", "KIVIScheme", "KVScheme",
           "KV_METHODS", "QuantizedKVCache", "QuantizedKVLayer", "bits_per_element", "calibrate_cq", "collect_kv",
           "head_dim_of", "kv_cache", "parse_kv_scheme", "quantized_tokens"]
