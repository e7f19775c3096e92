"""Issue 18, item 2: the linear model's prediction against measured perplexity, for any quantized folders.

For each configuration (a quantized folder, or a recipe: a preset name or YAML file, resolved over the measured
linears, when its folder is gone), every linear's scheme is looked up among the measurement's candidates; the
prediction is Σ coeff_l · err_l of those candidates (what the solver minimizes, nats per token), and the measurement
is log(ppl / ppl_fp) = nll − nll_fp from ``quantkit eval`` results files of the same protocol. Prints a Markdown
table (bits per weight, perplexity, measured, predicted, their ratio) and Pearson's r.

    python benchmarks/allocation_check.py MEASUREMENT.json FP_EVAL.json CONFIG=EVAL.json [CONFIG=EVAL.json ...]

A configuration with a linear whose scheme is not a candidate is an error naming the linear: its error was not
measured. A recipe's bits per weight are the measurement's count of its candidates' stored bits (a folder's report
gives the same figure; tests/test_allocate.py checks that for an allocated recipe).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from quantkit.allocate.emit import predicted
from quantkit.checkpoint import REPORT_NAME
from quantkit.config import LayerScheme, Recipe
from quantkit.config.recipe import load_recipe
from quantkit.errors import QuantkitError
from quantkit.eval.report import results_name


def _nll(path: str) -> tuple[float, float, str]:
    r = json.loads(Path(path).read_text())
    p = r["perplexity"]["wikitext2"]
    return p["nll"], p["ppl"], p.get("protocol", f"{p['windows']} windows")


class Unmeasured(ValueError):
    """A configuration the measurement cannot predict (not a folder or recipe, or a scheme not measured)."""


def choice_of(config: str, m: dict) -> tuple[dict[str, int], float, str]:
    """Each measured linear's candidate index in ``config``'s recipe, its bits per weight, and the recipe's name."""
    report = Path(config) / REPORT_NAME
    if report.is_file():
        rep = json.loads(report.read_text())
        recipe, names, bpw = Recipe.from_dict(rep["recipe"], source=str(report)), list(rep["layers"]), \
            rep["bits_per_weight"]
    else:
        try:
            recipe, names, bpw = load_recipe(config), list(m["linears"]), None
        except QuantkitError as e:
            raise Unmeasured(f"{config}: neither a quantized folder nor a recipe ({e})") from None
    schemes = [LayerScheme.from_dict(c["scheme"]) for c in m["candidates"]]
    resolved = recipe.resolve(names)
    choice = {}
    for name in m["linears"]:
        if name not in resolved:
            raise Unmeasured(f"{config}: linear {name} is not quantized there")
        s = resolved[name]
        if s not in schemes:
            raise Unmeasured(f"{config}: {name}'s scheme is none of the measurement's candidates")
        choice[name] = schemes.index(s)
    if bpw is None:
        bpw = sum(m["linears"][n]["bits"][k] for n, k in choice.items()) / m["weights"]
    return choice, bpw, recipe.name


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("measurement")
    ap.add_argument("fp_eval", help="quantkit eval results of the unquantized model (same protocol)")
    ap.add_argument("runs", nargs="+", metavar="CONFIG=EVAL.json", help="CONFIG: a quantized folder or a recipe")
    ap.add_argument("--skip-unmeasured", action="store_true",
                    help="leave out (with a note) configurations using a scheme that is not a candidate")
    a = ap.parse_args(argv)
    m = json.loads(Path(a.measurement).read_text())
    nll_fp, ppl_fp, protocol = _nll(a.fp_eval)
    rows = []
    for run in a.runs:
        config, _, ev = run.partition("=")
        try:
            choice, bpw, name = choice_of(config, m)
        except Unmeasured as e:
            if not a.skip_unmeasured:
                raise SystemExit(str(e)) from None
            print(f"left out: {e}")
            continue
        nll, ppl, proto = _nll(ev)
        if proto != protocol:
            raise SystemExit(f"{ev}: protocol {proto!r}, but the fp32 run's is {protocol!r}")
        rows.append((bpw, name, ppl, nll - nll_fp, predicted(m, choice), results_name(ev)))
    names = [r[1] for r in rows]  # two rows of one recipe name (two measurements' recipes): tell them by their file
    rows = sorted((bpw, f"`{name}`" + (f" ({stem})" if names.count(name) > 1 else ""), *rest)
                  for bpw, name, *rest, stem in rows)
    print(f"fp: ppl {ppl_fp:.3f} ({protocol}); measurement {a.measurement}\n")
    print("| configuration | bits per weight | perplexity | measured log(ppl/fp) | predicted | measured / predicted |")
    print("|---|---|---|---|---|---|")
    for bpw, name, ppl, meas, pred in rows:
        print(f"| {name} | {bpw:.4f} | {ppl:.3f} | {meas:.4f} | {pred:.4f} | {meas / pred:.2f} |")
    if len(rows) > 2:
        print(f"\nPearson r (measured, predicted) over {len(rows)} configurations: "
              f"{statistics.correlation([r[3] for r in rows], [r[4] for r in rows]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
