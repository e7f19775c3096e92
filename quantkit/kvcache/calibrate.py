"""Calibration of coupled-quantization tables: run the full-precision model over calibration windows with a
``DynamicCache``, take each layer's keys and values as the cache stores them (keys after RoPE), and fit one
k-means table per (layer, KV head, channel group), keys and values apart (quantkit.kvcache.codebook).

Keys are fitted in the form the scheme codes them: as cached (post-RoPE), or with the rotation taken off
(``keys: pre-rope``, quantkit.kvcache.rope), each window's tokens at positions 0, 1, ….

``fisher=True`` fits CQ's Fisher-guided centroids: one backward pass of the next-token loss per calibration
batch gives each cached key and value its gradient, and each vector weighs in the k-means by the sum of its
channels' squared gradients (the diagonal Fisher information), so the tables spend their centroids where an error
moves the loss most. ``channel_weights=True`` (with ``fisher``) also weighs each channel of a group by its mean
squared gradient over the calibration tokens, in the k-means distance and in the cache's encoding (the tables'
``weights``): the diagonal Fisher factored into a per-vector and a per-channel part, so a group's centroids resolve
the channels the loss is most sensitive to (the query-heavy key channels, the value channels ``o_proj`` amplifies)
more finely than the others. The layer walk of ``quantkit quantize`` has no loss to differentiate, so recipes fit
unweighted tables; Fisher-weighted ones come from here (``quantkit eval --kv-tables``, ``use_kv_cache``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from quantkit.data import calibration_ids, load_calibration_texts
from quantkit.kvcache.codebook import fit_codebooks
from quantkit.kvcache.rope import Rope
from quantkit.kvcache.scheme import CQScheme, parse_kv_scheme
from quantkit.kvcache.tables import CQTables

__all__ = ["cached_calibration", "calibrate_cq", "channel_fisher", "collect_kv", "unrotate_keys"]

logger = logging.getLogger(__name__)


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> float32 [H, B·T, D] on the CPU."""
    B, H, T, D = t.shape
    return t.detach().float().cpu().permute(1, 0, 2, 3).reshape(H, B * T, D)


class _GradRecorder(DynamicCache):
    """A ``DynamicCache`` that keeps the key and value tensors of each update as the graph made them, so their
    gradients can be asked for. (Not leaves: a later layer's keys depend on an earlier layer's values, and that
    path must stay in the graph.)"""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorded: list[torch.Tensor] = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.recorded += [key_states, value_states]
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def collect_kv(model, ids: torch.Tensor, *, batch_size: int | None = None, fisher: bool = False):
    """Keys and values per layer over calibration windows ``ids`` [N, T]: two lists of float32 [H, N·T, D]; with
    ``fisher``, also the gradients of each batch's mean next-token loss with respect to them (two more such
    lists). ``batch_size``: windows per forward (default 4; 1 with ``fisher``, whose backward keeps every
    activation and the logits' gradient)."""
    device = next(model.parameters()).device
    batch_size = batch_size or (1 if fisher else 4)
    out: list[list[list[torch.Tensor]]] = [[], [], [], []]  # keys, values, their gradients
    for s in range(0, ids.shape[0], batch_size):
        x = ids[s : s + batch_size].to(device)
        if fisher:
            cache = _GradRecorder(config=model.config)
            with torch.enable_grad():
                # The graph starts at the embeddings, so it exists whether or not the weights require gradients.
                embeds = model.get_input_embeddings()(x).detach().requires_grad_()
                loss = model(inputs_embeds=embeds, cache=cache, use_cache=True, labels=x).loss
                grads = torch.autograd.grad(loss, cache.recorded)
        else:
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                model(x, cache=cache, use_cache=True, logits_to_keep=1)
        for i, layer in enumerate(cache.layers):
            if len(out[0]) <= i:
                for lists in out:
                    lists.append([])
            out[0][i].append(_heads_first(layer.keys))
            out[1][i].append(_heads_first(layer.values))
            if fisher:
                out[2][i].append(_heads_first(grads[2 * i]))
                out[3][i].append(_heads_first(grads[2 * i + 1]))
    return tuple([torch.cat(parts, 1) for parts in lists] for lists in out[: 4 if fisher else 2])


def unrotate_keys(keys: list[torch.Tensor], rope: Rope, seqlen: int) -> list[torch.Tensor]:
    """Per-layer keys [H, N·T, D] of windows of ``seqlen`` tokens, each from position 0, with RoPE taken off (for
    gradients: their gradients with respect to the pre-RoPE keys, up to the constant attention scaling)."""
    positions = torch.arange(keys[0].shape[1]).remainder(seqlen).unsqueeze(0)
    return [rope.remove(k.unsqueeze(0), positions).squeeze(0) for k in keys]


