"""Coupled Quantization of keys and values (Zhang et al. 2024, "KV Cache is 1 Bit Per Channel: Efficient Large
Language Model Inference with Coupled Quantization").

The ``D`` channels of a KV head are cut into ``D/c`` groups of ``c`` adjacent channels. Channels of a head are
correlated, so coding ``c`` of them jointly with one index of ``c·b`` bits into a table of ``2^(c·b)`` learned
centroids beats ``c`` independent ``b``-bit codes at the same rate (the joint entropy is below the sum of the
marginal ones). Each (layer, KV head, channel group) has its own table, separately for keys and values, fitted by
k-means on calibration keys/values: ``min Σ_v s_v Σ_j w_j (x_vj − C_{a(v), j})²`` with optional per-channel weights
``w`` (all ones by default) and optional per-vector weights ``s`` (CQ's Fisher-guided centroids: ``s_v`` the sum of
the squared loss gradients of vector ``v``'s channels, so the centroids sit where errors cost most). A vector is
coded by its nearest centroid under the weighted distance (the per-vector weight does not change which is nearest).
"""

from __future__ import annotations

import torch

from quantkit.kvcache.packing import pack_uint8, unpack_uint8

__all__ = ["cq_decode", "cq_encode", "fit_codebooks", "kmeans_batched", "nearest_centroid"]

_DIST_ELEMENTS = 1 << 24  # bound on one [codebooks, vectors, centroids] distance block (64 MiB of float32)
_NEIGHBOURS = 8  # candidates of a Lloyd assignment after the first: the centroids nearest the previous one


