"""Solve a bits budget: one candidate per item (a linear, or a whole decoder layer) minimizing the predicted increase
``Σ_l coeff_l · err_l(candidate)`` subject to ``Σ_l bits_l(candidate) ≤ budget × weights`` (a multiple-choice
knapsack), exactly, by dynamic programming over the total bits.

The bits above each item's cheapest candidate are counted in units of ``u`` bits, each candidate's rounded *up*
(``u`` = 1 when the range is at most ``resolution`` units): whatever the program picks fits the budget in exact
bits, and it is the optimum of the rounded problem (of the exact one when ``u`` = 1). Candidates another one of the
same item beats on both bits and error are dropped first; they never change the optimum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from quantkit.errors import QuantkitError

__all__ = ["Item", "Solution", "bits_range", "solve"]


@dataclass(frozen=True)
class Item:
    name: str
    bits: tuple[int | None, ...]  # per candidate; None: not available for this item
    cost: tuple[float | None, ...]  # per candidate: coeff · relative error


@dataclass(frozen=True)
class Solution:
    choice: dict[str, int]  # item -> candidate index
    bits: int
    cost: float
    unit: int  # the bits unit of the program (1: exact)


def _options(item: Item) -> list[tuple[int, float, int]]:
    """(bits, cost, candidate) of the candidates no other one dominates, cheapest first."""
    opts = sorted((b, c, k) for k, (b, c) in enumerate(zip(item.bits, item.cost, strict=True))
                  if b is not None and c is not None)
    if not opts:
        raise QuantkitError(f"{item.name}: no candidate has both bits and an error")
    kept: list[tuple[int, float, int]] = []
    for b, c, k in opts:
        if not kept or c < kept[-1][1]:
            kept.append((b, c, k))
    return kept


def bits_range(items: list[Item]) -> tuple[int, int]:
    """The total bits of the cheapest and of the most expensive allocation."""
    lo = sum(min(b for b in it.bits if b is not None) for it in items)
    hi = sum(max(b for b in it.bits if b is not None) for it in items)
    return lo, hi


def solve(items: list[Item], max_bits: int, *, resolution: int = 200_000) -> Solution:
    """The allocation of least total cost whose total bits are at most ``max_bits``."""
    opts = [_options(it) for it in items]
    base = sum(o[0][0] for o in opts)
    if max_bits < base:
        raise QuantkitError(f"{max_bits} bits are fewer than the cheapest allocation's {base}")
    spare = max_bits - base
    span = sum(o[-1][0] - o[0][0] for o in opts)
    unit = max(1, math.ceil(min(spare, span) / resolution))
    cap = min(spare, span) // unit
    # dp[s]: least cost of the items so far using at most s units above their cheapest candidates.
    dp = np.zeros(cap + 1)
    picks = np.zeros((len(items), cap + 1), dtype=np.int16)
    for i, o in enumerate(opts):
        new = np.full(cap + 1, np.inf)
        pick = np.zeros(cap + 1, dtype=np.int16)
        b0 = o[0][0]
        for j, (b, c, _) in enumerate(o):
            w = -(-(b - b0) // unit)
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = dp[: cap + 1 - w] + c
            better = cand < new
            new[better] = cand[better]
            pick[better] = j
        dp, picks[i] = new, pick
    s = cap
    choice: dict[str, int] = {}
    bits, cost = 0, 0.0
    for i in range(len(items) - 1, -1, -1):
        b, c, k = opts[i][picks[i, s]]
        choice[items[i].name] = k
        bits += b
        cost += c
        s -= -(-(b - opts[i][0][0]) // unit)
    return Solution(dict(reversed(choice.items())), bits, cost, unit)
