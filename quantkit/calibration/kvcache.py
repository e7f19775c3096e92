"""The KV-cache step: fit a recipe's coupled-quantization tables (quantkit.kvcache.codebook) on the keys and values
each decoder layer produces on the calibration set *as quantized* (the quantize step has run on the layer), so the
tables see the keys and values the quantized model will cache. KIVI needs no tables; the step records its scheme.

The layer runs over the calibration inputs once more with a recording cache (the walk's own pass, which makes
the next layer's inputs, runs after every step). Keys are taken post-RoPE, the form the cache stores. The tables
of each layer are stored with its progress (quantkit.resume) under ``kv_cache.layers.{i}.*`` and written by the
assembly into their own file (quantkit.kvcache.stored).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from quantkit.calibration.capture import Calibration
from quantkit.calibration.steps import LayerContext, LayerStep
from quantkit.errors import QuantkitError
from quantkit.kvcache.codebook import fit_codebooks
from quantkit.kvcache.scheme import CQScheme, KVScheme
from quantkit.kvcache.stored import KV_PREFIX

__all__ = ["KVCacheStep", "record_kv"]



class _Recorder:
    """Stands in for a cache: keeps what the attention caches, returns it unchanged (nothing is cached)."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        for out, t in ((self.keys, key_states), (self.values, value_states)):
            B, H, T, D = t.shape
            out.append(t.detach().float().cpu().permute(1, 0, 2, 3).reshape(H, B * T, D))
        return key_states, value_states


@torch.no_grad()
def record_kv(layer, calib: Calibration, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [H, N·T, D] (float32) that decoder layer ``index`` caches over the calibration set."""
    rec = _Recorder()
    for h, kw in zip(calib.hidden, calib.kwargs[index], strict=True):
        kw = {k: v for k, v in kw.items() if k != "past_key_values"}
        layer(h, **{**kw, "cache": rec})
    if not rec.keys:
        raise QuantkitError(f"decoder layer {index}: its attention cached nothing on the calibration set; the "
                            "KV-cache step cannot observe its keys and values")
    return torch.cat(rec.keys, 1), torch.cat(rec.values, 1)


class KVCacheStep(LayerStep):
    name: ClassVar[str] = "kv_cache"

    def __init__(self, scheme: KVScheme, *, iters: int = 20, sample: int = 16384, seed: int = 0):
        self.scheme, self.iters, self.sample, self.seed = scheme, iters, sample, seed
        self.needs_calibration = isinstance(scheme, CQScheme)

    def fingerprint(self) -> Any:
        return {"scheme": self.scheme.to_dict(), "iters": self.iters, "sample": self.sample, "seed": self.seed}

    def run(self, ctx: LayerContext, stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
        if not isinstance(self.scheme, CQScheme):
            return {"method": self.scheme.method}
        if ctx.calib is None:
            raise QuantkitError("the 'cq' KV cache needs calibration data")
        K, V = record_kv(ctx.layer, ctx.calib, ctx.index)
        g = torch.Generator().manual_seed(self.seed + ctx.index)
        record: dict[str, Any] = {"method": "cq", "vectors": int(K.shape[1]), "keys": "post-RoPE"}
        for kind, X in (("keys", K), ("values", V)):
            if self.sample and X.shape[1] > self.sample:
                X = X[:, torch.randperm(X.shape[1], generator=g)[: self.sample]]
            C = fit_codebooks(X, self.scheme.channels, self.scheme.code_bits, iters=self.iters,
                              seed=self.seed + ctx.index)
            ctx.tensors[f"{KV_PREFIX}layers.{ctx.index}.{kind}.centroids"] = C
            record[f"{kind}_mse"] = _mse(X, C, self.scheme)
        return record


def _mse(X: torch.Tensor, C: torch.Tensor, scheme: CQScheme) -> float:
    """Mean squared error of the calibration vectors ``X`` [H, N, D] read back through their tables."""
    from quantkit.kvcache.codebook import cq_decode, cq_encode

    x = X[:, :4096].unsqueeze(0)  # [1, H, n, D]
    return (cq_decode(cq_encode(x, C, scheme.code_bits), C, scheme.code_bits) - x).pow(2).mean().item()
