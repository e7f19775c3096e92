"""From a measurement to a budget's recipe: the solver's items (per linear or per decoder layer, weighted by a
sensitivity), the ordinary recipe that assigns the chosen schemes (one rule per candidate, its targets a regex per
linear kind over layer indices), and the picture of the bits per layer (layers × linear kinds)."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from quantkit.allocate.solve import Item, Solution
from quantkit.config.recipe import Recipe, SchemeRule
from quantkit.config.scheme import LayerScheme
from quantkit.errors import QuantkitError

__all__ = ["SENSITIVITIES", "allocation_cells", "bits_plot", "folder_cells", "heatmap", "items", "predicted",
           "recipe_for"]

SENSITIVITIES = ("kl", "lwq", "none")


def coefficients(m: dict[str, Any], rec: dict[str, Any], sensitivity: str) -> list[float]:
    """The weight of each candidate's relative error in one linear: its probe's KL coefficient (the measurement's
    ``probe_of``), Layer-Wise Quantization's score, or 1."""
    n = len(rec["error"])
    if sensitivity == "kl":
        if "probes" not in rec or "probe_of" not in m.get("sensitivity", {}):
            raise QuantkitError("the measurement has one KL coefficient per linear (quantkit measurement version 2): "
                                "measure its sensitivities again with --reuse-errors")
        return [rec["probes"][p]["coeff"] for p in m["sensitivity"]["probe_of"]]
    if sensitivity == "lwq":
        return [rec["lwq"]] * n
    return [1.0] * n


def items(m: dict[str, Any], *, granularity: str = "linear", sensitivity: str = "kl") -> list[Item]:
    """One item per linear (``granularity`` linear) or per decoder layer (all its linears take one candidate)."""
    if granularity not in ("linear", "layer"):
        raise QuantkitError(f"--granularity {granularity!r}: expected linear or layer")
    if sensitivity not in SENSITIVITIES:
        raise QuantkitError(f"--sensitivity {sensitivity!r}: expected one of {', '.join(SENSITIVITIES)}")
    per: list[Item] = []
    for name, rec in m["linears"].items():
        per.append(Item(name, tuple(rec["bits"]), tuple(None if e is None else a * e for a, e in zip(
            coefficients(m, rec, sensitivity), rec["error"], strict=True))))
    if granularity == "linear":
        return per
    groups: dict[int, list[Item]] = defaultdict(list)
    for it in per:
        groups[m["linears"][it.name]["layer"]].append(it)
    out = []
    for layer, its in sorted(groups.items()):
        n = len(its[0].bits)
        bits = tuple(None if any(it.bits[k] is None for it in its) else sum(it.bits[k] for it in its)
                     for k in range(n))
        cost = tuple(None if any(it.cost[k] is None for it in its) else sum(it.cost[k] for it in its)
                     for k in range(n))
        out.append(Item(f"layer:{layer}", bits, cost))
    return out


def per_linear(m: dict[str, Any], sol: Solution) -> dict[str, int]:
    """Each linear's candidate index (a layer item's choice applies to all its linears)."""
    out = {}
    for name, rec in m["linears"].items():
        out[name] = sol.choice[name] if name in sol.choice else sol.choice[f"layer:{rec['layer']}"]
    return out


def predicted(m: dict[str, Any], choice: dict[str, int], sensitivity: str = "kl") -> float:
    """``Σ_l coeff_l · err_l`` of an allocation (any: allocated or uniform)."""
    return sum(coefficients(m, m["linears"][n], sensitivity)[k] * m["linears"][n]["error"][k]
               for n, k in choice.items())


def _targets(names: list[str], m: dict[str, Any]) -> list[str]:
    by_kind: dict[tuple[str, str], list[int]] = defaultdict(list)
    for n in names:
        rec = m["linears"][n]
        layers_name = n[: -len(rec["kind"]) - 1].rsplit(".", 1)[0]
        by_kind[(layers_name, rec["kind"])].append(rec["layer"])
    return [f"re:{re.escape(ln)}\\.({'|'.join(map(str, sorted(ix)))})\\.{re.escape(kind)}"
            for (ln, kind), ix in sorted(by_kind.items(), key=lambda kv: kv[0][1])]


