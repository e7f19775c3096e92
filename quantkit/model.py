"""Model structure for the layer walk: find the decoder layers, build the model without weights, load a
checkpoint's tensors into one part of it, and name and swap its linears."""

from __future__ import annotations

import torch
from accelerate import init_empty_weights
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.loading import ModelSource

__all__ = ["build_skeleton", "decoder_layers", "linears", "load_into", "nonfinite", "set_module"]


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers: the one named ``*layers`` with ``num_hidden_layers`` entries (Llama,
    Mistral, Qwen, Gemma, Phi-3 and the MoE families keep them in ``model.layers``)."""
    n = model.config.get_text_config().num_hidden_layers
    lists = {name: m for name, m in model.named_modules() if isinstance(m, nn.ModuleList)}
    for name, m in lists.items():
        if len(m) == n and name.endswith("layers"):
            return name, m
    others = ", ".join(f"{name} ({len(m)})" for name, m in lists.items()) or "none"
    raise QuantkitError(f"cannot find the decoder layers of {type(model).__name__}: looked for a ModuleList named "
                        f"'*layers' with num_hidden_layers = {n} entries; its ModuleLists: {others}")


def build_skeleton(source: ModelSource, device: torch.device) -> nn.Module:
    """The model on the meta device (buffers real), in eval mode, without a KV cache."""
    from transformers import AutoModelForCausalLM

    config = source.config
    config.use_cache = False
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    for b in model.buffers():
        if b.is_meta:
            raise QuantkitError("model has buffers that cannot be built without weights; unsupported architecture")
    return model.to(device) if device.type != "cpu" else model


def load_into(module: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device, what: str,
              *, complete: bool = True) -> None:
    """Assign checkpoint tensors (floats as fp32) to a meta-initialized module; ``complete``: all must be there.

    A floating tensor holding NaN or inf is refused, named in full (``what.key``; a whole model's keys are full
    names already): quantizing it would publish a model whose every output is NaN."""
    from transformers import PreTrainedModel

    tensors = {k: v.to(device=device, dtype=torch.float32 if v.is_floating_point() else v.dtype)
               for k, v in tensors.items()}
    for k, v in tensors.items():
        if v.is_floating_point() and (bad := nonfinite(v)):
            full = k if isinstance(module, PreTrainedModel) else f"{what}.{k}"
            raise QuantkitError(f"{full}: {bad} in the source checkpoint; refusing to quantize")
    _, unexpected = module.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise QuantkitError(f"{what}: checkpoint has tensors the model does not: {unexpected[:3]}")
    still_meta = [n for n, p in module.named_parameters() if p.is_meta]
    if complete and still_meta:
        raise QuantkitError(f"{what}: checkpoint lacks tensors for {still_meta[:3]}")


def linears(layer: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of ``layer`` by full name (``prefix.name``)."""
    return {f"{prefix}.{n}": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def nonfinite(x: torch.Tensor) -> str | None:
    """``"3 non-finite values (nan, inf)"`` when ``x`` holds NaN or ±inf, else None."""
    flat = x.reshape(-1)
    # In chunks: a whole-tensor mask of a large layer's weight would cost a quarter of its size again.
    if all(bool(torch.isfinite(c).all()) for c in flat.split(1 << 24)):
        return None
    bad = flat[~torch.isfinite(flat)]
    kinds = [k for k, hit in (("nan", torch.isnan(bad)), ("inf", torch.isposinf(bad)), ("-inf", torch.isneginf(bad)))
             if bool(hit.any())]
    return f"{bad.numel()} non-finite value{'s' if bad.numel() != 1 else ''} ({', '.join(kinds)})"