def calibrate_cq(model, tokenizer, scheme: CQScheme | dict[str, Any] | str, *, calib: str = "c4",
                 nsamples: int = 16, seqlen: int = 1024, seed: int = 0, iters: int = 20, sample: int = 16384,
                 data_dir: str | os.PathLike | None = None, ids: torch.Tensor | None = None,
                 progress: bool = True, fisher: bool = False, channel_weights: bool = False) -> CQTables:
    """Tables for ``scheme`` fitted on ``nsamples`` windows of ``seqlen`` tokens (``calib`` as in
    quantkit.data, or the given ``ids`` [N, T]); k-means on at most ``sample`` vectors per table (a seeded
    random subset), ``iters`` Lloyd iterations, deterministic for a given ``seed``; ``fisher``: Fisher-guided
    centroids, ``channel_weights``: per-channel Fisher weights too (module docstring)."""
    scheme = parse_kv_scheme(scheme)
    if not isinstance(scheme, CQScheme):
        raise TypeError(f"calibrate_cq needs a 'cq' scheme, got {scheme.method!r}")
    if channel_weights and not fisher:
        raise ValueError("channel_weights needs fisher=True (the weights are mean squared loss gradients)")
    source = calib if ids is None else "given ids"
    if ids is None:
        texts = load_calibration_texts(calib, data_dir)
        ids = calibration_ids(tokenizer, texts, nsamples=nsamples, seqlen=seqlen, seed=seed)
    K, V, *grads = collect_kv(model, ids, fisher=fisher)
    if scheme.pre_rope:
        rope = Rope.of(model)
        K = unrotate_keys(K, rope, ids.shape[1])
        if fisher:  # the gradient with respect to the pre-RoPE key: the rotation taken off it too
            grads[0] = unrotate_keys(grads[0], rope, ids.shape[1])
    g = torch.Generator().manual_seed(seed)
    kc, vc, kw, vw = [], [], [], []
    for i in tqdm(range(len(K)), desc=f"cq tables ({scheme.label})", disable=not progress):
        for j, (X, out, wout) in enumerate(((K[i], kc, kw), (V[i], vc, vw))):
            F = grads[j][i].square() if fisher else None
            w = channel_fisher(F, scheme.channels) if channel_weights else None
            if sample and X.shape[1] > sample:
                pick = torch.randperm(X.shape[1], generator=g)[:sample]
                X, F = X[:, pick], None if F is None else F[:, pick]
            out.append(fit_codebooks(X, scheme.channels, scheme.code_bits, iters=iters, seed=seed + i,
                                     w=None if w is None else w.flatten(1), fisher=F))
            wout.append(w)
    weighting = ("fisher+channels" if channel_weights else "fisher") if fisher else "none"
    info = {"data": source, "nsamples": int(ids.shape[0]),
            "seqlen": int(ids.shape[1]), "seed": seed, "iters": iters, "sample": sample,
            "keys": "pre-RoPE" if scheme.pre_rope else "post-RoPE", "weighting": weighting}
    return CQTables(scheme, kc, vc, kw if channel_weights else None, vw if channel_weights else None,
                    calibration=info)


def channel_fisher(F: torch.Tensor, channels: int) -> torch.Tensor:
    """Per-channel weights [H, D/c, c] from squared gradients ``F`` [H, N, D]: each channel's mean over the
    vectors, scaled so a group's weights average 1 (the scale of a group's distance does not change its nearest
    centroid), and floored at 1e-3 of that mean so no channel drops out of the distance."""
    H, _, D = F.shape
    w = F.mean(1).reshape(H, D // channels, channels)
    w = w / w.mean(-1, keepdim=True).clamp(min=torch.finfo(w.dtype).tiny)
    return w.clamp(min=1e-3).float()


def cached_calibration(model, tokenizer, scheme: CQScheme, tables_dir: str | os.PathLike | None, *,
                       nsamples: int = 16, seqlen: int = 1024, iters: int = 20, sample: int = 16384, seed: int = 0,
                       fisher: bool = False, channel_weights: bool = False, **kwargs) -> CQTables:
    """:func:`calibrate_cq`, its tables kept in ``tables_dir`` (when given) under a name made of the scheme's code
    form and every calibration setting, and read back from there by a later call with the same ones (the
    benchmarks' cache: ``benchmarks/kv_ppl.py`` fits, ``benchmarks/kv_memory.py`` reuses)."""
    calib = {"nsamples": nsamples, "seqlen": seqlen, "iters": iters, "sample": sample, "seed": seed}
    path = None
    if tables_dir is not None:
        key = "_".join(f"{k}{v}" for k, v in calib.items())
        key += ("_fisher" if fisher else "") + ("_chw" if channel_weights else "")
        keys = "_pre-rope" if scheme.pre_rope else ""
        path = Path(tables_dir) / f"cq_b{scheme.bits}_c{scheme.channels}{keys}_{key}.safetensors"
        if path.is_file():
            return CQTables.load(path)
    t0 = time.time()
    tables = calibrate_cq(model, tokenizer, scheme, **calib, fisher=fisher, channel_weights=channel_weights,
                          **kwargs)
    logger.info("calibrated %s in %.0f s", scheme.label, time.time() - t0)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tables.save(path)
    return tables
