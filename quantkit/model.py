"""Model structure for the layer walk: find the decoder layers, build the model without weights, load a
checkpoint's tensors into one part of it, and name and swap its linears."""

from __future__ import annotations

import torch
from accelerate import init_empty_weights
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.loading import CheckpointReader, ModelSource
from quantkit.nn.experts import split_experts

__all__ = ["RenamedCheckpoint", "build_skeleton", "decoder_layers", "linears", "load_into", "nonfinite", "set_module"]


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


class RenamedCheckpoint:
    """A checkpoint's tensors under the names the model gives them: transformers' renamings for the model (the
    ``WeightRenaming`` entries of its conversion mapping, e.g. Mixtral's ``block_sparse_moe.`` -> ``mlp.``)
    applied to the stored keys. Same reading interface as :class:`quantkit.loading.CheckpointReader`."""

    def __init__(self, reader: CheckpointReader, model: nn.Module):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings

        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
        self.reader, self.folder = reader, reader.folder
        self.stored: dict[str, str] = {}  # model's name -> stored name
        for key in reader.keys():
            name = apply_renamings(key, renamings) if renamings else key
            if name in self.stored:
                raise QuantkitError(f"{reader.folder}: {self.stored[name]} and {key} are both {name} once renamed "
                                    "as transformers renames this model's checkpoint keys")
            self.stored[name] = key

    def keys(self) -> list[str]:
        return list(self.stored)

    def shapes(self) -> dict[str, list[int]]:
        shapes = self.reader.shapes()
        return {name: shapes[key] for name, key in self.stored.items()}

    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        tensors = self.reader.load([self.stored[k] for k in keys])
        return {k: tensors[self.stored[k]] for k in keys}

    def load_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under ``prefix`` (a model name, e.g. ``model.layers.3.``), keyed without it."""
        return {k[len(prefix):]: v for k, v in self.load([k for k in self.stored if k.startswith(prefix)]).items()}


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
    split_experts(model)  # one linear per expert matrix, as the checkpoint stores them (quantkit.nn.experts)
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
    """The ``nn.Linear`` modules of ``layer`` by full name (``prefix.name``), routers left out: a linear directly
    under an MoE block (a module with an ``experts`` child), such as Qwen2-MoE's ``shared_expert_gate``, decides
    where tokens go rather than transforming them, and stays in full precision (the top-k routers of
    transformers 5 hold a bare weight, not a Linear, and are never candidates)."""
    routers = {f"{n}.{c}".lstrip(".") for n, m in layer.named_modules() if isinstance(getattr(m, "experts", None),
                                                                                    nn.Module)
               for c, child in m.named_children() if isinstance(child, nn.Linear)}
    return {f"{prefix}.{n}": m for n, m in layer.named_modules() if isinstance(m, nn.Linear) and n not in routers}


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
