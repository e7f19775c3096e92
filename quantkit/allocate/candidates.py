"""Candidates of the bit allocation: the schemes a linear may get, each one a recipe scheme (quantkit.config).

A candidates file is YAML, a list (or ``{candidates: [...]}``) whose entries are

- a preset recipe's name (``gptq-w3g128``): that preset's one scheme,
- ``fp16``: the weight kept in float16 (quantizer ``fp16``, format ``quantkit-dense``), or
- a mapping: a scheme as a recipe writes one (flat shorthand or canonical parts), with an optional ``name``.

.. code-block:: yaml

    candidates:
      - rtn-w4g128
      - {name: hgptq-w3g64, method: gptq, bits: 3, group_size: 64, act_order: true, rotation: hadamard}
      - fp16
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from quantkit.config.recipe import list_presets, load_recipe
from quantkit.config.scheme import LayerScheme
from quantkit.errors import RecipeError

__all__ = ["Candidate", "DEFAULT", "default_candidates", "load_candidates", "parse_candidates"]


@dataclass(frozen=True)
class Candidate:
    name: str
    scheme: LayerScheme

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "scheme": self.scheme.to_dict()}


def _gptq(bits: int, group: int, rotate: bool = False) -> dict[str, Any]:
    name = f"{'hadamard-' if rotate else ''}gptq-w{bits}" + (f"g{group}" if group > 0 else "")
    d = {"name": name, "method": "gptq", "bits": bits, "group_size": group, "act_order": True}
    return {**d, "rotation": "hadamard"} if rotate else d


def _rtn(bits: int, group: int) -> dict[str, Any]:
    return {"name": f"rtn-w{bits}" + (f"g{group}" if group > 0 else ""), "method": "rtn", "bits": bits,
            "group_size": group}


def _vq_pairs(entries: int) -> dict[str, Any]:
    """The hadamard-gptq-vq3 preset's scheme with another codebook size: log2(entries) / dim bits per weight for
    the codes."""
    scheme = load_recipe("hadamard-gptq-vq3").schemes[0].scheme.to_dict()
    q = {**scheme["quantizer"], "entries": entries}
    return {**scheme, "name": f"hadamard-gptq-vq{math.log2(entries) / q['dim']:g}", "quantizer": q}


# The built-in set. GPTQ (act-order) at 2 bits (groups of 64, 128), 3 and 4 bits (groups of 64, 128, 256 and one
# scale per row) and 8 bits per row; the same after a Hadamard rotation at 2, 3 and 4 bits; round to nearest at 4
# (groups of 128) and 8 bits; fp16 (chosen only where a budget allows). The coarse groups and per-row scales are
# 3- and 4-bit grids at nearly 3.0 and 4.0 stored bits, so a budget there need not pay for 2-bit layers (whose
# error the linear model underestimates most); round to nearest at 2 and 3 bits is never better than GPTQ at the
# same bits and is left out. The codebook presets at 2 and 3 bits (quantkit.codebooks, rotated, act-order): on
# SmolLM2 vq3 at 3.06 bpw scores below rotated scalar W3 g128 at 3.30 and vq2 is the one 2-bit scheme that does not
# collapse (BENCHMARKS.md); vq3's pairs with 32, 128 and 256 entries (2.5, 3.5 and 4 bits for the codes) fill the
# steps between: on SmolLM2's first layer the 128-entry pairs leave about the relative error of the 4-bit scalar
# grids in the attention linears, the 256-entry ones half of it. Each adds a k-means fit per linear to the
# measurement.
DEFAULT: list[Any] = [
    _rtn(4, 128), _rtn(8, -1),
    *(_gptq(2, g) for g in (64, 128)), *(_gptq(b, g) for b in (3, 4) for g in (64, 128, 256, -1)), _gptq(8, -1),
    *(_gptq(2, g, True) for g in (64, 128)), *(_gptq(b, g, True) for b in (3, 4) for g in (64, 128, 256, -1)),
    "hadamard-gptq-vq2", "hadamard-gptq-vq3", *(_vq_pairs(k) for k in (32, 128, 256)),
    "fp16",
]


def parse_candidates(entries: Any, where: str = "candidates") -> list[Candidate]:
    """Candidates from the parsed YAML (see the module docstring); errors name the entry."""
    if isinstance(entries, dict) and set(entries) == {"candidates"}:
        entries = entries["candidates"]
    if not isinstance(entries, list) or not entries:
        raise RecipeError(f"{where}: expected a non-empty list of candidates (or a mapping with key 'candidates')")
    out: list[Candidate] = []
    for i, e in enumerate(entries):
        here = f"{where}: candidates[{i}]"
        if e == "fp16":
            out.append(Candidate("fp16", LayerScheme.from_dict({"method": "rtn", "grid": "fp16"})))
        elif isinstance(e, str):
            if e not in list_presets():
                raise RecipeError(f"{here}: {e!r} is neither fp16 nor a preset recipe; presets: "
                                  f"{', '.join(list_presets())}")
            rules = load_recipe(e).schemes
            if len(rules) != 1:
                raise RecipeError(f"{here}: preset {e!r} holds {len(rules)} schemes; a candidate is one")
            out.append(Candidate(e, rules[0].scheme))
        elif isinstance(e, dict):
            d = dict(e)
            name = d.pop("name", None)
            try:
                scheme = LayerScheme.from_dict(d)
            except RecipeError as err:
                raise RecipeError(f"{here}: {err}") from None
            out.append(Candidate(str(name) if name else _describe(scheme), scheme))
        else:
            raise RecipeError(f"{here}: expected a preset name, fp16 or a scheme mapping, got {e!r}")
    names = [c.name for c in out]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise RecipeError(f"{where}: candidates[{i}]: name {n!r} is used twice")
    schemes = [c.scheme for c in out]
    for i, s in enumerate(schemes):
        if s in schemes[:i]:
            raise RecipeError(f"{where}: candidates[{i}] ({names[i]!r}) is the same scheme as "
                              f"{names[schemes.index(s)]!r}")
    return out


def _describe(s: LayerScheme) -> str:
    q = s.quantizer.to_dict()
    parts = [("hadamard-" if s.rotation.active else "") + s.method.name, q["name"]]
    if "bits" in q:
        parts.append(f"w{q['bits']}" + (f"g{q['group_size']}" if q.get("group_size", -1) > 0 else ""))
    return "-".join(parts)


def default_candidates() -> list[Candidate]:
    return parse_candidates(DEFAULT, "built-in candidates")


def load_candidates(spec: str | Path | None) -> list[Candidate]:
    """``None`` or ``default``: the built-in set; otherwise a YAML file."""
    if spec is None or str(spec) == "default":
        return default_candidates()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise RecipeError(f"candidates file not found: {spec}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RecipeError(f"candidates {str(spec)!r} is not valid YAML: {' '.join(str(e).split())}") from None
    return parse_candidates(data, f"candidates {str(spec)!r}")
