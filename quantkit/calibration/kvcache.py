"""The KV-cache step: fit a recipe's coupled-quantization tables (quantkit.kvcache.codebook) on the keys and values
each decoder layer produces on the calibration set *as quantized* (the quantize step has run on the layer), so the
tables see the keys and values the quantized model will cache. KIVI needs no tables; the step records its scheme.

The step asks the walk for the keys and values of its final pass over the layer (``wants_kv``; the pass that
makes the next layer's inputs, run after every step), so the layer runs no extra time. Keys are fitted in the
form the scheme codes them: post-RoPE as cached, or with the rotation taken off at each token's position
(``keys: pre-rope``). The tables of each layer are stored with its progress (quantkit.resume) under
``kv_cache.layers.{i}.*`` and written by the assembly into their own file (quantkit.kvcache.stored).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from quantkit.calibration.steps import LayerContext, LayerStep
from quantkit.errors import QuantkitError
from quantkit.kvcache.codebook import fit_codebooks
from quantkit.kvcache.rope import Rope
from quantkit.kvcache.scheme import CQScheme, KVScheme
from quantkit.kvcache.stored import KV_PREFIX

__all__ = ["KVCacheStep"]


class KVCacheStep(LayerStep):
    name: ClassVar[str] = "kv_cache"

    def __init__(self, scheme: KVScheme, *, iters: int = 20, sample: int = 16384, seed: int = 0):
        self.scheme, self.iters, self.sample, self.seed = scheme, iters, sample, seed
        self.needs_calibration = isinstance(scheme, CQScheme)

    def fingerprint(self) -> Any:
        # "fit": the k-means implementation (2: the seeding and search of 158ff7b), so a run resumed across a change
        # of it starts afresh instead of mixing the tables of two implementations.
        return {"scheme": self.scheme.to_dict(), "iters": self.iters, "sample": self.sample, "seed": self.seed,
                "fit": 2}

    def run(self, ctx: LayerContext, stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
        if isinstance(self.scheme, CQScheme) and ctx.calib is None:
            raise QuantkitError("the 'cq' KV cache needs calibration data")
        return {"method": self.scheme.method}

    def wants_kv(self, ctx: LayerContext) -> bool:
        return isinstance(self.scheme, CQScheme)

    def after_pass(self, ctx: LayerContext, record: dict[str, Any], keys: torch.Tensor, values: torch.Tensor,
                   positions: torch.Tensor) -> dict[str, Any]:
        g = torch.Generator().manual_seed(self.seed + ctx.index)
        if self.scheme.pre_rope:
            keys = Rope.of(ctx.model).remove(keys.unsqueeze(0), positions.unsqueeze(0)).squeeze(0)
        record = {**record, "vectors": int(keys.shape[1]), "keys": "pre-RoPE" if self.scheme.pre_rope else "post-RoPE"}
        for kind, X in (("keys", keys), ("values", values)):
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
