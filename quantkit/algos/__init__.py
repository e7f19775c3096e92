"""Rounding methods, registered by name. Each is a pure function ``(W, H, scheme) -> QuantResult``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["METHODS", "Method", "QuantResult", "register_method", "get_method"]


@dataclass
class QuantResult:
    """Codes and grid parameters of one quantized weight, in stored column order."""

    codes: torch.Tensor  # [out, in] uint8
    scales: torch.Tensor  # [out, ngroups] fp32 (fp16-representable)
    zeros: torch.Tensor  # [out, ngroups] fp32 integers
    perm: torch.Tensor | None  # [in] int64: stored column j holds original column perm[j]
    W_hat: torch.Tensor  # [out, in] the dequantized weight, original column order
    loss: float | None = None  # the method's own error estimate (GPTQ: sum of OBS losses)


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., QuantResult]
    needs_hessian: bool


METHODS: dict[str, Method] = {}


def register_method(name: str, *, needs_hessian: bool):
    def wrap(fn: Callable[..., QuantResult]) -> Callable[..., QuantResult]:
        METHODS[name] = Method(name, fn, needs_hessian)
        return fn

    return wrap


def get_method(name: str) -> Method:
    return METHODS[name]


from quantkit.algos import gptq as _gptq  # noqa: E402,F401  (registers "gptq")
from quantkit.algos import rtn as _rtn  # noqa: E402,F401  (registers "rtn")
