"""Which linears gain from a Hadamard rotation at W4 g128, data-free? Fake-quantizes SmolLM2 in memory, one choice
per kind of linear, and scores the held-out C4 text of ``c4_select.py`` (never the WikiText-2 test set).

Modes per kind (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``; a kind not
named gets ``nf4``):
- ``nf4``: round to nearest on NF4, scale fitted per group of 128 (quantkit's ``nf4`` grid, as ``rtn-nf4g128``);
- ``nf4-absmax``: NF4 with QLoRA's scale, the group's largest magnitude (no fit);
- ``rot``: randomized Hadamard rotation of the input dimension, then the Gaussian grid (as ``hadamard-gaussian``);
- ``splitK``: the K input channels of smallest column norm stay unrotated (NF4, one group of K); the others are
  rotated as ``rot`` (needs a Hadamard of the remaining order, e.g. 576 − 64 = 512).

The weights written back are what the packed checkpoint decodes to (same rounding code, fp16 scales), so a
configuration that a recipe can express scores what its checkpoint scores.

    QUANTKIT_DATA_DIR=../shared/data python benchmarks/rotation_ablation.py 'q_proj=rot,k_proj=rot,o_proj=rot' ''
"""

from __future__ import annotations

import argparse
import os

import torch
from c4_select import heldout_c4_text  # beside this script

from quantkit.algos.rtn import rtn
from quantkit.eval.perplexity import perplexity
from quantkit.grids import make_grid
from quantkit.grids.uniform import GridParams
from quantkit.loading import load_model
from quantkit.quantizers.scalar import ScalarQuantizer
from quantkit.rotations import HadamardRotation, random_signs

NF4 = make_grid("nf4", 4, True, False)
GAUSS = make_grid("gaussian", 4, True, False)


def q_nf4(W: torch.Tensor, g: int = 128) -> torch.Tensor:
    return rtn(W, ScalarQuantizer(NF4, g)).W_hat


def q_nf4_absmax(W: torch.Tensor, g: int = 128) -> torch.Tensor:
    out = []
    for c in range(0, W.shape[1], g):
        w = W[:, c : c + g]
        s = w.abs().amax(1).half().float().clamp(min=1e-8)
        out.append(NF4.quantize(w, GridParams(scale=s, zero=torch.zeros_like(s)))[0])
    return torch.cat(out, 1)


def q_rot(W: torch.Tensor, name: str) -> torch.Tensor:
    r = HadamardRotation(random_signs(W.shape[1], 0, name))
    return r.unfuse(rtn(r.fuse(W), ScalarQuantizer(GAUSS, 128)).W_hat)


def q_split(W: torch.Tensor, name: str, k: int) -> torch.Tensor:
    order = W.norm(dim=0).argsort()  # ascending column norms
    kept, rest = order[:k].sort().values, order[k:].sort().values
    W_hat = torch.empty_like(W)
    W_hat[:, rest] = q_rot(W[:, rest], name)
    W_hat[:, kept] = q_nf4(W[:, kept], g=k)
    return W_hat


def run(cfg: dict[str, str], ids_text: str, windows: int) -> float:
    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not isinstance(mod, torch.nn.Linear) or name == "lm_head":
                continue
            mode = cfg.get(name.rsplit(".", 1)[1], "nf4")
            W = mod.weight.float()
            if mode == "nf4":
                W_hat = q_nf4(W)
            elif mode == "nf4-absmax":
                W_hat = q_nf4_absmax(W)
            elif mode == "rot":
                W_hat = q_rot(W, name)
            elif mode.startswith("split"):
                W_hat = q_split(W, name, int(mode[5:]))
            else:
                raise SystemExit(f"unknown mode {mode!r}")
            mod.weight.copy_(W_hat)
    ids = tok(ids_text, return_tensors="pt").input_ids
    return perplexity(model, ids, seqlen=2048, windows=windows, progress=False).ppl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+", help="comma-separated kind=mode; '' is NF4 everywhere")
    p.add_argument("--windows", type=int, default=8)
    args = p.parse_args()
    text, which = heldout_c4_text(os.environ["QUANTKIT_DATA_DIR"])
    print(f"| configuration | C4 ppl, first {args.windows} x 2048 of {which} |\n|---|---|")
    for spec in args.configs:
        cfg = dict(item.split("=") for item in spec.split(",") if item)
        print(f"| {spec or 'nf4 everywhere'} | {run(cfg, text, args.windows):.3f} |", flush=True)


if __name__ == "__main__":
    main()
