"""``QuantizedLinear``: a linear layer whose weight stays packed in its format's tensors; the forward goes through
the kernel dispatch (quantkit.kernels.dispatch), which falls back to the format's PyTorch reference.

With a Hadamard rotation (quantkit.rotations) the stored weight is ``S W Rᵀ``: the forward rotates the input by
``R`` (the dispatch's kernel may do that inside the dequant-matmul) and the output by ``Sᵀ`` after it, then adds
the bias.

``kernel_cache`` is a plain attribute, not a buffer: a kernel keeps there what it derives from the stored tensors
(the CPU kernels' repacked weight), so it is never saved with the state dict and ``to()`` never converts it; the
kernel checks that the stored tensors are still the ones it derived it from. ``to(dtype)`` converts the bias only:
the format's tensors keep the dtypes the format stores (fp16 scales rounded to bf16 would change the weight).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantkit.config.scheme import LayerScheme
from quantkit.formats import Format, get_format
from quantkit.kernels import dispatch
from quantkit.rotations import HadamardRotation

__all__ = ["QuantizedLinear", "kernel_for"]


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)  # integer codes cannot require grad; scales are not trained either


class QuantizedLinear(nn.Module):
    """Drop-in for ``nn.Linear`` holding its format's tensors as frozen parameters (``requires_grad=False``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: LayerScheme,
        *,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        self.format: Format = get_format(scheme.format)
        specs = self.format.layer_specs(scheme, in_features, out_features)
        # Frozen parameters, not buffers: accelerate offloads parameters under a device_map (buffers only with
        # offload_buffers=True), so the packed weights count against max_memory and leave memory with the layer.
        for name, (shape, tensor_dtype) in specs.items():
            self.register_parameter(name, _frozen(torch.empty(shape, dtype=tensor_dtype, device=device)))
        self._tensor_names = tuple(specs)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.kernel_cache: dict[str, Any] = {}  # per-kernel derived layouts; see the module docstring
        self.tuning: dict[str, nn.Parameter] | None = None  # fp32 copies being fine-tuned (start_tuning)

    def __setattr__(self, name: str, value) -> None:
        # The packed tensors stay frozen whoever assigns them: transformers' loader wraps each loaded tensor in a
        # Parameter that requires grad when it is floating point (scales, zeros).
        if isinstance(value, torch.Tensor) and name in self.__dict__.get("_tensor_names", ()):
            value = value.requires_grad_(False) if isinstance(value, nn.Parameter) else _frozen(value)
        super().__setattr__(name, value)

    @classmethod
    def from_packed(
        cls, tensors: dict[str, torch.Tensor], scheme: LayerScheme, in_features: int, out_features: int,
        bias: torch.Tensor | None = None,
    ) -> QuantizedLinear:
        m = cls(in_features, out_features, scheme, bias=bias is not None, device="meta")
        for name in m._tensor_names:
            setattr(m, name, tensors[name].clone())
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return m

    def _apply(self, fn, recurse: bool = True):
        """``to``, ``cuda``, ``half``, ...: the format's tensors follow a device move but keep their dtype (an
        unmoved one keeps its storage, so what a kernel derived from it stays valid)."""
        stored = {id(t) for t in self.tensors.values()}

        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if id(t) in stored and out.dtype != t.dtype:
                out = t.detach() if out.device == t.device else t.to(out.device)
            return out

        return super()._apply(keep_dtype, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Saved in the dtypes the format stores. Code that casts parameters through ``.data`` bypasses ``_apply``:
        PEFT's ``prepare_model_for_kbit_training`` upcasts every fp16 parameter to fp32 (unless it knows the
        quantization method). The values are the stored fp16 ones, and these tensors are frozen, so the cast back
        is exact and a base saved after that still loads."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        specs = self.format.layer_specs(self.scheme, self.in_features, self.out_features)
        for name, (_, dtype) in specs.items():
            t = destination.get(prefix + name)
            if t is not None and t.dtype != dtype:
                destination[prefix + name] = t.detach().to(dtype)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (the format's and the rotation signs; not the bias)."""
        return {name: getattr(self, name) for name in self._tensor_names}

    @property
    def rotations(self) -> tuple[HadamardRotation | None, HadamardRotation | None]:
        """The input-side and output-side rotations fused into the stored weight (None where there is none)."""
        if "rot_in_signs" not in self._tensor_names:  # the forward asks on every call
            return None, None
        t = self.tensors
        r_in = HadamardRotation(t["rot_in_signs"], "input") if "rot_in_signs" in t else None
        r_out = HadamardRotation(t["rot_out_signs"], "output") if "rot_out_signs" in t else None
        return r_in, r_out

    def stored_bits(self) -> int:
        """Every stored bit of this layer (quantkit.formats.Format.stored_bits)."""
        bias_dtype = self.bias.dtype if self.bias is not None else None
        return self.format.stored_bits(self.scheme, self.in_features, self.out_features, bias_dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [out, in] in the original basis (for inspection and tests; the forward never builds it)."""
        W = self.format.dequantize(self.tensors, self.scheme, self.in_features)
        for rot in self.rotations:
            if rot is not None:
                W = rot.unfuse(W)
        return W.to(dtype)

    def start_tuning(self) -> dict[str, nn.Parameter]:
        """fp32 trainable copies of the format's ``trainable`` tensors (quantkit.finetune). Until
        :meth:`stop_tuning`, the forward is the format's reference dequantization of them, differentiable, then an
        ordinary matmul; the stored tensors are left as they are."""
        self.tuning = {n: nn.Parameter(self.tensors[n].detach().float().clone())
                       for n in self.format.trainable(self.scheme)}
        return self.tuning

    def stop_tuning(self) -> None:
        """Store the tuned copies in the format's dtypes (fp16: rounded to nearest) and forward as before."""
        if self.tuning is None:
            return
        specs = self.format.layer_specs(self.scheme, self.in_features, self.out_features)
        for name, p in self.tuning.items():
            setattr(self, name, p.detach().to(specs[name][1]).clone())
        self.tuning = None
        self.kernel_cache.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r_in, r_out = self.rotations
        if self.tuning is not None:
            W = self.format.dequantize({**self.tensors, **self.tuning}, self.scheme, self.in_features)
            y = torch.nn.functional.linear(r_in.apply(x) if r_in is not None else x, W.to(x.dtype))
            if r_out is not None:
                y = r_out.online(y)
            return y if self.bias is None else y + self.bias
        # applies r_in to x (a kernel may do it inside the matmul)
        y = dispatch.linear(x, self, bias=self.bias if r_out is None else None, rotation=r_in)
        if r_out is not None:
            y = r_out.online(y)
            if self.bias is not None:
                y = y + self.bias
        return y

    def extra_repr(self) -> str:
        s = self.scheme
        q = ", ".join(f"{k}={v}" for k, v in s.quantizer.to_dict().items())
        rot = s.rotation.kind.value + ("+output" if s.rotation.output else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={s.format}, method={s.method.name}, act_order={s.method.act_order}, quantizer=({q}), "
                f"rotation={rot}")


def kernel_for(model: nn.Module, dtype: torch.dtype | None = None) -> str:
    """The name of the kernel that the first ``QuantizedLinear`` in ``model`` dispatches to, for activations of
    ``dtype`` (default: the dtype of the model's first floating-point parameter) on that layer's device;
    ``"pytorch-reference"`` when no registered kernel applies."""
    layer = next((m for m in model.modules() if isinstance(m, QuantizedLinear)), None)
    if layer is None:
        raise ValueError("the model has no QuantizedLinear")
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float16)
    device = next(iter(layer.tensors.values())).device
    kernel = dispatch.select(torch.empty(1, layer.in_features, device=device, dtype=dtype), layer)
    return "pytorch-reference" if kernel is None else kernel.name
