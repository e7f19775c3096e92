"""Calibration of coupled-quantization tables: run the full-precision model over calibration windows with a
``DynamicCache``, take each layer's keys and values as the cache stores them (keys after RoPE), and fit one
k-means table per (layer, KV head, channel group), keys and values apart (quantkit.kvcache.codebook).

Keys are fitted in the form the scheme codes them: as cached (post-RoPE), or with the rotation taken off
(``keys: pre-rope``, quantkit.kvcache.rope), each window's tokens at positions 0, 1, ….
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from quantkit.data import calibration_ids, load_calibration_texts
from quantkit.kvcache.codebook import fit_codebooks
from quantkit.kvcache.rope import Rope
from quantkit.kvcache.scheme import CQScheme, parse_kv_scheme
from quantkit.kvcache.tables import CQTables

__all__ = ["calibrate_cq", "collect_kv", "unrotate_keys"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def collect_kv(model, ids: torch.Tensor, *, batch_size: int = 4) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keys and values per layer over calibration windows ``ids`` [N, T]: two lists of float32 [H, N·T, D]."""
    device = next(model.parameters()).device
    keys: list[list[torch.Tensor]] = []
    values: list[list[torch.Tensor]] = []
    for s in range(0, ids.shape[0], batch_size):
        cache = DynamicCache(config=model.config)
        model(ids[s : s + batch_size].to(device), cache=cache, use_cache=True, logits_to_keep=1)
        for i, layer in enumerate(cache.layers):
            if len(keys) <= i:
                keys.append([])
                values.append([])
            for out, t in ((keys[i], layer.keys), (values[i], layer.values)):
                B, H, T, D = t.shape
                out.append(t.float().cpu().permute(1, 0, 2, 3).reshape(H, B * T, D))
    return [torch.cat(k, 1) for k in keys], [torch.cat(v, 1) for v in values]


def unrotate_keys(keys: list[torch.Tensor], rope: Rope, seqlen: int) -> list[torch.Tensor]:
    """Per-layer keys [H, N·T, D] of windows of ``seqlen`` tokens, each from position 0, with RoPE taken off."""
    positions = torch.arange(keys[0].shape[1]).remainder(seqlen).unsqueeze(0)
    return [rope.remove(k.unsqueeze(0), positions).squeeze(0) for k in keys]


def calibrate_cq(model, tokenizer, scheme: CQScheme | dict[str, Any] | str, *, calib: str = "c4",
                 nsamples: int = 16, seqlen: int = 1024, seed: int = 0, iters: int = 20, sample: int = 16384,
                 data_dir: str | os.PathLike | None = None, ids: torch.Tensor | None = None,
                 progress: bool = True) -> CQTables:
    """Tables for ``scheme`` fitted on ``nsamples`` windows of ``seqlen`` tokens (``calib`` as in
    quantkit.data, or the given ``ids`` [N, T]); k-means on at most ``sample`` vectors per table (a seeded
    random subset), ``iters`` Lloyd iterations, deterministic for a given ``seed``."""
    scheme = parse_kv_scheme(scheme)
    if not isinstance(scheme, CQScheme):
        raise TypeError(f"calibrate_cq needs a 'cq' scheme, got {scheme.method!r}")
    source = calib if ids is None else "given ids"
    if ids is None:
        texts = load_calibration_texts(calib, data_dir)
        ids = calibration_ids(tokenizer, texts, nsamples=nsamples, seqlen=seqlen, seed=seed)
    K, V = collect_kv(model, ids)
    if scheme.pre_rope:
        K = unrotate_keys(K, Rope.of(model), ids.shape[1])
    g = torch.Generator().manual_seed(seed)
    kc, vc = [], []
    for i in tqdm(range(len(K)), desc=f"cq tables ({scheme.label})", disable=not progress):
        for X, out in ((K[i], kc), (V[i], vc)):
            if sample and X.shape[1] > sample:
                X = X[:, torch.randperm(X.shape[1], generator=g)[:sample]]
            out.append(fit_codebooks(X, scheme.channels, scheme.code_bits, iters=iters, seed=seed + i))
    info = {"data": source, "nsamples": int(ids.shape[0]),
            "seqlen": int(ids.shape[1]), "seed": seed, "iters": iters, "sample": sample,
            "keys": "pre-RoPE" if scheme.pre_rope else "post-RoPE"}
    return CQTables(scheme, kc, vc, calibration=info)
