"""Attention-weighted Hessians for value projections.

A value projection's output is never used token by token: attention mixes it, ``o_t = Σ_s a_ts W_v x_s``, so
the error that reaches the rest of the network is ``ΔW_v Σ_s a_ts x_s``. By convexity (each row of ``a`` sums
to one), ``Σ_t ‖ΔW_v Σ_s a_ts x_s‖² ≤ Σ_s c_s ‖ΔW_v x_s‖²`` with ``c_s = Σ_t a_ts`` the attention that token *s*
receives. Minimizing the right side is the usual layer objective with each calibration token weighted by
``c_s``: the Hessian becomes ``H = 2 Σ_s c_s x_s x_sᵀ / n``, one per key/value head (the rows of ``W_v`` that
head owns), with ``c`` averaged over the query heads that share it. The weights sum to the number of queries,
so ``H`` keeps the scale of the unweighted one.

Why it matters: most heads park their attention on a few "sink" tokens (the first token of a sequence
above all), whose inputs point along directions that ordinary tokens barely use. The unweighted objective
counts a sink as one token among thousands, so GPTQ moves rounding error into exactly those directions, and
every query that reads the sink's value picks it up. On SmolLM2-135M at W4 g128, quantizing only the value
projections gave WikiText-2 perplexity (first 8 windows) 19.13 at full precision, 19.83 with round-to-nearest,
23.28 with plain GPTQ and 19.22 with attention-weighted GPTQ (BENCHMARKS.md).

The column sums come from the attention of the calibration forward itself: while the Hessians are gathered,
:func:`recording_attention` swaps the model's attention function in transformers' ``ALL_ATTENTION_FUNCTIONS``
for one that computes the probabilities in query chunks (the same mask, scaling and soft-capping) and hands
``c`` to a callback, then lets the original function compute the output, so the layer's outputs do not change.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from quantkit.algos.hessian import HessianAccumulator

__all__ = ["HeadHessianAccumulator", "attention_received", "recording_attention", "value_heads"]


def value_heads(attention: nn.Module, v_proj: nn.Linear) -> int | None:
    """Number of key/value heads whose rows make up ``v_proj``, or None if ``attention`` is not recognizable."""
    head_dim = getattr(attention, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim <= 0 or v_proj.out_features % head_dim:
        return None
    if not hasattr(attention, "num_key_value_groups"):
        return None
    return v_proj.out_features // head_dim


@torch.no_grad()
def attention_received(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, *,
                       scaling: float | None = None, is_causal: bool = True, softcap: float | None = None,
                       chunk: int = 256) -> torch.Tensor:
    """``c[b, h, s]``: attention that key position *s* receives from all queries, averaged over the query heads
    of key/value head *h*. ``query`` [b, nq, tq, d], ``key`` [b, nkv, tk, d] (not repeated), ``attention_mask``
    as transformers passes it to the attention function: None (causal when ``is_causal``), boolean (True =
    attend) or additive float, broadcastable to [b, nq, tq, tk]. A query that may attend to nothing (padding)
    contributes nothing."""
    b, nq, tq, d = query.shape
    nkv, tk = key.shape[1], key.shape[2]
    if nq % nkv:
        raise ValueError(f"{nq} query heads do not split over {nkv} key/value heads")
    grp = nq // nkv
    scale = 1.0 / math.sqrt(d) if scaling is None else scaling
    q = (query.float() * scale).reshape(b, nkv, grp, tq, d)
    kt = key.float().transpose(-1, -2)  # [b, nkv, d, tk]
    mask = attention_mask
    if mask is not None:
        if mask.dim() != 4:
            raise ValueError(f"expected a 4-d attention mask, got shape {tuple(mask.shape)}")
        mask = mask[..., -tk:]
        # [b|1, 1|nq, tq, tk] -> [b|1, nkv|1, grp|1, tq, tk]
        mask = mask.reshape(mask.shape[0], nkv, grp, *mask.shape[2:]) if mask.shape[1] == nq else mask.unsqueeze(2)
    causal = mask is None and is_causal and tq > 1
    received = torch.zeros(b, nkv, tk, dtype=torch.float32, device=query.device)
    for s in range(0, tq, chunk):
        e = min(s + chunk, tq)
        # sdpa's causal mask is aligned top-left: query i sees keys 0..i, so keys past this chunk are skipped
        keys = min(e, tk) if causal else tk
        qc = q[:, :, :, s:e].reshape(b, nkv, grp * (e - s), d)  # one matmul per KV head, not per query head
        scores = (qc @ kt[..., :keys]).view(b, nkv, grp, e - s, keys)
        if softcap is not None:
            scores = torch.tanh_(scores / softcap).mul_(softcap)
        if mask is not None:
            m = mask[..., s:e, :] if mask.shape[-2] == tq else mask
            if m.dtype == torch.bool:
                scores.masked_fill_(~m, float("-inf"))
            else:  # additive; the dtype's minimum marks a masked pair, as transformers builds it
                scores.add_(m.float()).masked_fill_(m <= torch.finfo(m.dtype).min / 2, float("-inf"))
        elif causal and s < keys:
            diag = scores[..., s:keys]  # only the block on the diagonal has keys after some queries
            diag.masked_fill_(torch.ones(e - s, keys - s, dtype=torch.bool, device=query.device).triu_(1),
                              float("-inf"))
        top = scores.amax(dim=-1, keepdim=True).nan_to_num_(0.0, neginf=0.0)
        unnorm = scores.sub_(top).exp_()
        total = unnorm.sum(dim=-1)
        inv = torch.where(total > 0, 1.0 / total, 0.0)  # a query that may attend to nothing contributes nothing
        received[..., :keys] += (inv.unsqueeze(-2) @ unnorm).sum(dim=2).squeeze(-2)
    return received / grp


class HeadHessianAccumulator(HessianAccumulator):
    """``Σ_s c_hs x_s x_sᵀ`` per key/value head *h* (float64 running sums); :attr:`H` is [heads, in, in]."""

    def __init__(self, heads: int, in_features: int, device: torch.device | str = "cpu"):
        super().__init__(in_features, device)
        self.S = self.S.expand(heads, -1, -1).clone()

    def add(self, X: torch.Tensor, received: torch.Tensor) -> None:
        """``X`` [b, t, in]: the value projection's input; ``received`` [b, heads, t]."""
        X = X.reshape(-1, X.shape[-1]).float()
        c = received.permute(1, 0, 2).reshape(received.shape[1], -1, 1).float()  # [heads, b*t, 1]
        self.S += ((c * X).transpose(1, 2) @ X).double()  # one batched matmul over the heads
        self.n += X.shape[0]


