"""The resolved quantization scheme of one linear layer: typed, validated, round-trips through dicts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from quantkit.errors import RecipeError
from quantkit.formats.packing import SUPPORTED_BITS

__all__ = ["LayerScheme"]


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

    def __post_init__(self) -> None:
        from quantkit.algos import METHODS  # late: algos import this module

        def bad(field: str, why: str) -> RecipeError:
            return RecipeError(f"field '{field}': {why} (got {getattr(self, field)!r})")

        if self.method not in METHODS:
            raise bad("method", f"unknown method; known: {', '.join(sorted(METHODS))}")
        if not isinstance(self.bits, int) or self.bits not in SUPPORTED_BITS:
            raise bad("bits", f"unsupported bit width; supported: {', '.join(map(str, SUPPORTED_BITS))}")
        if not isinstance(self.group_size, int) or not (self.group_size == -1 or self.group_size >= 8):
            raise bad("group_size", "must be -1 (per channel) or an integer >= 8")
        for flag in ("symmetric", "act_order", "static_groups", "attention_weighted"):
            if not isinstance(getattr(self, flag), bool):
                raise bad(flag, "must be true or false")
        if not isinstance(self.damp, (int, float)) or not 0 < self.damp < 1:
            raise bad("damp", "must be a number in (0, 1), relative to the Hessian's mean diagonal")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise bad("block_size", "must be a positive integer")

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
