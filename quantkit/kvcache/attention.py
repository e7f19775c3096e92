"""Decode attention over a CQ layer's cache without dequantizing its store: the Triton kernel
(``quantkit.kernels.triton_kv``) attends to the packed codes, PyTorch to the full-precision sink and residual
windows, and the two softmax parts are merged by their log-sum-exps.

``decode_attention(layer, q)`` is the fused path and ``decode_attention_reference(layer, q)`` the plain one
(every key and value read back as ``update`` returns them, then softmax attention in float32); the tests hold
the two together. transformers' attention functions receive the keys and values ``update`` returned, so
``generate()`` still reads the dequantized cache; the kernel is the building block of a serving path that keeps
the cache packed.
"""

from __future__ import annotations

import torch

from quantkit.kvcache.layers import CQLayer

__all__ = ["decode_attention", "decode_attention_reference"]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` [B, Hq, D] over ``k``/``v`` [B, Hkv, n, D] (GQA): output [B, Hq, D] and log-sum-exp [B, Hq]."""
    B, Hq, D = q.shape
    rep = Hq // k.shape[1]
    k = k.float().repeat_interleave(rep, dim=1)
    v = v.float().repeat_interleave(rep, dim=1)
    s = torch.einsum("bhd,bhnd->bhn", q.float(), k) * scale
    lse = torch.logsumexp(s, dim=-1)
    return torch.einsum("bhn,bhnd->bhd", torch.exp(s - lse.unsqueeze(-1)), v), lse


def _check(layer: CQLayer, q: torch.Tensor) -> None:
    if not isinstance(layer, CQLayer):
        raise TypeError(f"decode attention reads a CQ cache layer, not {type(layer).__name__}")
    if not layer.is_initialized:
        raise ValueError("the cache layer holds no tokens yet")
    if q.dim() != 3 or q.shape[-1] != layer.head_dim:
        raise ValueError(f"q must be [batch, heads, {layer.head_dim}] (one token per sequence), got "
                         f"{tuple(q.shape)}")


def decode_attention_reference(layer: CQLayer, q: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Softmax attention of ``q`` [B, Hq, D] over every key and value ``layer`` holds, read back as ``update``
    returns them (sink, dequantized store, residual); float32 [B, Hq, D]."""
    _check(layer, q)
    scale = layer.head_dim**-0.5 if scale is None else scale
    K = layer._read(layer.sink_keys, layer.store_keys, layer.keys, "keys")
    V = layer._read(layer.sink_values, layer.store_values, layer.values, "values")
    return _attend(q, K, V, scale)[0]


def decode_attention(layer: CQLayer, q: torch.Tensor, scale: float | None = None, **kernel_options
                     ) -> torch.Tensor:
    """:func:`decode_attention_reference` with the quantized store attended by the Triton kernel straight from
    its codes (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``); float32 [B, Hq, D]."""
    from quantkit.kernels.triton_kv import cq_decode_attention, merge_attention

    _check(layer, q)
    if any(layer.outliers.values()):
        raise NotImplementedError("the decode-attention kernel does not read outliers yet (kv_cache fields "
                                  "'outliers', 'value_outliers'); use decode_attention_reference")
    scale = layer.head_dim**-0.5 if scale is None else scale
    fp_k = torch.cat([layer.sink_keys, layer.keys], dim=-2)
    fp_v = torch.cat([layer.sink_values, layer.values], dim=-2)
    parts = []
    if fp_k.shape[-2]:
        parts.append(_attend(q, fp_k, fp_v, scale))
    if layer.stored_tokens:
        rope = layer.rope
        parts.append(cq_decode_attention(
            q, layer.store_keys["codes"], layer.store_values["codes"], layer._table("keys", q.device),
            layer._table("values", q.device), code_bits=layer.code_bits, sm_scale=scale,
            positions=None if rope is None else layer.store_keys["positions"][:, 0],
            inv_freq=None if rope is None else rope.inv_freq_on(q.device),
            rope_scale=1.0 if rope is None else rope.scaling,
            **kernel_options))
    if len(parts) == 1:
        return parts[0][0]
    return merge_attention(*parts[0], *parts[1])
