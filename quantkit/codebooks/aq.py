"""Additive quantization: each vector of ``dim`` consecutive weights (after its row's scale) is the sum of one
codeword from each of ``codebooks`` tables of ``entries`` vectors (AQLM, Egiazarian et al. 2024), and one fp16
scale per output row.

Fitting (``prepare``) works on the Hessian-weighted objective of vq (quantkit.codebooks.vq): every coordinate
weighted by the Hessian's diagonal at its column, normalized to mean one; the cross terms come from the OBS loop's
error feedback (quantkit.algos.gptq), which rounds ``dim`` columns at a time exactly as for vq.

- initialization: residual k-means, table ``m`` fitted on what tables ``< m`` leave;
- encoding (:func:`encode`): greedy (residual) codes, then a beam search of width ``beam`` that changes one table's
  code at a time, ``passes`` sweeps over the tables; it starts from the greedy codes and keeps the best candidate,
  so it is never worse than greedy;
- table update (:func:`update_codebooks`): the least squares of all tables jointly given the codes. The weights
  are diagonal, so the problem splits per coordinate into ``dim`` systems of ``codebooks · entries`` unknowns; a
  small ridge towards the current tables keeps unused entries and makes the update never increase the objective.

Encoding and update alternate ``iters`` rounds. The full ``dim × dim`` Hessian block is not used (diagonal only).

One code per vector holds the ``codebooks`` indices as ``Σ_m a_m · entries^m`` (int64); the format
(quantkit.formats.codebook, ``quantkit-aq``) stores them as ``codebooks`` bit-packed streams.

Bits per weight: ``codebooks · log2(entries) / dim`` for the codes, plus ``codebooks · entries · dim · 16`` bits of
tables per layer and 16 bits per row.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from quantkit.codebooks.vq import _assign, weighted_kmeans
from quantkit.config.spec import Spec
from quantkit.quantizers import Window, register_quantizer

__all__ = ["AQQuantizer", "AQSpec", "encode", "objective", "update_codebooks"]

_ELEMENTS = 1 << 24  # bound on one [vectors, beam, entries] distance block


@register_quantizer("aq")
@dataclasses.dataclass(frozen=True)
class AQSpec(Spec):
    part = "quantizer"
    default_format: ClassVar[str] = "quantkit-aq"
    per_head_hessians: ClassVar[bool] = False  # one set of tables per layer
    name: str
    codebooks: int = 2  # M: tables summed per vector
    entries: int = 256  # 2^B entries per table, a power of two
    dim: int = 8  # weights per vector
    beam: int = 4  # beam width of the code search (1: coordinate descent from the greedy codes)
    passes: int = 2  # beam-search sweeps over the tables
    iters: int = 3  # alternations of encoding and the joint table update
    kmeans_iters: int = 15  # Lloyd iterations of each table's residual k-means
    seed: int = 0
    sample: int = 0  # vectors the tables are fitted on (a seeded random subset when the layer has more); 0: all

    def validate(self) -> None:
        if not 1 <= self.codebooks <= 8:
            raise self.bad("codebooks", "must be 1 to 8")
        if self.entries < 2 or self.entries > 2**16 or self.entries & (self.entries - 1):
            raise self.bad("entries", "must be a power of two from 2 to 65536")
        if self.codebooks * self.bits > 62:
            raise self.bad("codebooks", f"{self.codebooks} tables of {self.bits}-bit codes exceed 62 bits per vector")
        if not 1 <= self.dim <= 16:
            raise self.bad("dim", "must be 1 to 16")
        for f in ("beam", "passes"):
            if getattr(self, f) < 1:
                raise self.bad(f, "must be a positive integer")
        for f in ("iters", "kmeans_iters", "seed"):
            if getattr(self, f) < 0:
                raise self.bad(f, "must be a non-negative integer")
        if self.sample != 0 and self.sample < self.entries:
            raise self.bad("sample", "must be 0 (all vectors) or at least the number of entries")

    def check_layer(self, in_features: int, out_features: int) -> None:
        """Vectors of ``dim`` columns must tile the rows, and each table needs at least ``entries`` vectors; the
        tables must not hold more weights than the layer."""
        if in_features % self.dim:
            raise self.bad("dim", f"{self.dim} does not divide the layer's {in_features} input columns")
        vectors = out_features * in_features // self.dim
        if vectors < self.entries:
            raise self.bad("entries", f"{self.entries} entries is more than the layer's {vectors} vectors of "
                                      f"{self.dim}")
        if self.codebooks * self.entries * self.dim > out_features * in_features:
            raise self.bad("codebooks", f"{self.codebooks} tables of {self.entries}×{self.dim} hold more values "
                                        f"than the layer's {out_features * in_features} weights")

    @property
    def bits(self) -> int:
        """Bits per code of one table."""
        return int(math.log2(self.entries))

    def build(self, *, static_groups: bool = False) -> AQQuantizer:
        return AQQuantizer(self)


def _recon(C: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``Σ_m C[m, codes[..., m]]`` for tables ``C`` [M, K, d] and codes [..., M]: [..., d]."""
    return sum(C[m][codes[..., m]] for m in range(C.shape[0]))


