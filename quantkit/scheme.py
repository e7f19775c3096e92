"""The resolved quantization scheme of one linear layer: typed, validated, round-trips through dicts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from quantkit.errors import RecipeError
from quantkit.formats.packing import SUPPORTED_BITS

__all__ = ["LayerScheme", "ROTATIONS"]

ROTATIONS = ("none", "hadamard")


@dataclass(frozen=True)
class LayerScheme:
    """How one linear is quantized. ``group_size=-1`` means one scale per output channel."""

    method: str
    bits: int
    group_size: int = 128
    symmetric: bool = False
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    block_size: int = 128
    # Value projections: weight each calibration token by the attention it receives (quantkit/algos/attention.py)
    attention_weighted: bool = True
    # The scalar grid (quantkit/grids): uniform (affine integers; `symmetric` applies), gaussian, nf4, fp4
    grid: str = "uniform"
    # Uniform grid: fit each group's range by least squared error over shrink factors instead of min/max
    # (level grids always fit their scale to the squared error)
    mse_clip: bool = False
    # Randomized Hadamard rotation of the input dimension (quantkit/rotations), optionally also of the output
    rotation: str = "none"
    rotate_output: bool = False
    rotation_seed: int = 0

    def __post_init__(self) -> None:
        from quantkit.algos import METHODS  # late: algos import this module
        from quantkit.grids import GRIDS

        def bad(field: str, why: str) -> RecipeError:
            return RecipeError(f"field '{field}': {why} (got {getattr(self, field)!r})")

        if self.method not in METHODS:
            raise bad("method", f"unknown method; known: {', '.join(sorted(METHODS))}")
        if not isinstance(self.bits, int) or self.bits not in SUPPORTED_BITS:
            raise bad("bits", f"unsupported bit width; supported: {', '.join(map(str, SUPPORTED_BITS))}")
        if not isinstance(self.group_size, int) or not (self.group_size == -1 or self.group_size >= 8):
            raise bad("group_size", "must be -1 (per channel) or an integer >= 8")
        if self.grid not in GRIDS:
            raise bad("grid", f"unknown grid; known: {', '.join(sorted(GRIDS))}")
        if self.bits not in GRIDS[self.grid][1]:
            raise bad("bits", f"grid {self.grid!r} supports {', '.join(map(str, GRIDS[self.grid][1]))} bits")
        if self.mse_clip is True and self.grid != "uniform":
            raise bad("mse_clip", f"applies to the uniform grid; {self.grid!r} always fits its scale by squared error")
        if self.rotation not in ROTATIONS:
            raise bad("rotation", f"unknown rotation; known: {', '.join(ROTATIONS)}")
        if self.rotate_output and self.rotation == "none":
            raise bad("rotate_output", "needs a rotation")
        if not isinstance(self.rotation_seed, int) or isinstance(self.rotation_seed, bool) or self.rotation_seed < 0:
            raise bad("rotation_seed", "must be a non-negative integer")
        for flag in ("symmetric", "mse_clip", "act_order", "static_groups", "attention_weighted", "rotate_output"):
            if not isinstance(getattr(self, flag), bool):
                raise bad(flag, "must be true or false")
        if not isinstance(self.damp, (int, float)) or not 0 < self.damp < 1:
            raise bad("damp", "must be a number in (0, 1), relative to the Hessian's mean diagonal")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise bad("block_size", "must be a positive integer")

    @property
    def stores_zeros(self) -> bool:
        """Only the asymmetric uniform grid has zero points; level grids and symmetric grids do not."""
        return self.grid == "uniform" and not self.symmetric

    @property
    def stores_levels(self) -> bool:
        return self.grid != "uniform"

    @property
    def stores_perm(self) -> bool:
        """Act-order with dynamic groups stores columns in processing order plus the permutation."""
        return self.act_order and not self.static_groups

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerScheme:
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise RecipeError(f"unknown field '{unknown[0]}'; known fields: {', '.join(cls.field_names())}")
        if "method" not in d or "bits" not in d:
            missing = "method" if "method" not in d else "bits"
            raise RecipeError(f"missing required field '{missing}'")
        return cls(**d)