def _dots(X: torch.Tensor, C: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """``Σ_j w_j c_j² − 2 Σ_j w_j x_j c_j``: the (weighted) squared distance up to ``Σ_j w_j x_j²``, for ``X``
    [P, n, c] against ``C`` [P, K, c] with ``w`` [P, c] (None: ones): [P, n, K], in one fused pass."""
    Cw = C if w is None else C * w.unsqueeze(1)
    return torch.baddbmm((Cw * C).sum(-1).unsqueeze(1), X, Cw.transpose(1, 2), alpha=-2)


def _blocks(X: torch.Tensor, K: int):
    """Slices of ``X``'s vector dimension that keep a [P, n, K] distance block under ``_DIST_ELEMENTS``."""
    P, N, _ = X.shape
    step = max(1, _DIST_ELEMENTS // max(1, P * K))
    return [slice(i, i + step) for i in range(0, N, step)]


def nearest_centroid(X: torch.Tensor, C: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the nearest centroid: ``X`` [P, N, c], ``C`` [P, K, c], ``w`` [P, c] -> int64 [P, N]. Blocked over
    vectors so the distance block stays small."""
    return torch.cat([_dots(X[:, b], C, w).argmin(-1) for b in _blocks(X, C.shape[1])], dim=1)


def _kmeans_pp(X: torch.Tensor, K: int, w: torch.Tensor | None, g: torch.Generator,
               sw: torch.Tensor | None = None) -> torch.Tensor:
    """k-means++ seeding, batched over the ``P`` problems: each next centroid is a vector drawn with probability
    proportional to its (weighted) squared distance to the nearest centroid so far, times its own weight ``sw``
    [P, N] when given (inverse-CDF sampling of one uniform draw per problem; the distances run channel by channel
    over a [P, c, N] copy, so each step is a few passes over [P, N])."""
    P, N, c = X.shape
    ar = torch.arange(P)
    Xt = X.transpose(1, 2).contiguous()  # [P, c, N]
    ww = torch.ones(P, c) if w is None else w
    idx = torch.empty(P, K, dtype=torch.long)
    idx[:, 0] = torch.randint(0, N, (P,), generator=g)
    best = torch.full((P, N), float("inf"))
    for k in range(1, K):
        last = Xt[ar, :, idx[:, k - 1]]  # [P, c]: the centroid drawn last
        d = torch.zeros(P, N)
        for j in range(c):
            d.add_((Xt[:, j] - last[:, j : j + 1]).square_().mul_(ww[:, j : j + 1]))
        torch.minimum(best, d, out=best)
        cdf = (best if sw is None else best * sw).cumsum(1)
        total = cdf[:, -1:]
        u = torch.rand(P, 1, generator=g) * total
        drawn = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=N - 1)
        uniform = torch.randint(0, N, (P,), generator=g)  # every vector already a centroid: any vector
        idx[:, k] = torch.where(total.squeeze(1) > 0, drawn, uniform)
    return X[ar.unsqueeze(1), idx]


def _means(X: torch.Tensor, a: torch.Tensor, C: torch.Tensor, sw: torch.Tensor | None = None) -> torch.Tensor:
    """Each cluster's mean, weighted by ``sw`` [P, N] when given (Lloyd's update); an empty cluster (or one of
    weight 0) keeps its centroid."""
    c = X.shape[-1]
    ones = torch.ones_like(a, dtype=torch.float32) if sw is None else sw
    num = torch.zeros_like(C).scatter_add_(1, a.unsqueeze(-1).expand(-1, -1, c), X if sw is None else
                                           X * sw.unsqueeze(-1))
    cnt = torch.zeros(C.shape[:2]).scatter_add_(1, a, ones)
    return torch.where(cnt.unsqueeze(-1) > 0, num / cnt.clamp(min=torch.finfo(cnt.dtype).tiny).unsqueeze(-1), C)


def _assign_near(X: torch.Tensor, C: torch.Tensor, a: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Lloyd's assignment step, given the previous assignment ``a`` [P, N]: each vector's nearest centroid is
    looked for among the ``_NEIGHBOURS`` centroids nearest to its previous one (itself included). That is exact when
    every centroid closer to that one than twice the vector's distance to it is in the list: a centroid nearer the
    vector than its previous one lies within that radius (triangle inequality; the weighted distance is a norm).
    The other vectors are compared with every centroid."""
    P, N, c = X.shape
    K = C.shape[1]
    if K <= _NEIGHBOURS:
        return nearest_centroid(X, C, w)
    ww = torch.ones(P, c) if w is None else w
    between = torch.zeros(P, K, K)  # distances between the centroids
    for j in range(c):
        between.add_((C[:, :, None, j] - C[:, None, :, j]).square_().mul_(ww[:, j, None, None]))
    between.sqrt_()
    near = between.topk(_NEIGHBOURS + 1, dim=2, largest=False)
    lists = near.indices[..., :_NEIGHBOURS].transpose(1, 2)  # [P, M, K]
    cand = torch.gather(lists, 2, a.unsqueeze(1).expand(P, _NEIGHBOURS, N))  # [P, M, N]: vectors innermost
    radius = torch.gather(near.values[..., _NEIGHBOURS], 1, a)  # the nearest centroid left out of the list
    d = torch.zeros(P, _NEIGHBOURS, N)
    own = torch.zeros(P, N)
    for j in range(c):
        Cj, xj = C[..., j], X[..., j]
        d.add_((torch.gather(Cj, 1, cand.reshape(P, -1)).view(P, _NEIGHBOURS, N) - xj.unsqueeze(1)).square_()
               .mul_(ww[:, j, None, None]))
        own.add_((torch.gather(Cj, 1, a) - xj).square_().mul_(ww[:, j, None]))
    best, out = d[:, 0].clone(), cand[:, 0].clone()
    for m in range(1, _NEIGHBOURS):  # the argmin over the list, one [P, N] slice at a time (vectorized over N)
        closer = d[:, m] < best
        best = torch.where(closer, d[:, m], best)
        out = torch.where(closer, cand[:, m], out)
    far = radius <= 2 * own.sqrt()  # the list may miss a nearer centroid: compare with all
    if far.any():
        p, n, pos, width = _ragged(far)
        Xf = X.new_zeros(P, width, c)
        Xf[p, pos] = X[p, n]
        out[p, n] = nearest_centroid(Xf, C, w)[p, pos]
    return out


def _ragged(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The vectors ``mask`` [P, N] marks, packed problem by problem into a [P, width] block: their problem ``p``,
    vector ``n`` and slot ``pos`` in the block (``X[p, n]`` goes to ``block[p, pos]``), and the block's width."""
    p, n = mask.nonzero(as_tuple=True)
    counts = mask.sum(1)
    pos = torch.arange(p.numel(), device=mask.device) - (counts.cumsum(0) - counts)[p]
    return p, n, pos, int(counts.max())


def _lloyd(X: torch.Tensor, C: torch.Tensor, w: torch.Tensor | None, iters: int,
           sw: torch.Tensor | None = None) -> torch.Tensor:
    """``iters`` Lloyd iterations from the centroids ``C`` (assign each vector to its nearest centroid, move each
    centroid to its cluster's mean), stopping early once no assignment changes (the means are then fixed). After
    the first, the assignments search near the previous ones (:func:`_assign_near`), with the same result."""
    a = nearest_centroid(X, C, w)
    for it in range(iters):
        C = _means(X, a, C, sw)
        if it == iters - 1:
            break
        nxt = _assign_near(X, C, a, w)
        if torch.equal(nxt, a):
            break
        a = nxt
    return C


def kmeans_batched(X: torch.Tensor, K: int, *, iters: int = 20, seed: int = 0, w: torch.Tensor | None = None,
                   chunk: int = 32, sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Centroids [P, K, c] for ``P`` independent k-means problems ``X`` [P, N, c] (k-means++ start, then Lloyd
    iterations; with per-channel weights ``w`` [P, c] the assignment uses the weighted distance while each
    centroid stays its cluster's mean, since constant per-channel weights cancel in the update; with per-vector
    weights ``sample_weight`` [P, N] the seeding and the means are weighted). An empty cluster keeps its
    centroid. Each problem is solved on its vectors minus their mean (k-means does not move with a
    translation; the expanded distances lose less to rounding). Deterministic for a given ``seed`` and ``chunk``
    (problems solved together)."""
    P, N, c = X.shape
    if N < K:
        raise ValueError(f"{N} calibration vectors cannot fill {K} centroids")
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, P, chunk):
        Xs = X[s : s + chunk].float()
        mean = Xs.mean(1, keepdim=True)
        Xs = Xs - mean
        ws = None if w is None else w[s : s + chunk].float()
        sws = None if sample_weight is None else sample_weight[s : s + chunk].float()
        C = _kmeans_pp(Xs, K, ws, g, sws)
        if iters > 0:
            C = _lloyd(Xs, C, ws, iters, sws)
        out.append(C + mean)
    return torch.cat(out)


def fit_codebooks(X: torch.Tensor, channels: int, code_bits: int, *, iters: int = 20, seed: int = 0,
                  w: torch.Tensor | None = None, fisher: torch.Tensor | None = None) -> torch.Tensor:
    """Tables for one layer's keys or values: ``X`` [H, N, D] calibration vectors per KV head, ``w`` [H, D]
    optional channel weights, ``fisher`` [H, N, D] optional squared loss gradients of ``X`` (each channel group's
    vector weighted by their sum over its channels) -> centroids fp16 [H, D/c, 2^code_bits, c]."""
    H, N, D = X.shape
    c = channels
    G = D // c
    Xg = X.reshape(H, N, G, c).permute(0, 2, 1, 3).reshape(H * G, N, c)
    wg = None if w is None else w.reshape(H * G, c)
    sw = None if fisher is None else fisher.reshape(H, N, G, c).sum(-1).permute(0, 2, 1).reshape(H * G, N)
    C = kmeans_batched(Xg, 2**code_bits, iters=iters, seed=seed, w=wg, sample_weight=sw)
    return C.reshape(H, G, 2**code_bits, c).to(torch.float16)


def _nearest_masked(X: torch.Tensor, C: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """:func:`nearest_centroid` with a weight per vector and channel, ``A`` [P, N, c] (0 leaves a channel out of
    that vector's distance): ``argmin_k Σ_j A_vj (x_vj − C_kj)²``."""
    C2 = (C * C).transpose(1, 2)  # [P, c, K]
    Ct = C.transpose(1, 2)
    return torch.cat([(torch.bmm(A[:, b], C2) - 2 * torch.bmm(A[:, b] * X[:, b], Ct)).argmin(-1)
                      for b in _blocks(X, C.shape[1])], dim=1)


def cq_encode(x: torch.Tensor, C: torch.Tensor, code_bits: int, w: torch.Tensor | None = None,
              keep: torch.Tensor | None = None, codes: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [B, H, n, D], tables ``C`` [H, G, K, c], weights ``w`` [H, G, c] -> packed codes uint8
    [B, H, n, packed G]: the index of each channel group's nearest centroid. ``keep`` [B, H, n, D] (bool) leaves
    the channels it marks False out of their group's distance (channels stored apart, as key outliers are); only
    the groups with such a channel are searched under it, and the others keep their plain code, which ``codes``
    (this function's output without ``keep``) supplies when the caller has it already."""
    B, H, n, D = x.shape
    _, G, K, c = C.shape
    Xg = x.float().reshape(B, H, n, G, c).permute(1, 3, 0, 2, 4).reshape(H * G, B * n, c)
    Cg, wg = C.float().reshape(H * G, K, c), None if w is None else w.reshape(H * G, c).float()
    if codes is None:
        a = nearest_centroid(Xg, Cg, wg)
    else:
        a = unpack_uint8(codes, code_bits, G).long().permute(1, 3, 0, 2).reshape(H * G, B * n)
    if keep is not None:
        A = keep.float().reshape(B, H, n, G, c).permute(1, 3, 0, 2, 4).reshape(H * G, B * n, c)
        touched = (A < 1).any(-1)
        if touched.any():
            p, m, pos, width = _ragged(touched)
            Xf, Af = Xg.new_zeros(H * G, width, c), Xg.new_ones(H * G, width, c)
            Xf[p, pos], Af[p, pos] = Xg[p, m], A[p, m]
            a[p, m] = _nearest_masked(Xf, Cg, Af if wg is None else Af * wg.unsqueeze(1))[p, pos]
    return pack_uint8(a.reshape(H, G, B, n).permute(2, 0, 3, 1), code_bits)


def cq_decode(packed: torch.Tensor, C: torch.Tensor, code_bits: int) -> torch.Tensor:
    """Inverse of :func:`cq_encode`: float32 [B, H, n, D], each group read back as its centroid."""
    _, G, _, c = C.shape
    codes = unpack_uint8(packed, code_bits, G).long()  # [B, H, n, G]
    B, H, n, _ = codes.shape
    h = torch.arange(H, device=codes.device).view(1, H, 1, 1)
    gi = torch.arange(G, device=codes.device).view(1, 1, 1, G)
    return C[h, gi, codes].float().reshape(B, H, n, G * c)
