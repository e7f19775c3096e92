"""Vector quantization: one codebook of ``entries`` vectors of ``dim`` weights per layer, fitted by Hessian-weighted
k-means, and one fp16 scale per output row (VPTQ, Liu et al. 2024; GPTVQ, van Baalen et al. 2024).

Rows are divided by their RMS before fitting, so one codebook serves rows of every magnitude (after a Hadamard
rotation the rows look alike: Gaussian, which is what one shared table fits best). Vectors are ``dim``
consecutive *stored* columns (processing order with act-order). Distances weight each coordinate by the Hessian's
diagonal at its column, normalized to mean one: the k-means objective is then the layer objective without the
cross terms, and the OBS loop (quantkit.algos.gptq) supplies those through its error feedback.

Bits per weight: ``log2(entries) / dim`` for the codes, plus the codebook (``entries · dim · 16`` bits per layer)
and 16 bits per row; the format counts them (quantkit.formats.codebook).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from quantkit.config.spec import Spec
from quantkit.quantizers import Window, register_quantizer

__all__ = ["VQQuantizer", "VQSpec", "weighted_kmeans"]

_CHUNK = 1 << 15  # vectors per distance block: bounds the [vectors, entries] distance matrix


@register_quantizer("vq")
@dataclasses.dataclass(frozen=True)
class VQSpec(Spec):
    part = "quantizer"
    default_format: ClassVar[str] = "quantkit-vq"
    per_head_hessians: ClassVar[bool] = False  # one codebook per layer: no per-head (row block) Hessians
    name: str
    dim: int = 4  # weights per vector
    entries: int = 256  # codebook size, a power of two; codes take log2(entries) bits
    iters: int = 25  # k-means (Lloyd) iterations
    seed: int = 0  # k-means++ initialization and the sample
    sample: int = 0  # vectors k-means fits on (a seeded random subset when the layer has more); 0: all

    def validate(self) -> None:
        if not 2 <= self.dim <= 8:
            raise self.bad("dim", "must be 2 to 8")
        if self.entries < 4 or self.entries > 2**16 or self.entries & (self.entries - 1):
            raise self.bad("entries", "must be a power of two from 4 to 65536")
        if self.iters < 0:
            raise self.bad("iters", "must be a non-negative integer")
        if self.seed < 0:
            raise self.bad("seed", "must be a non-negative integer")
        if self.sample != 0 and self.sample < self.entries:
            raise self.bad("sample", "must be 0 (all vectors) or at least the number of entries")

    def check_layer(self, in_features: int, out_features: int) -> None:
        """Vectors of ``dim`` columns must tile the rows, and there must be at least ``entries`` of them."""
        if in_features % self.dim:
            raise self.bad("dim", f"{self.dim} does not divide the layer's {in_features} input columns")
        if out_features * in_features // self.dim < self.entries:
            raise self.bad("entries", f"{self.entries} entries is more than the layer's "
                                      f"{out_features * in_features // self.dim} vectors of {self.dim}")

    @property
    def bits(self) -> int:
        """Bits per code."""
        return int(math.log2(self.entries))

    def build(self, *, static_groups: bool = False) -> VQQuantizer:
        return VQQuantizer(self)


def _distances(X: torch.Tensor, Wx: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``Σ_j w_j (x_j − c_j)²`` for vectors ``X`` [N, d] with weights ``Wx`` [N, d] against ``C`` [K, d]: [N, K]."""
    return (Wx * X * X).sum(1, keepdim=True) - 2 * (Wx * X) @ C.T + Wx @ (C * C).T


