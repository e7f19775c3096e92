"""How much a linear's KL sensitivity coefficient moves with the tokens it is measured on (issue 18).

`quantkit allocate` estimates each linear's coefficient as KL / relative error on a few calibration windows
(2 x 256 tokens by default). This script injects the same seeded Gaussian noise (relative output error ``--noise``)
into one linear at a time and measures the KL divergence from the unquantized model on several disjoint 2 x 256
token sets and on one larger set, so the spread across the small sets shows the sampling noise the solver sees.
``--probes`` adds, on the larger set, the coefficient of each named candidate's own rounding error (quantized as
``quantkit quantize`` does, with the Hessian of ``--hessian`` calibration sequences), to compare error structures.

    QUANTKIT_DATA_DIR=../shared/data python benchmarks/sensitivity_noise.py \
        [--model smollm2-135m] [--linears model.layers.12.self_attn.k_proj,...] [--measurement measurement.json]
        [--probes gptq-w3g128,hadamard-gptq-vq3 --hessian 16x2048] [--sets 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from quantkit.algos.hessian import HessianAccumulator
from quantkit.allocate.candidates import default_candidates
from quantkit.allocate.measure import noise_kl, reference_log_probs, relative_error, stored_weight, weight_kl
from quantkit.data import calibration_ids, load_calibration_texts
from quantkit.loading import load_model

DEFAULT = ",".join([f"model.layers.{i}.self_attn.k_proj" for i in (1, 2, 12, 13, 19, 29)]
                   + [f"model.layers.{i}.mlp.gate_proj" for i in (1, 12, 29)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--linears", default=DEFAULT)
    ap.add_argument("--noise", type=float, default=0.01, help="relative output error of the injected noise")
    ap.add_argument("--sets", type=int, default=4, help="disjoint small token sets (2 x 256 each)")
    ap.add_argument("--large", default="8x512", help="the larger token set, SEQUENCESxTOKENS")
    ap.add_argument("--measurement", help="a measurement.json whose coefficients to list beside")
    ap.add_argument("--probes", default="", help="default candidates whose rounding error to measure too")
    ap.add_argument("--hessian", help="SEQUENCESxTOKENS drawn apart (seed 1) for the Hessian; default 4 "
                    "sequences of the KL draw")
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(a.model, dtype=torch.float32)
    model.eval()
    nl, tl = (int(v) for v in a.large.split("x"))
    n = max(2 * a.sets, nl) + 4
    ids = calibration_ids(tok, load_calibration_texts("c4"), nsamples=n, seqlen=max(256, tl), seed=0)
    hess_ids = ids[-4:]  # the Hessian that scales the noise: 4 sequences apart from every KL set
    if a.hessian:
        hn, ht = (int(v) for v in a.hessian.split("x"))
        hess_ids = calibration_ids(tok, load_calibration_texts("c4"), nsamples=hn, seqlen=ht, seed=1)
    cands = {c.name: c for c in default_candidates()}
    probes = [cands[p] for p in a.probes.split(",") if p]
    small = [ids[2 * s: 2 * s + 2, :256] for s in range(a.sets)]
    large = ids[:nl, :tl]
    m = json.loads(Path(a.measurement).read_text()) if a.measurement else None
    names = a.linears.split(",")
    hessians = {name: HessianAccumulator(model.get_submodule(name).in_features) for name in names}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda mod, i, o, acc=hessians[name]: acc.add(i[0].detach().reshape(-1, i[0].shape[-1]))) for name in names]
    with torch.no_grad():  # one pass (per sequence) fills every linear's Hessian
        for seq in hess_ids.split(1):
            model(input_ids=seq)
    for h in hooks:
        h.remove()
    head = ["linear", *[f"set {s + 1}" for s in range(a.sets)], *(["max/min"] if a.sets else []), f"{nl}x{tl}",
            *[f"{p.name} (e)" for p in probes]]
    if m:
        head.append("measurement.json coeff")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    small_ref = [reference_log_probs(model, s) for s in small]  # the fp model's, once per token set
    large_ref = reference_log_probs(model, large)
    for name in names:
        acc = hessians[name]
        coeffs = [noise_kl(model, s, name, a.noise, acc.H, r) / a.noise for s, r in zip(small, small_ref, strict=True)]
        big = noise_kl(model, large, name, a.noise, acc.H, large_ref) / a.noise
        row = [name, *[f"{c:.3f}" for c in coeffs], *([f"{max(coeffs) / min(coeffs):.2f}"] if a.sets else []),
               f"{big:.3f}"]
        lin = model.get_submodule(name)
        for p in probes:
            W_hat = stored_weight(name, lin, p.scheme, acc.H)
            e = relative_error(lin.weight.detach().float(), W_hat, acc.H)
            row.append(f"{weight_kl(model, large, name, W_hat, large_ref) / e:.3f} ({e:.4f})")
        if m:
            row.append(f"{m['linears'][name]['coeff']:.3f}")
        print("| " + " | ".join(row) + " |", flush=True)
    print(f"\nSeeded Gaussian noise of relative output error {a.noise} in one linear at a time; coefficient = "
          "KL (nats/token) / relative error. measurement.json's coefficients come from its probe's rounding error "
          "on its own 2 x 256 tokens, so they need not equal any column.")


if __name__ == "__main__":
    main()
