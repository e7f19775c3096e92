"""Coupled Quantization of keys and values (Zhang et al. 2024, "KV Cache is 1 Bit Per Channel: Efficient Large
Language Model Inference with Coupled Quantization").

The ``D`` channels of a KV head are cut into ``D/c`` groups of ``c`` adjacent channels. Channels of a head are
correlated, so coding ``c`` of them jointly with one index of ``c·b`` bits into a table of ``2^(c·b)`` learned
centroids beats ``c`` independent ``b``-bit codes at the same rate (the joint entropy is below the sum of the
marginal ones). Each (layer, KV head, channel group) has its own table, separately for keys and values, fitted by
k-means on calibration keys/values: ``min Σ_v Σ_j w_j (x_vj − C_{a(v), j})²`` with optional per-channel weights
``w`` (all ones by default). A vector is coded by its nearest centroid under the same weighted distance.
"""

from __future__ import annotations

import torch

from quantkit.kvcache.packing import pack_uint8, unpack_uint8

__all__ = ["cq_decode", "cq_encode", "fit_codebooks", "kmeans_batched", "nearest_centroid"]

_DIST_ELEMENTS = 1 << 25  # bound on one [codebooks, vectors, centroids] distance block (128 MiB of float32)


def _distances(X: torch.Tensor, C: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """``Σ_j w_j (x_j − c_j)²`` up to a per-vector constant (``Σ_j w_j x_j²``, irrelevant for the argmin), for
    ``X`` [P, N, c] against ``C`` [P, K, c] with ``w`` [P, c] (None: ones): [P, N, K]."""
    if w is not None:
        return (w.unsqueeze(1) * C * C).sum(-1).unsqueeze(1) - 2 * (X * w.unsqueeze(1)) @ C.transpose(1, 2)
    return (C * C).sum(-1).unsqueeze(1) - 2 * X @ C.transpose(1, 2)


def nearest_centroid(X: torch.Tensor, C: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the nearest centroid: ``X`` [P, N, c], ``C`` [P, K, c], ``w`` [P, c] -> int64 [P, N]. Blocked over
    vectors so the distance block stays small."""
    P, N, _ = X.shape
    step = max(1, _DIST_ELEMENTS // max(1, P * C.shape[1]))
    return torch.cat([_distances(X[:, i : i + step], C, w).argmin(-1) for i in range(0, N, step)], dim=1)


def _kmeans_pp(X: torch.Tensor, K: int, w: torch.Tensor | None, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding, batched over the ``P`` problems: each next centroid is a vector drawn with probability
    proportional to its (weighted) squared distance to the nearest centroid so far."""
    P, N, c = X.shape
    ar = torch.arange(P)
    first = torch.randint(0, N, (P,), generator=g)
    C = X[ar, first].unsqueeze(1)
    ww = torch.ones(P, c) if w is None else w
    best = (ww.unsqueeze(1) * (X - C) ** 2).sum(-1)
    for _ in range(1, K):
        total = best.sum(1, keepdim=True)
        p = torch.where(total > 0, best / total.clamp(min=1e-30), torch.full_like(best, 1.0 / N))
        nxt = X[ar, torch.multinomial(p, 1, generator=g).squeeze(1)].unsqueeze(1)
        C = torch.cat([C, nxt], dim=1)
        best = torch.minimum(best, (ww.unsqueeze(1) * (X - nxt) ** 2).sum(-1))
    return C


def kmeans_batched(X: torch.Tensor, K: int, *, iters: int = 20, seed: int = 0, w: torch.Tensor | None = None,
                   chunk: int = 16) -> torch.Tensor:
    """Centroids [P, K, c] for ``P`` independent k-means problems ``X`` [P, N, c] (k-means++ start, then Lloyd
    iterations; with per-channel weights ``w`` [P, c] the assignment uses the weighted distance while each
    centroid stays its cluster's mean, since constant per-channel weights cancel in the update). An empty cluster
    keeps its centroid. Deterministic for a given ``seed`` and ``chunk`` (problems solved together)."""
    P, N, c = X.shape
    if N < K:
        raise ValueError(f"{N} calibration vectors cannot fill {K} centroids")
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, P, chunk):
        Xs = X[s : s + chunk].float()
        ws = None if w is None else w[s : s + chunk].float()
        C = _kmeans_pp(Xs, K, ws, g)
        for _ in range(iters):
            a = nearest_centroid(Xs, C, ws)
            num = torch.zeros_like(C).scatter_add_(1, a.unsqueeze(-1).expand(-1, -1, c), Xs)
            cnt = torch.zeros(C.shape[:2]).scatter_add_(1, a, torch.ones_like(a, dtype=torch.float32))
            C = torch.where(cnt.unsqueeze(-1) > 0, num / cnt.clamp(min=1).unsqueeze(-1), C)
        out.append(C)
    return torch.cat(out)


def fit_codebooks(X: torch.Tensor, channels: int, code_bits: int, *, iters: int = 20, seed: int = 0,
                  w: torch.Tensor | None = None) -> torch.Tensor:
    """Tables for one layer's keys or values: ``X`` [H, N, D] calibration vectors per KV head, ``w`` [H, D]
    optional channel weights -> centroids fp16 [H, D/c, 2^code_bits, c]."""
    H, N, D = X.shape
    c = channels
    G = D // c
    Xg = X.reshape(H, N, G, c).permute(0, 2, 1, 3).reshape(H * G, N, c)
    wg = None if w is None else w.reshape(H * G, c)
    C = kmeans_batched(Xg, 2**code_bits, iters=iters, seed=seed, w=wg)
    return C.reshape(H, G, 2**code_bits, c).to(torch.float16)


def cq_encode(x: torch.Tensor, C: torch.Tensor, code_bits: int, w: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [B, H, n, D], tables ``C`` [H, G, K, c], weights ``w`` [H, G, c] -> packed codes uint8
    [B, H, n, packed G]: the index of each channel group's nearest centroid."""
    B, H, n, D = x.shape
    _, G, K, c = C.shape
    Xg = x.float().reshape(B, H, n, G, c).permute(1, 3, 0, 2, 4).reshape(H * G, B * n, c)
    codes = nearest_centroid(Xg, C.float().reshape(H * G, K, c), None if w is None else w.reshape(H * G, c))
    codes = codes.reshape(H, G, B, n).permute(2, 0, 3, 1)
    return pack_uint8(codes, code_bits)


def cq_decode(packed: torch.Tensor, C: torch.Tensor, code_bits: int) -> torch.Tensor:
    """Inverse of :func:`cq_encode`: float32 [B, H, n, D], each group read back as its centroid."""
    _, G, _, c = C.shape
    codes = unpack_uint8(packed, code_bits, G).long()  # [B, H, n, G]
    B, H, n, _ = codes.shape
    h = torch.arange(H, device=codes.device).view(1, H, 1, 1)
    gi = torch.arange(G, device=codes.device).view(1, 1, 1, G)
    return C[h, gi, codes].float().reshape(B, H, n, G * c)
