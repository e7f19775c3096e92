"""Typed, validated parts of a configuration: frozen dataclasses whose fields are checked against their declared
types, with ``to_dict``/``from_dict`` and errors that name the bad field (``field 'quantizer.bits': ...``)."""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any, ClassVar, TypeVar

from quantkit.errors import RecipeError

__all__ = ["FieldError", "Spec", "check_keys"]

S = TypeVar("S", bound="Spec")


class FieldError(RecipeError):
    """A field that does not validate; ``field`` is its dotted name, so a caller can name it as the user wrote it."""

    def __init__(self, field: str, why: str, value: Any):
        self.field, self.why, self.value = field, why, value
        super().__init__(f"field '{field}': {why} (got {value!r})")

    def renamed(self, field: str) -> FieldError:
        return FieldError(field, self.why, self.value)


def check_keys(d: Any, known: list[str], where: str) -> None:
    if not isinstance(d, dict):
        raise RecipeError(f"{where + ': ' if where else ''}expected a mapping, got {d!r}")
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise RecipeError(f"{where + ': ' if where else ''}unknown field '{unknown[0]}'; "
                          f"known fields: {', '.join(known)}")


def _type_ok(value: Any, annotation: str) -> bool:
    if annotation == "bool":
        return isinstance(value, bool)
    if annotation == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation == "str":
        return isinstance(value, str)
    return True  # enums and anything richer: checked by the class


@dataclasses.dataclass(frozen=True)
class Spec:
    """Base of the config parts. ``part`` names the part in error messages (``quantizer`` in ``quantizer.bits``);
    subclasses check what their field types cannot say in :meth:`validate`."""

    part: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(f.type, str) and not _type_ok(value, f.type):
                raise self.bad(f.name, f"must be {'true or false' if f.type == 'bool' else 'a ' + f.type}")
        self.validate()

    def validate(self) -> None:
        pass

    def bad(self, field: str, why: str) -> FieldError:
        return FieldError(f"{self.part}.{field}" if self.part else field, why, getattr(self, field, None))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return {k: v.value if isinstance(v, Enum) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls: type[S], d: Any) -> S:
        check_keys(d, cls.field_names(), cls.part)
        for f in dataclasses.fields(cls):
            if f.name not in d and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise FieldError(f"{cls.part}.{f.name}" if cls.part else f.name, "is required", None)
        return cls(**d)