def _eager(module: nn.Module, fallback: Callable) -> Callable:
    """The model's own eager attention: "eager" is not in transformers' mapping but a function of each model's
    file (Gemma-2's soft-caps the scores, which sdpa refuses); sdpa where a model file has none."""
    import sys

    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None) or fallback


def _is_causal(module: nn.Module, kwargs: dict) -> bool:
    flag = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", True) if flag is None else flag)


@contextlib.contextmanager
def recording_attention(callbacks: dict[nn.Module, Callable[[torch.Tensor], None]]) -> Iterator[None]:
    """While active, every attention module in ``callbacks`` that runs through transformers' attention
    interface calls its callback with :func:`attention_received` of that call, then computes its output as
    before. Modules whose attention does not go through the interface are simply not reported."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impls = {getattr(getattr(m, "config", None), "_attn_implementation", None) for m in callbacks} - {None}
    saved: dict[str, Callable | None] = {}
    for impl in impls:
        original = ALL_ATTENTION_FUNCTIONS._global_mapping.get(impl, None) if impl != "eager" else None

        def wrapper(module, query, key, value, attention_mask, *args, _original=original, **kwargs):
            cb = callbacks.get(module)
            if cb is not None:
                cb(attention_received(query, key, attention_mask, scaling=kwargs.get("scaling"),
                                      is_causal=_is_causal(module, kwargs),
                                      softcap=kwargs.get("softcap")))
            fn = _original or _eager(module, sdpa_attention_forward)
            return fn(module, query, key, value, attention_mask, *args, **kwargs)

        saved[impl] = ALL_ATTENTION_FUNCTIONS._local_mapping.get(impl)
        ALL_ATTENTION_FUNCTIONS[impl] = wrapper
    try:
        yield
    finally:
        for impl, prev in saved.items():
            if prev is None:
                ALL_ATTENTION_FUNCTIONS._local_mapping.pop(impl, None)
            else:
                ALL_ATTENTION_FUNCTIONS[impl] = prev