def recipe_for(m: dict[str, Any], choice: dict[str, int], *, name: str, description: str) -> Recipe:
    """The ordinary recipe that gives each linear its chosen candidate's scheme (checked by resolving it)."""
    cands = m["candidates"]
    by_cand: dict[int, list[str]] = defaultdict(list)
    for n, k in choice.items():
        by_cand[k].append(n)
    rules = tuple(SchemeRule(tuple(_targets(by_cand[k], m)), LayerScheme.from_dict(cands[k]["scheme"]))
                  for k in sorted(by_cand))
    recipe = Recipe(name, rules, (), description)
    resolved = recipe.resolve(list(m["linears"]))
    want = {n: LayerScheme.from_dict(cands[k]["scheme"]) for n, k in choice.items()}
    if resolved != want:  # the targets are generated; a mismatch would be a bug here
        raise QuantkitError(f"recipe {name!r}: its targets do not select the allocation")
    return Recipe.from_dict(recipe.to_dict(), source=name)


def description(budget: float, bits: int, weights: int, cost: float, sensitivity: str, granularity: str) -> str:
    what = {"kl": f"predicted KL increase {cost:.4g} nats/token (linearity theorem), perplexity x{math.exp(cost):.4f}",
            "lwq": f"predicted objective {cost:.4g} (relative errors weighted by the LWQ score)",
            "none": f"predicted objective {cost:.4g} (sum of relative output errors)"}[sensitivity]
    return (f"quantkit allocate: budget {budget:g} bits per weight, {bits / weights:.4f} stored ({bits} bits over "
            f"{weights} weights), one candidate per {granularity}; {what}")


Cells = dict[str, tuple[int, str, float]]  # linear -> (decoder layer, kind, stored bits per weight)

_NAME = re.compile(r"^(.*)\.(\d+)\.([^.].*)$")


def allocation_cells(m: dict[str, Any], choice: dict[str, int]) -> Cells:
    out = {}
    for n, k in choice.items():
        r = m["linears"][n]
        out[n] = (r["layer"], r["kind"], r["bits"][k] / (r["shape"][0] * r["shape"][1]))
    return out


def folder_cells(folder: str | Path) -> Cells:
    """The stored bits per weight of each quantized linear of a ``quantkit quantize`` folder (its report's recipe
    and shapes, counted by the formats; biases left out)."""
    from quantkit.checkpoint import REPORT_NAME
    from quantkit.formats import get_format

    path = Path(folder) / REPORT_NAME
    try:
        rep = json.loads(path.read_text())
        recipe = Recipe.from_dict(rep["recipe"], source=str(path))
        shapes = {n: s["shape"] for n, s in rep["layers"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QuantkitError(f"{path}: not a quantkit quantize report ({type(e).__name__})") from None
    out = {}
    for n, scheme in recipe.resolve(list(shapes)).items():
        match = _NAME.match(n)
        if match is None:
            continue
        o, i = shapes[n]
        out[n] = (int(match.group(2)), match.group(3), get_format(scheme.format).stored_bits(scheme, i, o) / (o * i))
    return out


def bits_plot(m: dict[str, Any], choice: dict[str, int], out: str | Path, title: str) -> Path:
    """Heat map of the stored bits per weight of each linear of an allocation: decoder layers × linear kinds."""
    return heatmap([(title, allocation_cells(m, choice))], out)


def heatmap(panels: list[tuple[str, Cells]], out: str | Path) -> Path:
    """One heat map per panel (decoder layers × linear kinds, stored bits per weight), side by side, as PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise QuantkitError("the plot needs matplotlib: pip install matplotlib") from e
    import numpy as np

    if not panels or not any(cells for _, cells in panels):
        raise QuantkitError("no quantized linear to plot")
    kinds = list(dict.fromkeys(kind for _, cells in panels for _, kind, _ in cells.values()))
    nlayers = 1 + max(layer for _, cells in panels for layer, _, _ in cells.values())
    vals = [v for _, cells in panels for _, _, v in cells.values()]
    lo, hi = min(vals), max(max(vals), min(vals) + 1)
    fig, axes = plt.subplots(1, len(panels), figsize=((1.0 * len(kinds) + 1.2) * len(panels) + 1.5,
                                                      0.26 * nlayers + 1.9), squeeze=False)
    for ax, (title, cells) in zip(axes[0], panels, strict=True):
        grid = np.full((nlayers, len(kinds)), np.nan)
        for layer, kind, v in cells.values():
            grid[layer, kinds.index(kind)] = v
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=lo, vmax=hi)
        for i in range(nlayers):
            for j in range(len(kinds)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if grid[i, j] < (lo + hi) / 2 else "black")
        ax.set_xticks(range(len(kinds)), [k.split(".")[-1] for k in kinds], rotation=30, ha="right")
        ax.set_yticks(range(nlayers), [str(i) for i in range(nlayers)], fontsize=7)
        ax.set_ylabel("decoder layer")
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), label="stored bits per weight")
    out = Path(out)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
