"""Quantized KV-cache layers on transformers' Cache API (``CacheLayerMixin`` via ``DynamicLayer``).

One layer holds, in token order, three parts of each of its keys and values [B, H, T, D]:

1. **sink**: the first ``sink`` tokens, in full precision, for good (attention sinks);
2. **store**: quantized blocks (the method's packed codes and fp16 parameters), appended along the token axis;
3. **residual**: the most recent tokens in full precision (``self.keys`` / ``self.values``).

New tokens enter the residual. Whenever the residual holds at least ``residual + block`` tokens, its oldest
``block``-multiple beyond the last ``residual`` is quantized and appended to the store (``block``: the key token
group for KIVI, one token for CQ), so the most recent ``residual`` tokens are always exact and the residual stays
below ``residual + block`` tokens. The split depends only on the number of tokens seen, not on how they were fed.
``update`` returns ``sink ‖ dequantize(store) ‖ residual`` — what attention reads now and in every later step.

Each token's position travels with it (the forward's ``position_ids`` when the attention passes them on, else the
count of tokens seen), so a method that codes keys before RoPE (CQ with ``keys: pre-rope``) can take the rotation
off when it stores a block and put it back when it reads one.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicLayer

from quantkit.kvcache.codebook import cq_decode, cq_encode
from quantkit.kvcache.rope import Rope, forward_positions
from quantkit.kvcache.uniform import dequantize_keys, dequantize_values, quantize_keys, quantize_values

__all__ = ["CQLayer", "KIVILayer", "QuantizedKVLayer"]

Store = dict[str, torch.Tensor]


class QuantizedKVLayer(DynamicLayer):
    """Sink, quantized store and residual window; subclasses say how a block of keys or values is stored."""

    is_croppable = False

    def __init__(self, *, residual: int, sink: int, block: int):
        super().__init__()
        self.residual, self.sink, self.block = residual, sink, block
        self.cumulative_length = 0
        self.sink_keys: torch.Tensor | None = None
        self.sink_values: torch.Tensor | None = None
        self.store_keys: Store = {}
        self.store_values: Store = {}
        self.stored_tokens = 0
        self.positions: torch.Tensor | None = None  # [B, residual tokens]: their positions

    @abstractmethod
    def encode(self, x: torch.Tensor, kind: str, positions: torch.Tensor) -> Store:
        """``x`` [B, H, n, D] (``n`` a multiple of ``block``) at ``positions`` [B, n], ``kind`` 'keys' or 'values'
        -> stored tensors, each with a token-like axis 2 that concatenates across blocks."""

    @abstractmethod
    def decode(self, t: Store, kind: str) -> torch.Tensor:
        """Inverse of :meth:`encode` over the whole store: float32 [B, H, stored_tokens, D]."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.head_dim = key_states.shape[-1]
        self.keys = key_states[..., :0, :]
        self.values = value_states[..., :0, :]
        self.sink_keys, self.sink_values = self.keys, self.values
        self.positions = torch.zeros(key_states.shape[0], 0, dtype=torch.int64, device=key_states.device)
        self.is_initialized = True

    def _new_positions(self, key_states: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Positions [B, n] of the ``n`` new tokens: the attention's ``position_ids`` (transformers passes them on
        as ``kwargs``) when they have that shape, else the tokens seen so far onwards."""
        B, n = key_states.shape[0], key_states.shape[-2]
        p = forward_positions(kwargs, B, n)
        if p is not None:
            return p.to(key_states.device)
        start = self.cumulative_length
        return torch.arange(start, start + n, device=key_states.device).expand(B, n)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        P = torch.cat([self.positions, self._new_positions(key_states, kwargs)], dim=-1)
        self.cumulative_length += key_states.shape[-2]
        K = torch.cat([self.keys, key_states], dim=-2)
        V = torch.cat([self.values, value_states], dim=-2)
        take = min(self.sink - self.sink_keys.shape[-2], K.shape[-2])
        if take > 0:
            self.sink_keys = torch.cat([self.sink_keys, K[..., :take, :]], dim=-2)
            self.sink_values = torch.cat([self.sink_values, V[..., :take, :]], dim=-2)
            K, V, P = K[..., take:, :], V[..., take:, :], P[:, take:]
        n = (K.shape[-2] - self.residual) // self.block * self.block
        if n > 0:
            self._append(self.store_keys, self.encode(K[..., :n, :], "keys", P[:, :n]))
            self._append(self.store_values, self.encode(V[..., :n, :], "values", P[:, :n]))
            self.stored_tokens += n
            K, V, P = K[..., n:, :], V[..., n:, :], P[:, n:]
        self.keys, self.values, self.positions = K, V, P
        return self._read(self.sink_keys, self.store_keys, K, "keys"), \
            self._read(self.sink_values, self.store_values, V, "values")

    @staticmethod
    def _append(store: Store, block: Store) -> None:
        for name, t in block.items():
            store[name] = torch.cat([store[name], t], dim=2) if name in store else t

    def _read(self, sink: torch.Tensor, store: Store, recent: torch.Tensor, kind: str) -> torch.Tensor:
        if not store:
            return torch.cat([sink, recent], dim=-2)
        return torch.cat([sink, self.decode(store, kind).to(recent.dtype), recent], dim=-2)

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def stored_bytes(self) -> int:
        """Bytes held for this layer's tokens: sink, store (codes and parameters) and residual."""
        tensors = [self.sink_keys, self.sink_values, self.keys, self.values,
                   *self.store_keys.values(), *self.store_values.values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def reset(self) -> None:
        super().reset()
        self.sink_keys = self.sink_values = None
        self.store_keys, self.store_values = {}, {}
        self.stored_tokens = 0
        self.positions = None

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.positions = fn(self.positions.unsqueeze(1)).squeeze(1)
        self.sink_keys, self.sink_values = fn(self.sink_keys), fn(self.sink_values)
        self.store_keys = {k: fn(t) for k, t in self.store_keys.items()}
        self.store_values = {k: fn(t) for k, t in self.store_values.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be cropped (quantized blocks are not split)")


class KIVILayer(QuantizedKVLayer):
    """KIVI blocks (quantkit.kvcache.uniform): keys per channel over ``group_size`` tokens, values per token over
    ``value_group`` channels. The flush block is the key token group."""

    def __init__(self, *, bits: int, group_size: int, value_group: int, residual: int, sink: int):
        super().__init__(residual=residual, sink=sink, block=group_size)
        self.bits, self.group_size, self.value_group = bits, group_size, value_group

    def encode(self, x: torch.Tensor, kind: str, positions: torch.Tensor) -> Store:
        if kind == "keys":
            return quantize_keys(x, self.bits, self.group_size)
        return quantize_values(x, self.bits, self.value_group)

    def decode(self, t: Store, kind: str) -> torch.Tensor:
        return (dequantize_keys if kind == "keys" else dequantize_values)(t, self.bits, self.head_dim)


class CQLayer(QuantizedKVLayer):
    """Coupled-quantization blocks (quantkit.kvcache.codebook) with this layer's tables ``key_centroids`` and
    ``value_centroids`` [H, D/c, 2^(c·b), c] (fp16) and optional channel weights [H, D/c, c] for the encoding
    distance. Every token is coded on its own, so the flush block is one token. With ``rope`` the keys are coded
    before RoPE: the rotation comes off before coding and goes back on when the store is read, at each token's
    position, kept with its code (int32). With ``outliers`` (``value_outliers``) each token's keys (values) keep
    that many channels exactly beside the code: those the code reproduces worst (largest weighted error), as fp16
    values with one-byte channel indices, written over the decoded vectors (before RoPE goes back on); their groups
    are coded again with those channels left out of the distance."""

    def __init__(self, *, code_bits: int, key_centroids: torch.Tensor, value_centroids: torch.Tensor,
                 residual: int, sink: int, key_weights: torch.Tensor | None = None,
                 value_weights: torch.Tensor | None = None, rope: Rope | None = None, outliers: int = 0,
                 value_outliers: int = 0):
        super().__init__(residual=residual, sink=sink, block=1)
        self.code_bits, self.rope = code_bits, rope
        self.outliers = {"keys": outliers, "values": value_outliers}
        self.centroids = {"keys": key_centroids, "values": value_centroids}
        self.weights = {"keys": key_weights, "values": value_weights}

    def _table(self, kind: str, device: torch.device) -> torch.Tensor:
        C = self.centroids[kind]
        if C.device != device:
            C = self.centroids[kind] = C.to(device)
        return C

    def encode(self, x: torch.Tensor, kind: str, positions: torch.Tensor) -> Store:
        w = self.weights[kind]
        pre_rope = kind == "keys" and self.rope is not None
        if pre_rope:
            x = self.rope.remove(x.float(), positions)
        table = self._table(kind, x.device)
        w = None if w is None else w.to(x.device)
        out = {"codes": cq_encode(x, table, self.code_bits, w)}
        if self.outliers[kind]:
            err = (x.float() - cq_decode(out["codes"], table, self.code_bits)).abs()
            if w is not None:  # [H, D/c, c]: the encoding distance's channel weights
                err = err * w.reshape(1, w.shape[0], 1, -1).sqrt()
            idx = err.topk(self.outliers[kind], dim=-1).indices.sort(dim=-1).values
            # The outliers' groups coded again on their other channels: the stored values replace the rest.
            keep = torch.ones_like(x, dtype=torch.bool).scatter_(-1, idx, False)
            out["codes"] = cq_encode(x, table, self.code_bits, w, keep=keep, codes=out["codes"])
            out["outlier_index"] = idx.to(torch.uint8)
            out["outlier_value"] = x.gather(-1, idx).to(torch.float16)
        if pre_rope:
            out["positions"] = positions.to(torch.int32).unsqueeze(1)  # [B, 1, n]
        return out

    def decode(self, t: Store, kind: str) -> torch.Tensor:
        x = cq_decode(t["codes"], self._table(kind, t["codes"].device), self.code_bits)
        if "outlier_index" in t:
            x = x.scatter(-1, t["outlier_index"].long(), t["outlier_value"].float())
        if kind == "keys" and self.rope is not None:
            x = self.rope.apply(x, t["positions"][:, 0])
        return x