def objective(X: torch.Tensor, Wx: torch.Tensor, C: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``Σ_v Σ_j Wx_vj (X_vj − Σ_m C_m[a_vm, j])²`` (float64)."""
    return (Wx.double() * (X.double() - _recon(C.double(), codes)) ** 2).sum()


def _greedy(X: torch.Tensor, Wx: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    R, codes = X, []
    for m in range(C.shape[0]):
        a = _assign(R, Wx, C[m])
        codes.append(a)
        R = R - C[m][a]
    return torch.stack(codes, 1)


def _beam_block(X: torch.Tensor, Wx: torch.Tensor, C: torch.Tensor, codes: torch.Tensor, beam: int,
                passes: int) -> torch.Tensor:
    N, M, K = X.shape[0], C.shape[0], C.shape[1]
    cand = codes[:, None, :].expand(N, beam, M).clone()  # [N, beam, M]; only the first starts valid
    err = torch.full((N, beam), math.inf, dtype=X.dtype, device=X.device)
    err[:, 0] = (Wx * (X - _recon(C, codes)) ** 2).sum(1)
    CC = (C * C).transpose(1, 2)  # [M, d, K]
    for _ in range(passes):
        for m in range(M):
            T = X[:, None, :] - (_recon(C, cand) - C[m][cand[..., m]])  # target of table m [N, beam, d]
            WT = Wx[:, None, :] * T
            dist = (WT * T).sum(-1, keepdim=True) - 2 * WT @ C[m].T + Wx[:, None, :] @ CC[m]  # [N, beam, K]
            dist = torch.where(err.isinf()[..., None], math.inf, dist)
            # Ties prefer the current code of the best beam: the search can only lower the objective.
            cur = dist.gather(2, cand[:, :1, m:m + 1]).squeeze(-1)
            val, idx = dist.flatten(1).topk(beam, dim=1, largest=False)
            b, k = idx // K, idx % K
            new = cand.gather(1, b[..., None].expand(N, beam, M)).clone()
            new[..., m] = k
            keep = val[:, 0] > cur[:, 0]  # rounding noise: never replace the best with a worse one
            new[keep, 0], val[keep, 0] = cand[keep, 0], cur[keep, 0]
            cand, err = new, val
    return cand[:, 0]


def encode(X: torch.Tensor, Wx: torch.Tensor, C: torch.Tensor, *, beam: int = 1, passes: int = 1,
           greedy_only: bool = False) -> torch.Tensor:
    """Codes [N, M] of vectors ``X`` [N, d] (weights ``Wx`` [N, d]) on tables ``C`` [M, K, d]: greedy residual
    codes, then (unless ``greedy_only``) the beam search from them."""
    codes = _greedy(X, Wx, C)
    if greedy_only:
        return codes
    chunk = max(1, _ELEMENTS // (beam * C.shape[1]))
    return torch.cat([_beam_block(X[i:i + chunk], Wx[i:i + chunk], C, codes[i:i + chunk], beam, passes)
                      for i in range(0, X.shape[0], chunk)])


def update_codebooks(X: torch.Tensor, Wx: torch.Tensor, C: torch.Tensor, codes: torch.Tensor,
                     ridge: float = 1e-6) -> torch.Tensor:
    """The tables [M, K, d] minimizing the weighted objective jointly given ``codes`` [N, M], plus ``ridge`` (times
    the mean diagonal) times the squared distance to the current ``C``: per coordinate ``j`` the normal equations
    ``(AᵀW_jA + λI) c_j = AᵀW_j x_j + λ c_j_old`` with ``A`` the [N, M·K] one-hot design (float64)."""
    M, K, d = C.shape
    MK = M * K
    idx = codes + torch.arange(M, device=codes.device) * K  # [N, M] column of each table's entry
    Wd = Wx.double()
    G = torch.zeros(d, MK * MK, dtype=torch.float64, device=X.device)
    for m in range(M):
        for m2 in range(M):
            flat = (idx[:, m] * MK + idx[:, m2]).expand(d, -1)
            G.scatter_add_(1, flat, Wd.T)
    G = G.view(d, MK, MK)
    rhs = torch.zeros(d, MK, dtype=torch.float64, device=X.device)
    WX = (Wd * X.double()).T  # [d, N]
    for m in range(M):
        rhs.scatter_add_(1, idx[:, m].expand(d, -1), WX)
    diag = torch.diagonal(G, dim1=1, dim2=2)
    lam = ridge * diag.mean(1).clamp(min=1e-30)  # [d]
    old = C.double().reshape(MK, d).T  # [d, MK]
    G = G + lam[:, None, None] * torch.eye(MK, dtype=torch.float64, device=X.device)
    sol = torch.linalg.solve(G, rhs + lam[:, None] * old)  # [d, MK]
    return sol.T.reshape(M, K, d).to(C.dtype)


def fit(X: torch.Tensor, Wx: torch.Tensor, spec: AQSpec) -> torch.Tensor:
    """Tables [M, K, d] for vectors ``X`` [N, d]: residual k-means, then ``iters`` rounds of encoding and the
    joint least-squares update."""
    g = torch.Generator().manual_seed(spec.seed)
    if spec.sample and X.shape[0] > spec.sample:
        keep = torch.randperm(X.shape[0], generator=g)[: spec.sample]
        X, Wx = X[keep], Wx[keep]
    R, tables = X, []
    for m in range(spec.codebooks):
        C = weighted_kmeans(R, Wx, spec.entries, iters=spec.kmeans_iters, seed=spec.seed + m)
        tables.append(C)
        R = R - C[_assign(R, Wx, C)]
    C = torch.stack(tables)
    for _ in range(spec.iters):
        codes = encode(X, Wx, C, beam=spec.beam, passes=spec.passes)
        C = update_codebooks(X, Wx, C, codes)
    return C


class AQQuantizer:
    code_dtype = torch.int64
    group_size = -1
    shared_params = ("codebooks",)

    def __init__(self, spec: AQSpec):
        self.spec = spec
        self.codesz = spec.dim

    def prepare(self, W: torch.Tensor, H: torch.Tensor | None, perm: torch.Tensor | None) -> None:
        rows, n = W.shape
        d = self.spec.dim
        self.spec.check_layer(n, rows)
        Wp = W[:, perm] if perm is not None else W
        rms = Wp.float().pow(2).mean(1, keepdim=True).sqrt()
        self.scale = rms.to(torch.float16).float().clamp(min=float(torch.finfo(torch.float16).tiny))
        diag = torch.ones(n) if H is None else torch.diagonal(H).float().clamp(min=0)
        diag = diag[perm] if perm is not None else diag
        diag = diag / diag.mean().clamp(min=1e-30)
        self.col_weights = diag.view(n // d, d).to(W.device)
        X = (Wp.float() / self.scale).reshape(-1, d)
        Wx = self.col_weights.expand(rows, -1, -1).reshape(-1, d)
        self.codebooks = fit(X, Wx, self.spec).to(torch.float16).float()  # stored in fp16: round once, here
        self._radix = self.spec.entries ** torch.arange(self.spec.codebooks, device=W.device)

    def quantize(self, x: torch.Tensor, col: int, window: Window) -> tuple[torch.Tensor, torch.Tensor]:
        rows, k = x.shape
        d = self.spec.dim
        X = (x.float() / self.scale).reshape(-1, d)
        Wx = self.col_weights[col // d : (col + k) // d].expand(rows, -1, -1).reshape(-1, d)
        codes = encode(X, Wx, self.codebooks, beam=self.spec.beam, passes=self.spec.passes)
        codes = (codes * self._radix).sum(1).view(rows, k // d)
        return self.decode(codes, col), codes

    def split(self, codes: torch.Tensor) -> torch.Tensor:
        """Combined codes [...] to the tables' indices [..., M]."""
        return (codes.long()[..., None] // self._radix) % self.spec.entries

    def decode(self, codes: torch.Tensor, col: int) -> torch.Tensor:
        rows = codes.shape[0]
        return _recon(self.codebooks, self.split(codes)).reshape(rows, -1) * self.scale

    def params(self) -> dict[str, torch.Tensor]:
        return {"codebooks": self.codebooks, "scales": self.scale}
