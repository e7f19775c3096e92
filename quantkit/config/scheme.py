"""The scheme of one quantized linear: a rotation, a rounding method, a quantizer and a storage format, each a
typed and validated part, versioned as a whole.

Canonical form (what checkpoints store and ``to_dict`` writes)::

    {"version": 1,
     "rotation": {"kind": "hadamard", "output": false, "seed": 0},
     "method": {"name": "gptq", "act_order": true, "static_groups": false, "damp": 0.01, "block_size": 128,
                "attention_weighted": true},
     "quantizer": {"name": "uniform", "bits": 4, "group_size": 128, "symmetric": false, "mse_clip": false},
     "format": "quantkit-uniform"}

Recipes may also use the flat shorthand of format versions 1–2 (``method: gptq``, ``bits: 4``, ``grid: nf4``,
``rotation: hadamard``, ``rotate_output``, ``rotation_seed``, ...), which :meth:`LayerScheme.from_dict` maps onto
the parts; errors then name the field as written. Method, quantizer and format names resolve in the registries
of ``quantkit.registry``; a quantizer's own fields are its registered spec class's.
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any

from quantkit.config.spec import FieldError, Spec, check_keys
from quantkit.errors import RecipeError
from quantkit.registry import FORMATS, METHODS, QUANTIZERS

__all__ = ["SCHEME_VERSION", "LayerScheme", "MethodSpec", "RotationKind", "RotationSpec"]

SCHEME_VERSION = 1


class RotationKind(str, Enum):
    NONE = "none"
    HADAMARD = "hadamard"


@dataclasses.dataclass(frozen=True)
class RotationSpec(Spec):
    """A randomized Hadamard rotation of the input dimension (quantkit.rotations), optionally of the output too."""

    part = "rotation"
    kind: RotationKind = RotationKind.NONE
    output: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", RotationKind(self.kind))
        except ValueError:
            raise self.bad("kind", f"unknown rotation; known: {', '.join(k.value for k in RotationKind)}") from None
        super().__post_init__()

    def validate(self) -> None:
        if self.output and self.kind == RotationKind.NONE:
            raise self.bad("output", "needs a rotation")
        if self.seed < 0:
            raise self.bad("seed", "must be a non-negative integer")

    @property
    def active(self) -> bool:
        return self.kind != RotationKind.NONE


@dataclasses.dataclass(frozen=True)
class MethodSpec(Spec):
    """The rounding method (``rtn``, ``gptq``, ...) and the options of the second-order loop."""

    part = "method"
    name: str
    act_order: bool = False  # quantize columns by decreasing Hessian diagonal
    static_groups: bool = False  # fit group parameters before the OBS updates, in original column order
    damp: float = 0.01  # relative to the mean Hessian diagonal
    block_size: int = 128  # columns per lazy-update block
    # Value projections: weight each calibration token by the attention it receives (quantkit/algos/attention.py)
    attention_weighted: bool = True

    def validate(self) -> None:
        if self.name not in METHODS:
            raise self.bad("name", f"unknown method; known: {', '.join(METHODS.names())}")
        if not 0 < self.damp < 1:
            raise self.bad("damp", "must be a number in (0, 1), relative to the Hessian's mean diagonal")
        if self.block_size < 1:
            raise self.bad("block_size", "must be a positive integer")
        if not self.needs_hessian:
            for f in ("act_order", "static_groups"):
                if getattr(self, f):
                    raise self.bad(f, f"applies to methods that use a Hessian, not {self.name!r}")

    @property
    def needs_hessian(self) -> bool:
        return METHODS.get(self.name).needs_hessian


# The flat shorthand: field -> (part, field in the part). Quantizer fields not listed here pass through by name.
_FLAT = {
    "method": ("method", "name"), "act_order": ("method", "act_order"), "static_groups": ("method", "static_groups"),
    "damp": ("method", "damp"), "block_size": ("method", "block_size"),
    "attention_weighted": ("method", "attention_weighted"),
    "grid": ("quantizer", "name"),
    "rotation": ("rotation", "kind"), "rotate_output": ("rotation", "output"), "rotation_seed": ("rotation", "seed"),
}
_PARTS = ("version", "rotation", "method", "quantizer", "format")


@dataclasses.dataclass(frozen=True)
class LayerScheme:
    """How one linear is quantized: rotate (``rotation``), round (``method`` with ``quantizer``), store
    (``format``, by default the quantizer's)."""

    method: MethodSpec
    quantizer: Spec  # a registered quantizer spec (quantkit.quantizers), e.g. ScalarSpec
    rotation: RotationSpec = RotationSpec()
    format: str = ""

    def __post_init__(self) -> None:
        if not self.format:
            object.__setattr__(self, "format", type(self.quantizer).default_format)
        if self.format not in FORMATS:
            raise FieldError("format", f"unknown format; known: {', '.join(FORMATS.names())}", self.format)
        FORMATS.get(self.format).check_scheme(self)

    def to_dict(self) -> dict[str, Any]:
        return {"version": SCHEME_VERSION, "rotation": self.rotation.to_dict(), "method": self.method.to_dict(),
                "quantizer": self.quantizer.to_dict(), "format": self.format}

    @classmethod
    def from_dict(cls, d: Any) -> LayerScheme:
        """The canonical form, or the flat shorthand (any dict without a ``quantizer`` mapping)."""
        if isinstance(d, dict) and isinstance(d.get("quantizer"), dict):
            return cls._from_parts(d)
        return cls._from_flat(d)

    @classmethod
    def _from_parts(cls, d: dict[str, Any]) -> LayerScheme:
        check_keys(d, list(_PARTS), "")
        version = d.get("version", SCHEME_VERSION)
        if not isinstance(version, int) or version > SCHEME_VERSION:
            raise FieldError("version", f"scheme version newer than this quantkit reads ({SCHEME_VERSION}); "
                             "upgrade quantkit", version)
        if "method" not in d:
            raise FieldError("method", "is required", None)
        return cls(MethodSpec.from_dict(d["method"]), quantizer_from_dict(d["quantizer"]),
                   RotationSpec.from_dict(d.get("rotation", {})), d.get("format", ""))

    @classmethod
    def _from_flat(cls, d: Any) -> LayerScheme:
        if not isinstance(d, dict):
            raise RecipeError(f"expected a mapping, got {d!r}")
        grid = d.get("grid", "uniform")
        if grid not in QUANTIZERS:
            raise FieldError("grid", f"unknown grid or quantizer; known: {', '.join(QUANTIZERS.names())}", grid)
        quantizer_fields = [f for f in QUANTIZERS.get(grid).field_names() if f != "name"]
        check_keys(d, [*_FLAT, *quantizer_fields, "format"], "")
        if "method" not in d:
            raise RecipeError("missing required field 'method'")
        parts: dict[str, dict[str, Any]] = {"method": {}, "quantizer": {"name": grid}, "rotation": {}}
        origin: dict[str, str] = {}
        for key, value in d.items():
            if key != "format":
                part, field = _FLAT.get(key, ("quantizer", key))
                parts[part][field] = value
                origin[f"{part}.{field}"] = key
        try:
            return cls._from_parts({**parts, "format": d.get("format", "")})
        except FieldError as e:
            raise e.renamed(origin.get(e.field, e.field)) from None


def quantizer_from_dict(d: Any) -> Spec:
    """The registered spec class named by ``d["name"]``, built from the rest of ``d``."""
    if not isinstance(d, dict):
        raise RecipeError(f"field 'quantizer': expected a mapping, got {d!r}")
    name = d.get("name", "uniform")
    if name not in QUANTIZERS:
        raise FieldError("quantizer.name", f"unknown grid or quantizer; known: {', '.join(QUANTIZERS.names())}",
                         name)
    return QUANTIZERS.get(name).from_dict({**d, "name": name})
