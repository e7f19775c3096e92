"""Ablation: how the value projections' Hessian decides GPTQ on SmolLM2.

Quantizes only the ``v_proj`` of every layer of the full-precision model (W4 g128 asymmetric by default) and
measures WikiText-2 perplexity on the first N windows, with: round-to-nearest; GPTQ on the plain Hessian
(act-order and not); GPTQ on the attention-weighted per-head Hessians (quantkit/algos/attention.py). Hessians
come from the pipeline's statistics collectors (quantkit/calibration/collectors.py) during one forward of the
full-precision model over the calibration set (not the sequential pipeline, so the value projections are
compared on identical inputs).

    python benchmarks/value_ablation.py [--nsamples 8] [--windows 8] [--bits 4]   (QUANTKIT_DATA_DIR for data)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from quantkit.algos.gptq import gptq
from quantkit.algos.rtn import rtn
from quantkit.calibration.collectors import AttentionHessianCollector, HessianCollector
from quantkit.data import calibration_ids, load_calibration_texts
from quantkit.eval.perplexity import wikitext2_perplexity
from quantkit.grids import UniformGrid
from quantkit.loading import load_model
from quantkit.quantizers.scalar import ScalarQuantizer


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
    # The pipeline's own statistics collectors, one pair per layer, attached for one forward of the whole model.
    targets = [{"self_attn.v_proj": layer.self_attn.v_proj} for layer in layers]
    plain_c = [HessianCollector(layer, t, torch.device("cpu")) for layer, t in zip(layers, targets, strict=True)]
    heads_c = [AttentionHessianCollector(layer, t, torch.device("cpu"))
               for layer, t in zip(layers, targets, strict=True)]
    t0 = time.time()
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for c in plain_c + heads_c:
            stack.enter_context(c.collecting())
        for s in range(a.nsamples):
            model(ids[s : s + 1], use_cache=False)
            for c in plain_c:
                c.end_chunk()
    plain = [c.results()["self_attn.v_proj"] for c in plain_c]
    heads = [c.results()["self_attn.v_proj"] for c in heads_c]
    print(f"calibration statistics: {time.time() - t0:.0f} s", flush=True)

    def q():
        return ScalarQuantizer(UniformGrid(a.bits), a.group_size)

    variants = {
        "full precision": None,
        "rtn": lambda W, i: rtn(W, q()).W_hat,
        "gptq, plain Hessian, act-order": lambda W, i: gptq(W, plain[i], q(), act_order=True).W_hat,
        "gptq, plain Hessian": lambda W, i: gptq(W, plain[i], q()).W_hat,
        "gptq, attention-weighted, act-order": lambda W, i: gptq(W, heads[i], q(), act_order=True).W_hat,
        "gptq, attention-weighted": lambda W, i: gptq(W, heads[i], q()).W_hat,
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
