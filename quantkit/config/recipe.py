"""Recipes: YAML data that assigns a quantization scheme to each linear of the decoder layers.

.. code-block:: yaml

    name: gptq-w4g128
    description: GPTQ, 4-bit asymmetric, groups of 128, act-order
    version: 1
    ignore: []                 # module names or "re:<regex>"; lm_head and embeddings are never quantized here
    schemes:                   # the first scheme whose targets match a linear wins
      - targets: ["re:.*"]     # exact name, a suffix after a dot ("q_proj"), or "re:<regex>" (full match)
        method: gptq           # the flat shorthand; LayerScheme's canonical parts are accepted as well
        bits: 4
        group_size: 128
        act_order: true
    kv_cache: null             # or a KV-cache scheme (quantkit.kvcache.scheme), fitted in the same pass:
                               #   {method: cq, bits: 2, channels: 4, residual: 64, sink: 0}

A recipe may quantize the KV cache only: ``schemes: []`` (or every linear ignored) with a ``kv_cache`` section.

A recipe round-trips through ``to_dict``/``from_dict`` and YAML (``to_yaml``, ``save_recipe``), so tools that
choose schemes (bit allocation) write ordinary recipes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from quantkit.config.scheme import LayerScheme
from quantkit.errors import QuantkitError, RecipeError
from quantkit.registry import KV_METHODS

__all__ = ["RECIPE_VERSION", "Recipe", "SchemeRule", "load_recipe", "list_presets", "matches", "save_recipe"]

RECIPE_VERSION = 1
_TOP_FIELDS = ("name", "description", "version", "ignore", "schemes", "kv_cache")


def matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


@dataclass(frozen=True)
class SchemeRule:
    targets: tuple[str, ...]
    scheme: LayerScheme

    def to_dict(self) -> dict[str, Any]:
        return {"targets": list(self.targets), **self.scheme.to_dict()}


@dataclass(frozen=True)
class Recipe:
    name: str
    schemes: tuple[SchemeRule, ...]
    ignore: tuple[str, ...] = ()
    description: str = ""
    source: str = field(default="", compare=False)
    kv_cache: Any = None  # a quantkit.kvcache.KVScheme (kivi or cq), or None: the cache stays full precision

    @property
    def needs_calibration(self) -> bool:
        cq = getattr(self.kv_cache, "method", None) == "cq"  # CQ fits tables; KIVI needs no data
        return cq or any(r.scheme.method.needs_hessian for r in self.schemes)

    def resolve(self, linear_names: list[str]) -> dict[str, LayerScheme]:
        """Scheme of each linear that the recipe quantizes; linears it does not match stay full precision."""
        used = [False] * len(self.schemes)
        out: dict[str, LayerScheme] = {}
        for name in linear_names:
            if any(matches(name, p) for p in self.ignore):
                continue
            for i, rule in enumerate(self.schemes):
                if any(matches(name, p) for p in rule.targets):
                    out[name] = rule.scheme
                    used[i] = True
                    break
        for i, u in enumerate(used):
            if not u:
                raise RecipeError(
                    f"recipe {self.name!r}: schemes[{i}].targets {list(self.schemes[i].targets)} match no linear "
                    f"layer of this model (e.g. {linear_names[0] if linear_names else 'none'!r})"
                )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "version": RECIPE_VERSION,
            "ignore": list(self.ignore),
            "schemes": [r.to_dict() for r in self.schemes],
            "kv_cache": self.kv_cache.to_dict() if self.kv_cache is not None else None,
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, width=120)

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "") -> Recipe:
        where = f"recipe {source!r}" if source else "recipe"
        if not isinstance(d, dict):
            raise RecipeError(f"{where}: expected a mapping at the top level")
        unknown = sorted(set(d) - set(_TOP_FIELDS))
        if unknown:
            raise RecipeError(f"{where}: unknown field '{unknown[0]}'; known fields: {', '.join(_TOP_FIELDS)}")
        version = d.get("version", RECIPE_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= RECIPE_VERSION:
            raise RecipeError(f"{where}: field 'version': this quantkit reads recipe version {RECIPE_VERSION} "
                              f"(got {version!r})")
        kv = _kv_section(d.get("kv_cache"), where)
        rules = d.get("schemes")
        if rules is None and kv is not None:
            rules = []
        if not isinstance(rules, list) or not (rules or kv is not None):
            raise RecipeError(f"{where}: field 'schemes' must be a non-empty list (or empty, with a 'kv_cache' "
                              "section)")
        ignore = d.get("ignore") or []
        if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
            raise RecipeError(f"{where}: field 'ignore' must be a list of names or 're:' patterns")
        parsed = []
        for i, r in enumerate(rules):
            if not isinstance(r, dict):
                raise RecipeError(f"{where}: schemes[{i}] must be a mapping")
            r = dict(r)
            targets = r.pop("targets", ["re:.*"])
            if isinstance(targets, str):
                targets = [targets]
            if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
                raise RecipeError(f"{where}: schemes[{i}].targets must be a list of strings")
            for t in targets:
                _check_target(t, f"{where}: schemes[{i}].targets")
            try:
                scheme = LayerScheme.from_dict(r)
            except RecipeError as e:
                raise RecipeError(f"{where}: schemes[{i}]: {e}") from None
            parsed.append(SchemeRule(tuple(targets), scheme))
        for p in ignore:
            _check_target(p, f"{where}: ignore", allow_outside=True)
        name = d.get("name") or (Path(source).stem if source else "recipe")
        return cls(str(name), tuple(parsed), tuple(ignore), str(d.get("description", "")), source, kv)


def _kv_section(d: Any, where: str) -> Any:
    """The ``kv_cache`` section as a scheme (quantkit.kvcache.scheme, registered in ``KV_METHODS``); only methods
    the quantize pass can store with a model (kivi, cq)."""
    if d is None:
        return None
    if not isinstance(d, dict):
        raise RecipeError(f"{where}: field 'kv_cache' must be a mapping (method, bits, ...) or null")
    method = d.get("method")
    if method is None:
        raise RecipeError(f"{where}: field 'kv_cache.method': is required")
    if method not in KV_METHODS:
        raise RecipeError(f"{where}: field 'kv_cache.method': unknown KV-cache method; known: "
                          f"{', '.join(KV_METHODS.names())} (got {method!r})")
    if method not in ("kivi", "cq"):
        raise RecipeError(f"{where}: field 'kv_cache.method': {method!r} is not stored with a model; a "
                          "recipe takes 'kivi' or 'cq'")
    try:
        return KV_METHODS.get(method).from_dict(d)
    except (RecipeError, QuantkitError) as e:
        raise RecipeError(f"{where}: {e}") from None


def _check_target(pattern: str, where: str, *, allow_outside: bool = False) -> None:
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise RecipeError(f"{where}: bad regex {pattern!r}: {e}") from None
    elif not allow_outside and pattern.split(".")[-1] in ("lm_head", "embed_tokens", "wte", "embed_in"):
        raise NotImplementedError(
            f"{where}: quantizing {pattern!r} is not supported yet; quantkit quantizes the decoder layers' linears"
        )


def list_presets() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("quantkit.recipes").iterdir()
                  if p.name.endswith(".yaml"))


def load_recipe(spec: str | Path) -> Recipe:
    """A preset name (``gptq-w4g128``) or a path to a YAML file."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if spec.endswith((".yaml", ".yml")) or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {spec}" if not path.exists()
                              else f"recipe is not a file: {spec}")
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as e:
            raise RecipeError(f"recipe {spec!r} is not UTF-8 text (byte {e.start}); is it a YAML file?") from None
    else:
        preset = resources.files("quantkit.recipes") / f"{spec}.yaml"
        if not preset.is_file():
            raise RecipeError(f"unknown recipe {spec!r}: not a file, and presets are: {', '.join(list_presets())}")
        text, source = preset.read_text(), spec
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {source!r} is not valid YAML: {e}") from None
    return Recipe.from_dict(data, source=source)


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write ``recipe`` as YAML (atomically) so that ``load_recipe(path)`` gives it back."""
    from quantkit.checkpoint import atomic_write_text

    atomic_write_text(Path(path), recipe.to_yaml())
