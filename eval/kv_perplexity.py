"""KV-cache perplexity, DESIGN.md's chunked protocol ("KV-cache perplexity").

The WikiText-2 token stream (quantkit.eval.perplexity) is cut into non-overlapping windows of 512 tokens; each
window is fed in 8 chunks of 64 with one cache carried between the chunks, so every chunk attends to the cached
(quantized) keys and values of the chunks before it; the mean NLL of every next-token prediction of the window
(511 per window) over the first 64 windows is exponentiated. The fp reference runs the same chunks through a
``DynamicCache``.

Long-context figure: windows of 2048 tokens fed in chunks of 256; only the last 256 tokens are scored, so each
scored prediction reads the quantized cache of the 1792 context tokens before them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from quantkit.errors import QuantkitError
from quantkit.eval.perplexity import wikitext2_text

__all__ = ["CHUNKED", "LONG", "KVProtocol", "KVPerplexity", "kv_evaluate", "kv_perplexity", "wikitext2_ids"]


@dataclass(frozen=True)
class KVProtocol:
    seqlen: int  # window length
    chunk: int  # tokens per forward
    score_from: int  # first scored target position in the window (1: every prediction)
    windows: int  # default number of windows (the first ones)

    def describe(self, windows: int, available: int) -> str:
        scored = f"last {self.seqlen - self.score_from}" if self.score_from > 1 else "all"
        return (f"windows of {self.seqlen} in chunks of {self.chunk}, {scored} predictions scored, "
                f"first {windows} of {available} windows")


CHUNKED = KVProtocol(seqlen=512, chunk=64, score_from=1, windows=64)
LONG = KVProtocol(seqlen=2048, chunk=256, score_from=1792, windows=16)


@dataclass
class KVPerplexity:
    ppl: float
    nll: float  # mean token NLL (nats)
    windows: int
    tokens_scored: int
    protocol: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def wikitext2_ids(tokenizer, data: str | os.PathLike | None = None) -> torch.Tensor:
    """The tokenized WikiText-2 test stream [n]."""
    return tokenizer(wikitext2_text(data), return_tensors="pt").input_ids.reshape(-1)


@torch.no_grad()
def _window_nll(model, x: torch.Tensor, cache, p: KVProtocol) -> tuple[float, int]:
    """Summed NLL and count of the scored predictions of one window ``x`` [1, seqlen]."""
    T = x.shape[1]
    total, count = 0.0, 0
    for s in range(0, T, p.chunk):
        e = min(T, s + p.chunk)
        # logits at positions s..e-1 predict targets s+1..e; only those of scored targets are computed (one, unused,
        # when none is: a forward returns at least one)
        first_pos = max(s, p.score_from - 1)
        keep = min(e, T - 1) - first_pos  # scored predictions in this chunk
        tail = e - first_pos if keep > 0 else 1  # logits from first_pos to the chunk's end
        out = model(x[:, s:e], cache=cache, use_cache=True, logits_to_keep=tail)
        if keep <= 0:
            continue
        logits = out.logits[0, :keep].float()
        targets = x[0, first_pos + 1 : first_pos + 1 + keep]
        total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        count += keep
    return total, count


def kv_perplexity(model, ids: torch.Tensor, make_cache: Callable[[], Any], *, protocol: KVProtocol = CHUNKED,
                  windows: int | None = None, progress: bool = True) -> KVPerplexity:
    """Perplexity of ``model`` over the first ``windows`` (default: the protocol's) windows of ``ids`` [n], each
    fed through a fresh cache from ``make_cache()`` in the protocol's chunks. A window with a non-finite NLL ends
    the run there (``windows`` then counts it)."""
    ids = ids.reshape(-1)
    available = ids.numel() // protocol.seqlen
    n = min(protocol.windows if windows is None else windows, available)
    if n < 1:
        raise QuantkitError(f"text has {ids.numel()} tokens, fewer than one window of {protocol.seqlen}")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for w in tqdm(range(n), desc=f"kv perplexity ({n} x {protocol.seqlen}/{protocol.chunk})", disable=not progress):
        x = ids[w * protocol.seqlen : (w + 1) * protocol.seqlen].unsqueeze(0).to(device)
        s, c = _window_nll(model, x, make_cache(), protocol)
        total, count = total + s, count + c
        if not math.isfinite(s):
            n = w + 1
            break
    mean = total / count
    ppl = math.exp(mean) if math.isfinite(mean) and mean < 709 else (math.inf if mean > 0 else math.nan)
    return KVPerplexity(ppl=ppl, nll=mean, windows=n, tokens_scored=count,
                        protocol=protocol.describe(n, available))


def kv_evaluate(model, tokenizer, scheme, *, ids: torch.Tensor | None = None, windows: int | None = None,
                long_windows: int = 0, tables=None, data: str | os.PathLike | None = None,
                calib: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """The ``kv_cache`` results entry for one scheme: its bits per element (at 512 and 4096 tokens of context)
    and the chunked (and, with ``long_windows``, the long-context) perplexity. A CQ scheme without ``tables`` is
    calibrated first (``calib``: keyword arguments of ``calibrate_cq``) and the settings recorded."""
    from quantkit.kvcache import CQScheme, bits_per_element, calibrate_cq, head_dim_of, kv_cache, parse_kv_scheme

    scheme = parse_kv_scheme(scheme)
    hd = head_dim_of(model.config)
    if isinstance(scheme, CQScheme) and tables is None:
        scheme.check_model(hd)
    else:
        kv_cache(model, scheme, tables)  # refuses a scheme the model or tables cannot take, before any long run
    if ids is None:
        ids = wikitext2_ids(tokenizer, data)
    entry: dict[str, Any] = {"scheme": scheme.to_dict(), "label": scheme.label}
    if isinstance(scheme, CQScheme) and tables is None:
        tables = calibrate_cq(model, tokenizer, scheme, data_dir=data, progress=progress, **(calib or {}))
    if tables is not None:
        entry["tables"] = tables.to_dict()
    text = model.config.get_text_config(decoder=True)
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    entry["bits_per_element"] = {str(n): bits_per_element(scheme, hd, n, kv_heads) for n in (512, 4096)}

    def make():
        return kv_cache(model, scheme, tables)

    entry["chunked"] = kv_perplexity(model, ids, make, windows=windows, progress=progress).to_dict()
    if long_windows:
        entry["long_context"] = kv_perplexity(model, ids, make, protocol=LONG, windows=long_windows,
                                              progress=progress).to_dict()
    return entry
