"""Ablation: how the value projections' Hessian decides GPTQ on SmolLM2.

Quantizes only the ``v_proj`` of every layer of the full-precision model (W4 g128 asymmetric by default) and
measures WikiText-2 perplexity on the first N windows, with: round-to-nearest; GPTQ on the plain Hessian
(act-order and not); GPTQ on the attention-weighted per-head Hessians (quantkit/algos/attention.py). Hessians
come from one forward of the full-precision model over the calibration set (not the sequential pipeline, so the
value projections are compared on identical inputs).

    python benchmarks/value_ablation.py [--nsamples 8] [--windows 8] [--bits 4]   (QUANTKIT_DATA_DIR for data)
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from quantkit.algos.attention import HeadHessianAccumulator, recording_attention, value_heads
from quantkit.algos.gptq import gptq
from quantkit.algos.hessian import HessianAccumulator
from quantkit.algos.rtn import rtn
from quantkit.data import calibration_ids, load_calibration_texts
from quantkit.eval.perplexity import wikitext2_perplexity
from quantkit.grids import UniformGrid
from quantkit.loading import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    a = p.parse_args()

    model, tok = load_model(a.model, dtype=torch.float32)
    ids = calibration_ids(tok, load_calibration_texts("c4"), nsamples=a.nsamples, seqlen=a.seqlen, seed=0)
    layers = model.model.layers
    plain = [HessianAccumulator(layer.self_attn.v_proj.in_features) for layer in layers]
    heads = [HeadHessianAccumulator(value_heads(layer.self_attn, layer.self_attn.v_proj),
                                    layer.self_attn.v_proj.in_features) for layer in layers]
    pending: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(layers):
        def keep(_m, inputs, _o, i=i):
            pending[i] = inputs[0]
            plain[i].add(inputs[0])

        handles.append(layer.self_attn.v_proj.register_forward_hook(keep))
    callbacks = {layer.self_attn: (lambda c, i=i: heads[i].add(pending.pop(i), c)) for i, layer in enumerate(layers)}
    t0 = time.time()
    with torch.no_grad(), recording_attention(callbacks):
        for s in range(a.nsamples):
            model(ids[s : s + 1], use_cache=False)
    for h in handles:
        h.remove()
    print(f"calibration statistics: {time.time() - t0:.0f} s", flush=True)

    grid = UniformGrid(a.bits)
    kw = dict(group_size=a.group_size)
    variants = {
        "full precision": None,
        "rtn": lambda W, i: rtn(W, grid, **kw).W_hat,
        "gptq, plain Hessian, act-order": lambda W, i: gptq(W, plain[i].H, grid, act_order=True, **kw).W_hat,
        "gptq, plain Hessian": lambda W, i: gptq(W, plain[i].H, grid, **kw).W_hat,
        "gptq, attention-weighted, act-order": lambda W, i: gptq(W, heads[i].H, grid, act_order=True, **kw).W_hat,
        "gptq, attention-weighted": lambda W, i: gptq(W, heads[i].H, grid, **kw).W_hat,
    }
    originals = [layer.self_attn.v_proj.weight.data.clone() for layer in layers]
    results = {}
    for name, fn in variants.items():
        for i, layer in enumerate(layers):
            layer.self_attn.v_proj.weight.data = originals[i] if fn is None else fn(originals[i], i)
        results[name] = wikitext2_perplexity(model, tok, windows=a.windows, progress=False).ppl
        print(f"| {name} | {results[name]:.3f} |", flush=True)
    print(json.dumps({"args": vars(a), "ppl": results}, indent=2))


if __name__ == "__main__":
    main()
