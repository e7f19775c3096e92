"""LoRA adapters (PEFT) on quantkit's ``QuantizedLinear``: the packed base stays frozen, the adapters train.

QLoRA (Dettmers et al., 2023, arXiv:2305.14314) trains a low-rank update ``ΔW = B A · α/r`` (LoRA, Hu et al.,
2021, arXiv:2106.09685) on top of a frozen quantized weight: ``y = Q(W) x + B A x · α/r``. Gradients reach the
input through the quantized forward (dequantize-then-matmul, or the Triton ops' backward in
quantkit.kernels.ops) and the adapter's parameters; the packed codes, scales and zeros are buffers and never change.

How PEFT finds this layer. PEFT's LoRA turns each targeted module into a LoRA layer through a chain of dispatchers
(``LoraModel._create_new_module``: bitsandbytes, GPTQ, AQLM, HQQ, torchao, ..., then ``nn.Linear``), a list built
inside that function with no registry. Its only extension point, ``LoraConfig._register_custom_module``, is per
config object and not saved with the adapter, so a plain ``LoraConfig`` (and ``PeftModel.from_pretrained``, which
rebuilds the config from ``adapter_config.json``) would never see it. :func:`register` therefore puts
:func:`dispatch_quantkit` (a dispatcher with PEFT's own signature, like ``dispatch_aqlm``) in front of that chain,
and teaches ``target_modules="all-linear"`` (which PEFT resolves to ``nn.Linear`` and ``Conv1D`` only) to include
quantized linears. Both are wrappers around PEFT functions that call the originals for everything else; a mapping
the user registered for ``QuantizedLinear`` with ``_register_custom_module`` still wins. The transformers adapter
(quantkit.hf.quantizer) calls :func:`register` when it loads a quantkit checkpoint and PEFT is installed.

Merging is refused: ``Q(W) + ΔW`` is not on the quantization grid, so folding the adapter into the packed codes
would change the model. Keep the adapter separate (``unload()`` returns the quantized base).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from peft.tuners import tuners_utils
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.nn import QuantizedLinear

__all__ = ["QuantkitLoraLinear", "dispatch_quantkit", "register"]

# init_lora_weights values that need only the adapter's own shapes; the others (pissa, olora, corda, loftq, ...)
# read the base layer's dense weight, which a packed layer does not have.
_INITS = (True, False, "gaussian")


class QuantkitLoraLinear(nn.Module, LoraLayer):
    """``y = base(x) + Σ_adapters B(A(dropout(x))) · scaling`` over a frozen ``QuantizedLinear`` ``base``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                 **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._target_name = kwargs.get("target_name") or type(self.get_base_layer()).__name__
        if config.init_lora_weights not in _INITS:
            raise NotImplementedError(
                f"init_lora_weights={config.init_lora_weights!r} reads the dense weight of {self._target_name}, "
                f"which is stored packed; use one of {_INITS}")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def resolve_lora_variant(self, *, config, **kwargs):
        try:
            return super().resolve_lora_variant(config=config, **kwargs)
        except ValueError as e:  # DoRA, QA-LoRA, ...: only plain LoRA is defined over a packed base
            raise NotImplementedError(
                f"{self._target_name}: only plain LoRA is supported on a quantkit QuantizedLinear ({e})") from None

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer):
        # The adapters follow the packed tensors' device; they keep their own float dtype (the codes are integers).
        tensors = base_layer.tensors
        return (next(iter(tensors.values())).device if tensors else None), None

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        base = self.get_base_layer()
        raise QuantkitError(
            f"cannot merge the LoRA adapter into {self._target_name}: its weight is packed "
            f"({base.format.name}, {base.scheme.quantizer.bits}-bit) and W + BA is not on the quantization grid; "
            "keep the adapter separate (PeftModel.unload() returns the quantized base)")

    def unmerge(self) -> None:
        if self.merged:  # merge() never succeeds, so nothing can be merged; kept for PEFT's contract
            raise QuantkitError(f"{self._target_name}: an adapter is marked merged into packed weights")
        warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``B A · scaling`` [out, in], in the basis of ``QuantizedLinear.dequantize()`` (the layer's input and
        output: a rotation fused into the stored weight is inside the base layer's forward)."""
        A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return (B.float() @ A.float() * self.scaling[adapter]).to(B.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for active in self.active_adapters:
            if active not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[active], self.lora_B[active]
            x_a = self._cast_input_dtype(x, lora_A.weight.dtype)
            result = result + lora_B(lora_A(self.lora_dropout[active](x_a))) * self.scaling[active]
        return result.to(result_dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def dispatch_quantkit(target: nn.Module, adapter_name: str, config, **kwargs: Any) -> nn.Module | None:
    """PEFT's dispatcher contract: a :class:`QuantkitLoraLinear` when ``target`` (or the layer under an existing
    LoRA layer) is a ``QuantizedLinear``, else None. A ``_register_custom_module`` mapping that covers
    ``QuantizedLinear`` is left to PEFT."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, QuantizedLinear):
        return None
    if any(isinstance(base, key) for key in (getattr(config, "_custom_modules", None) or {})):
        return None
    new = QuantkitLoraLinear(target, adapter_name, config=config, **kwargs)
    if not hasattr(base, "qweight") and next(base.parameters(), None) is None:
        # PEFT's _replace_module places the adapter on the device of ``child.qweight`` (or ``weight``, or the first
        # parameter): a layer with none of them (the vector-codebook format, no bias) gets an empty ``qweight`` on
        # its device, as PEFT's own dispatch_aqlm names the AQLM codes (empty: it holds no memory).
        base.qweight = torch.empty(0, device=next(iter(base.tensors.values())).device)
    return new


def _targets_all_linear(config) -> bool:
    target = getattr(config, "target_modules", None)
    return isinstance(target, str) and target.lower() == "all-linear"


def _quantized_linear_names(model: nn.Module) -> set[str]:
    """Every ``QuantizedLinear`` that ``all-linear`` should target: not the output head, not one already inside an
    adapter layer (the rules PEFT applies to ``nn.Linear``)."""
    names = {name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    for prefix, m in model.named_modules():
        if isinstance(m, BaseTunerLayer):
            names -= {f"{prefix}.{sub}" for sub, _ in m.named_modules() if sub}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n for n in names if model.get_submodule(n) is not head}


def _wrap(owner: Any, name: str, make) -> None:
    """Replace ``owner.name`` by ``make(original)`` once (the wrapper is marked, so a second call is a no-op)."""
    current = getattr(owner, name, None)
    if current is None:
        raise QuantkitError(f"PEFT has no {getattr(owner, '__name__', owner)}.{name}: this PEFT version is not "
                            "supported for LoRA on quantkit layers")
    if getattr(current, "_quantkit_wrapper", False):
        return
    wrapper = make(current)
    wrapper._quantkit_wrapper = True
    setattr(owner, name, staticmethod(wrapper) if isinstance(owner, type) else wrapper)


def register() -> None:
    """Let PEFT's LoRA handle ``QuantizedLinear`` with a plain ``LoraConfig`` (idempotent): see the module
    docstring for where the two hooks go and why."""

    def create(original):
        @functools.wraps(original)
        def _create_new_module(lora_config, adapter_name, target, **kwargs):
            new = dispatch_quantkit(target, adapter_name, config=lora_config, **kwargs)
            return new if new is not None else original(lora_config, adapter_name, target, **kwargs)

        return _create_new_module

    def all_linear(original):
        @functools.wraps(original)
        def _maybe_include_all_linear_layers(peft_config, model):
            wants_all = _targets_all_linear(peft_config)
            peft_config = original(peft_config, model)
            if wants_all:
                peft_config.target_modules = set(peft_config.target_modules) | _quantized_linear_names(model)
            return peft_config

        return _maybe_include_all_linear_layers

    _wrap(LoraModel, "_create_new_module", create)
    _wrap(tuners_utils, "_maybe_include_all_linear_layers", all_linear)
