"""Rounding methods, registered by name. Each is a pure function ``(W, H, scheme) -> QuantResult`` that builds the
scheme's quantizer and drives it: round-to-nearest, or the second-order (OBS) loop of GPTQ."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from quantkit.quantizers import QuantResult
from quantkit.registry import METHODS

__all__ = ["METHODS", "Method", "QuantResult", "register_method", "get_method"]


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., QuantResult]  # (W [out, in], H [in, in] | [h, in, in] | None, scheme) -> QuantResult
    needs_hessian: bool


def register_method(name: str, *, needs_hessian: bool):
    def wrap(fn: Callable[..., QuantResult]) -> Callable[..., QuantResult]:
        METHODS.add(name, Method(name, fn, needs_hessian))
        return fn

    return wrap


def get_method(name: str) -> Method:
    return METHODS.get(name)


from quantkit.algos import gptq as _gptq  # noqa: E402,F401  (registers "gptq")
from quantkit.algos import rtn as _rtn  # noqa: E402,F401  (registers "rtn")
