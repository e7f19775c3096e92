"""Mixed layer-wise bit allocation (``quantkit allocate``): measure once, solve for any budget, emit a recipe.

Candidates (quantkit.allocate.candidates) are recipe schemes. The measurement (quantkit.allocate.measure) records,
per linear and candidate, the exact stored bits and the relative output error, and per linear a sensitivity
coefficient (HIGGS's linearity theorem, by noise injection) and Layer-Wise Quantization's score. The solver
(quantkit.allocate.solve) picks one candidate per linear (or per layer) under ``budget × weights`` stored bits,
minimizing the predicted increase; each budget becomes an ordinary recipe, ``recipe-<budget>.yaml``, that
``quantkit quantize --recipe`` takes unchanged, with a heat map of its bits per layer (quantkit.allocate.emit).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.allocate.candidates import Candidate, default_candidates, load_candidates, parse_candidates
from quantkit.allocate.emit import bits_plot, description, items, per_linear, predicted, recipe_for
from quantkit.allocate.measure import MEASUREMENT_NAME, SensitivitySettings, measure, plan
from quantkit.allocate.solve import Item, Solution, bits_range, solve
from quantkit.checkpoint import atomic_write_text
from quantkit.config.recipe import save_recipe
from quantkit.errors import QuantkitError

__all__ = ["Allocation", "Candidate", "Item", "SensitivitySettings", "Solution", "allocate", "budget_tag",
           "check_budgets", "default_candidates", "load_candidates", "parse_candidates", "solve", "solve_budgets"]

logger = logging.getLogger(__name__)


@dataclass
class Allocation:
    budget: float
    recipe: Path
    plot: Path | None
    bits: int
    weights: int
    predicted: float
    seconds: float
    choice: dict[str, int]  # linear -> candidate index

    @property
    def bits_per_weight(self) -> float:
        return self.bits / self.weights


def budget_tag(b: float) -> str:
    """``3.0`` -> ``3.0``, ``2.75`` -> ``2.75`` (file names: ``recipe-3.0.yaml``)."""
    return f"{b:.1f}" if round(b, 1) == b else f"{b:g}"


def check_budgets(budgets: list[float], its: list[Item], weights: int) -> None:
    lo, hi = bits_range(its)
    for b in budgets:
        if b * weights < lo:
            raise QuantkitError(f"--budget {b:g} is below the cheapest allocation, {lo / weights:.4f} bits per "
                                "weight (every linear at its cheapest candidate)")
        if b * weights > hi:
            raise QuantkitError(f"--budget {b:g} is above the most expensive allocation, {hi / weights:.4f} bits per "
                                "weight (every linear at its most expensive candidate)")


def solve_budgets(m: dict[str, Any], budgets: list[float], out: str | Path, *, granularity: str = "linear",
                  sensitivity: str = "kl", plot: bool = True) -> list[Allocation]:
    """One recipe (and heat map) per budget from a measurement, into ``out``."""
    out = Path(out)
    its = items(m, granularity=granularity, sensitivity=sensitivity)
    weights = m["weights"]
    check_budgets(budgets, its, weights)
    results = []
    for b in budgets:
        t0 = time.perf_counter()
        sol = solve(its, int(b * weights))
        choice = per_linear(m, sol)
        seconds = time.perf_counter() - t0
        bits = sum(m["linears"][n]["bits"][k] for n, k in choice.items())
        cost = predicted(m, choice, sensitivity)
        tag = budget_tag(b)
        recipe = recipe_for(m, choice, name=f"allocated-{tag}",
                            description=description(b, bits, weights, cost, sensitivity, granularity))
        path = out / f"recipe-{tag}.yaml"
        save_recipe(recipe, path)
        png = None
        if plot:
            png = bits_plot(m, choice, out / f"recipe-{tag}.png",
                            f"{m['model']}: budget {b:g}, {bits / weights:.3f} bits per weight stored")
        results.append(Allocation(b, path, png, bits, weights, cost, seconds, choice))
    return results


def allocate(model: str | None, candidates: list[Candidate], budgets: list[float], out: str | Path, *,
             calib: str = "c4", nsamples: int = 128, seqlen: int = 2048, seed: int = 0, device: str = "cpu",
             data_dir: str | Path | None = None, settings: SensitivitySettings | None = None,
             granularity: str = "linear", sensitivity: str = "kl", progress: bool = True,
             plot: bool = True, reuse: str | Path | None = None) -> tuple[dict[str, Any], list[Allocation]]:
    """Measure (or reuse ``out/measurement.json``), then solve every budget. The budgets are checked against the
    candidates' bits before anything is measured or written. ``reuse``: a kept measurement whose candidate errors
    to take (only the sensitivities are measured)."""
    if not budgets:
        raise QuantkitError("--budget: name at least one budget in bits per weight")
    p = plan(model, candidates, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, device=device,
             data_dir=data_dir, settings=settings or SensitivitySettings())
    shapes_only = {"linears": {n: {**r, "error": [0.0] * len(r["bits"])} for n, r in p.linears.items()}}
    check_budgets(budgets, items(shapes_only, granularity=granularity, sensitivity="none"), p.weights)
    t0 = time.time()
    reused = (Path(out) / MEASUREMENT_NAME).exists()
    m = measure(p, out, progress=progress, reuse=reuse)
    measured = time.time() - t0
    results = solve_budgets(m, budgets, out, granularity=granularity, sensitivity=sensitivity, plot=plot)
    summary = {"measurement": MEASUREMENT_NAME, "measurement_seconds": None if reused else measured,
               "granularity": granularity, "sensitivity": sensitivity,
               "allocations": [{"budget": a.budget, "recipe": a.recipe.name, "plot": a.plot.name if a.plot else None,
                                "bits": a.bits, "weights": a.weights, "bits_per_weight": a.bits_per_weight,
                                "predicted": a.predicted, "solve_seconds": a.seconds} for a in results]}
    atomic_write_text(Path(out) / "allocation.json", json.dumps(summary, indent=2) + "\n")
    return m, results