def _assign(X: torch.Tensor, Wx: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    return torch.cat([_distances(X[i : i + _CHUNK], Wx[i : i + _CHUNK], C).argmin(1)
                      for i in range(0, X.shape[0], _CHUNK)])


def _kmeans_pp(X: torch.Tensor, Wx: torch.Tensor, K: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on a sample of at most 64·K vectors."""
    sample = torch.randperm(X.shape[0], generator=g)[: 64 * K]
    Xs, Ws = X[sample], Wx[sample]
    C = Xs[torch.randint(0, Xs.shape[0], (1,), generator=g)]
    best = _distances(Xs, Ws, C).squeeze(1).clamp(min=0)
    for _ in range(1, K):
        p = best / best.sum() if best.sum() > 0 else torch.full_like(best, 1 / best.numel())
        nxt = Xs[torch.multinomial(p, 1, generator=g)]
        C = torch.cat([C, nxt])
        best = torch.minimum(best, _distances(Xs, Ws, nxt).squeeze(1).clamp(min=0))
    return C


def weighted_kmeans(X: torch.Tensor, Wx: torch.Tensor, K: int, *, iters: int, seed: int,
                    sample: int = 0) -> torch.Tensor:
    """Centroids [K, d] minimizing ``Σ_v Σ_j Wx_vj (X_vj − C_{a(v), j})²`` (k-means++ start, Lloyd iterations; a
    coordinate's centroid is the weighted mean of its cluster). An empty cluster keeps its centroid. With
    ``sample``, the fit uses a seeded random subset of that many vectors."""
    if X.shape[0] < K:
        raise ValueError(f"{X.shape[0]} vectors cannot fill {K} codebook entries")
    g = torch.Generator().manual_seed(seed)
    if sample and X.shape[0] > sample:
        keep = torch.randperm(X.shape[0], generator=g)[:sample]
        X, Wx = X[keep], Wx[keep]
    C = _kmeans_pp(X, Wx, K, g)
    for _ in range(iters):
        a = _assign(X, Wx, C)
        num = torch.zeros_like(C).index_add_(0, a, Wx * X)
        den = torch.zeros_like(C).index_add_(0, a, Wx)
        C = torch.where(den > 0, num / den.clamp(min=1e-30), C)
    return C


class VQQuantizer:
    code_dtype = torch.int32
    group_size = -1
    shared_params = ("codebook",)

    def __init__(self, spec: VQSpec):
        self.spec = spec
        self.codesz = spec.dim

    def prepare(self, W: torch.Tensor, H: torch.Tensor | None, perm: torch.Tensor | None) -> None:
        rows, n = W.shape
        d, K = self.spec.dim, self.spec.entries
        self.spec.check_layer(n, rows)
        Wp = W[:, perm] if perm is not None else W
        rms = Wp.float().pow(2).mean(1, keepdim=True).sqrt()
        self.scale = rms.to(torch.float16).float().clamp(min=float(torch.finfo(torch.float16).tiny))
        diag = torch.ones(n) if H is None else torch.diagonal(H).float().clamp(min=0)
        diag = diag[perm] if perm is not None else diag
        diag = diag / diag.mean().clamp(min=1e-30)
        self.col_weights = diag.view(n // d, d).to(W.device)  # per vector position [n/d, d]
        X = (Wp.float() / self.scale).reshape(-1, d)
        Wx = self.col_weights.expand(rows, -1, -1).reshape(-1, d)
        C = weighted_kmeans(X, Wx, K, iters=self.spec.iters, seed=self.spec.seed, sample=self.spec.sample)
        self.codebook = C.to(torch.float16).float()  # stored in fp16: round once, here

    def quantize(self, x: torch.Tensor, col: int, window: Window) -> tuple[torch.Tensor, torch.Tensor]:
        rows, k = x.shape
        d = self.spec.dim
        X = (x.float() / self.scale).reshape(-1, d)  # [rows · k/d, d], row by row
        Wx = self.col_weights[col // d : (col + k) // d].expand(rows, -1, -1).reshape(-1, d)
        codes = _assign(X, Wx, self.codebook).view(rows, k // d)
        return self.decode(codes, col), codes.to(self.code_dtype)

    def decode(self, codes: torch.Tensor, col: int) -> torch.Tensor:
        rows = codes.shape[0]
        return self.codebook[codes.long()].reshape(rows, -1) * self.scale

    def params(self) -> dict[str, torch.Tensor]:
        return {"codebook": self.codebook, "scales": self.scale}
