"""How much a linear's KL sensitivity coefficient moves with the tokens it is measured on (issue 18).

`quantkit allocate` estimates each linear's coefficient as KL / relative error on a few calibration windows
(2 x 256 tokens by default). This script injects the same seeded Gaussian noise (relative output error ``--noise``)
into one linear at a time and measures the KL divergence from the unquantized model on several disjoint 2 x 256
token sets and on one larger set, so the spread across the small sets shows the sampling noise the solver sees.

    QUANTKIT_DATA_DIR=../shared/data python benchmarks/sensitivity_noise.py \
        [--model smollm2-135m] [--linears model.layers.12.self_attn.k_proj,...] [--measurement measurement.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from quantkit.algos.hessian import HessianAccumulator
from quantkit.allocate.measure import noise_kl
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
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(a.model, dtype=torch.float32)
    model.eval()
    nl, tl = (int(v) for v in a.large.split("x"))
    n = max(2 * a.sets, nl) + 4
    ids = calibration_ids(tok, load_calibration_texts("c4"), nsamples=n, seqlen=max(256, tl), seed=0)
    hess_ids = ids[-4:]  # the Hessian that scales the noise: 4 sequences apart from every KL set
    small = [ids[2 * s: 2 * s + 2, :256] for s in range(a.sets)]
    large = ids[:nl, :tl]
    m = json.loads(Path(a.measurement).read_text()) if a.measurement else None
    names = a.linears.split(",")
    hessians = {name: HessianAccumulator(model.get_submodule(name).in_features) for name in names}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda mod, i, o, acc=hessians[name]: acc.add(i[0].detach().reshape(-1, i[0].shape[-1]))) for name in names]
    with torch.no_grad():  # one pass fills every linear's Hessian
        model(input_ids=hess_ids)
    for h in hooks:
        h.remove()
    head = ["linear", *[f"set {s + 1}" for s in range(a.sets)], "max/min", f"{nl}x{tl}"]
    if m:
        head.append("measurement.json coeff")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name in names:
        acc = hessians[name]
        coeffs = [noise_kl(model, s, name, a.noise, acc.H) / a.noise for s in small]
        big = noise_kl(model, large, name, a.noise, acc.H) / a.noise
        row = [name, *[f"{c:.3f}" for c in coeffs], f"{max(coeffs) / min(coeffs):.2f}", f"{big:.3f}"]
        if m:
            row.append(f"{m['linears'][name]['coeff']:.3f}")
        print("| " + " | ".join(row) + " |", flush=True)
    print(f"\nSeeded Gaussian noise of relative output error {a.noise} in one linear at a time; coefficient = "
          "KL (nats/token) / relative error. measurement.json's coefficients come from its probe's rounding error "
          "on its own 2 x 256 tokens, so they need not equal any column.")


if __name__ == "__main__":
    main()
