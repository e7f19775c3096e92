"""The quantize step: rotate, round and pack each linear of a layer by its scheme, and swap in the packed module."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch
from torch import nn

from quantkit.algos import get_method
from quantkit.algos.gptq import reuse_factors
from quantkit.algos.hessian import output_error
from quantkit.calibration.steps import LayerContext, LayerStep
from quantkit.config.scheme import LayerScheme
from quantkit.errors import QuantkitError
from quantkit.formats import get_format
from quantkit.model import linears, nonfinite, set_module
from quantkit.nn import QuantizedLinear
from quantkit.rotations import HadamardRotation, random_signs

__all__ = ["QuantizeStep", "layer_rotations", "quantize_linear"]

logger = logging.getLogger(__name__)


def layer_rotations(name: str, scheme: LayerScheme, W: torch.Tensor) -> dict[str, HadamardRotation]:
    """The rotations a scheme asks for, keyed by the name of their stored signs; seeded by layer name."""
    rot = scheme.rotation
    if not rot.active:
        return {}
    out_features, in_features = W.shape
    rots = {"rot_in_signs": HadamardRotation(random_signs(in_features, rot.seed, name), "input")}
    if rot.output:
        rots["rot_out_signs"] = HadamardRotation(random_signs(out_features, rot.seed, name + ":output"), "output")
    return rots


def quantize_linear(name: str, linear: nn.Linear, scheme: LayerScheme,
                    H: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The stored tensors of one linear (its format's and the rotation signs) and its statistics.

    Refused with a ``QuantkitError`` naming the tensor: a weight or Hessian that holds NaN or inf, and a stored
    floating tensor (scales, zeros, levels, codebooks) that overflows its dtype, which would decode to inf or NaN.
    """
    W = linear.weight.detach().float()
    if bad := nonfinite(W):
        raise QuantkitError(f"{name}.weight: {bad}; refusing to quantize")
    if H is not None and (bad := nonfinite(H)):
        raise QuantkitError(f"{name}: its calibration inputs are not finite, its Hessian has {bad}: the "
                            "calibration forward overflows before this linear (in its layer or an earlier one); "
                            "refusing to quantize")
    rots = layer_rotations(name, scheme, W)
    if "rot_out_signs" in rots and H is not None and H.dim() == 3:
        raise QuantkitError(f"{name}: an output rotation mixes the heads of a per-head Hessian")
    # Rounding happens in the rotated basis. The rotations are orthogonal, so the weight error and the layer
    # objective measured there (with H rotated alike) are those of the original basis: no need to rotate back.
    for rot in rots.values():
        W = rot.fuse(W)
        if rot.side == "input" and H is not None:
            H = rot.rotate_hessian(H)
    if rots and (bad := nonfinite(W)):
        raise QuantkitError(f"{name}.weight: the Hadamard rotation overflows float32 ({bad}; the weight reaches "
                            f"{linear.weight.detach().abs().max().item():.4g}); refusing to quantize")
    try:
        result = get_method(scheme.method.name).fn(W, H, scheme)
        packed = get_format(scheme.format).pack(result, scheme)
    except QuantkitError as e:
        raise QuantkitError(f"{name}: {e}") from None
    for k, v in packed.items():
        if v.is_floating_point() and (bad := nonfinite(v)):
            raise QuantkitError(f"{name}.{k}: {bad} once stored as {str(v.dtype).removeprefix('torch.')} (which "
                                f"holds up to {torch.finfo(v.dtype).max:.6g}; the weight reaches "
                                f"{linear.weight.detach().abs().max().item():.4g}); refusing to quantize")
    packed.update({k: r.signs.to(torch.int8).contiguous() for k, r in rots.items()})
    stats: dict[str, Any] = {**_describe(scheme), "shape": list(W.shape), "loss": result.loss,
                             "weight_mse": (W - result.W_hat).pow(2).mean().item()}
    for rot in rots.values():
        stats["rotation_" + rot.side] = rot.layout.describe()
    if H is not None:
        err = output_error(W, result.W_hat, H)
        base = output_error(W, torch.zeros_like(W), H)
        stats["output_error"] = err
        stats["relative_output_error"] = err / base if base > 0 else 0.0
    return packed, stats


def _describe(scheme: LayerScheme) -> dict[str, Any]:
    q = scheme.quantizer.to_dict()
    return {"method": scheme.method.name, "bits": q.get("bits"), "group_size": q.get("group_size"),
            "quantizer": q["name"], "format": scheme.format}


class QuantizeStep(LayerStep):
    """Quantizes the linears that ``schemes`` names (full module names); its record is their statistics."""

    name: ClassVar[str] = "quantize"

    def __init__(self, schemes: dict[str, LayerScheme]):
        self.schemes = schemes

    def fingerprint(self) -> Any:
        return {n: s.to_dict() for n, s in sorted(self.schemes.items())}

    def _targets(self, ctx: LayerContext) -> dict[str, nn.Linear]:
        return {n: m for n, m in linears(ctx.layer, ctx.prefix).items() if n in self.schemes}

    def needs(self, ctx: LayerContext) -> dict[str, set[str]]:
        if not ctx.calibrated:
            return {}
        targets = self._targets(ctx)
        weighted = {ctx.local(n) for n in targets if n.endswith(".v_proj") and self._weighted(self.schemes[n])}
        return {"hessian": {ctx.local(n) for n in targets}, "attention_hessian": weighted}

    @staticmethod
    def _weighted(s: LayerScheme) -> bool:
        """Per-head attention-weighted Hessians, where the scheme asks and its quantizer takes row blocks (one
        codebook per layer does not: it gets the plain Hessian)."""
        return (s.method.attention_weighted and not s.rotation.output and s.method.needs_hessian
                and getattr(type(s.quantizer), "per_head_hessians", True))

    def run(self, ctx: LayerContext, stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
        plain, weighted = stats.get("hessian", {}), stats.get("attention_hessian", {})
        record = {}
        with reuse_factors():  # q/k/v and gate/up share their inputs, hence one Hessian and its factor
            for name, linear in self._targets(ctx).items():
                local = ctx.local(name)
                H = weighted.get(local, plain.get(local))
                unseen = H is None and ctx.calibrated and self.schemes[name].method.needs_hessian
                if unseen:
                    # An MoE expert the router sent no calibration token (quantkit.nn.experts): nothing measured its
                    # inputs. With the identity for H the second-order loop propagates no error: round to nearest.
                    logger.warning("%s: no calibration token reached it (an expert never routed to); rounding to "
                                   "nearest (identity Hessian)", name)
                    H = torch.eye(linear.in_features, device=ctx.device)
                packed, record[name] = quantize_linear(name, linear, self.schemes[name], H)
                if unseen:
                    record[name]["hessian"] = "identity: no calibration token reached this linear"
                ctx.tensors.update({f"{name}.{k}": v for k, v in packed.items()})
                self._swap(ctx, name, linear, packed)
        return record

    def restore(self, ctx: LayerContext, record: dict[str, Any]) -> None:
        for name, linear in self._targets(ctx).items():
            packed = {k[len(name) + 1 :]: v for k, v in ctx.tensors.items() if k.startswith(name + ".")}
            self._swap(ctx, name, linear, packed)

    def _swap(self, ctx: LayerContext, name: str, linear: nn.Linear, packed: dict[str, torch.Tensor]) -> None:
        q = QuantizedLinear.from_packed(packed, self.schemes[name], linear.in_features, linear.out_features,
                                        linear.bias)
        set_module(ctx.model, name, q.to(ctx.device))
