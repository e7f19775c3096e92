"""Mixture-of-experts blocks with one linear per expert matrix, for quantizing each expert on its own.

transformers (5.x) holds the experts of an MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE and the families that share
their checkpoint mapping) in one module of fused 3-D parameters: ``gate_up_proj`` [E, 2I, H] and ``down_proj``
[E, H, I], decorated with ``use_experts_implementation``. Checkpoints on disk keep the per-expert layout
(``experts.{e}.gate_proj.weight``, Mixtral's ``experts.{e}.w1.weight``), which transformers' conversion mapping
merges on load and splits again on save.

GPTQ rounds each expert's matrices with that expert's own Hessian, built from the tokens the router sends it, so
quantkit splits a fused experts module into :class:`SplitExperts`: a ModuleList of experts, each with its gate,
up and down projections as ordinary ``nn.Linear`` modules named as the checkpoint names them (read from
transformers' conversion mapping, :func:`expert_layout`). Its forward is transformers' eager experts loop; a
linear's forward hook sees exactly the tokens routed to its expert. The quantize step then swaps those linears
for ``QuantizedLinear`` like any other, the quantized checkpoint stores ``experts.{e}.gate_proj.qweight`` and so
on (the per-expert layout other GPTQ checkpoints of these models use), and the loader splits the fused module the
same way before the weights arrive (quantkit.hf.quantizer.replace_linears). Experts a recipe leaves in full
precision are written back fused (:meth:`SplitExperts.fuse_weights`), as the model holds them. The router is not
an expert linear and is left alone; an expert no calibration token reaches has no Hessian and is rounded to
nearest (quantkit.calibration.quantize). Fused experts in other layouts (transposed, interleaved, with biases or
a custom gate activation, as GPT-OSS's) are refused with one error naming the module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from quantkit.errors import QuantkitError

__all__ = ["ExpertLayout", "SplitExperts", "expert_layout", "fused_experts", "split_experts"]

_PER_EXPERT = re.compile(r"experts\.\*\.(\w+)\.weight$")


@dataclass(frozen=True)
class ExpertLayout:
    """Names of one expert's linears in the checkpoint: ``gate`` and ``up`` (the two halves of ``gate_up_proj``,
    in that order) and ``down``."""

    gate: str
    up: str
    down: str


def fused_experts(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` that hold its ``num_experts`` experts in 3-D parameters, by name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(getattr(m, "num_experts", None), int) and not isinstance(m, SplitExperts)
            and any(p.dim() == 3 for p in m.parameters(recurse=False))}


def expert_layout(model: nn.Module, where: str = "experts") -> ExpertLayout:
    """The per-expert checkpoint names of ``model``'s fused experts (``where``: one of them, for the error), from
    transformers' conversion mapping: the converters that merge ``experts.*.{name}.weight`` into
    ``gate_up_proj`` and ``down_proj``."""
    from transformers.conversion_mapping import extract_weight_conversions_for_model
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    found: dict[str, list[str]] = {}
    for t in extract_weight_conversions_for_model(model) or []:
        if not isinstance(t, WeightConverter) or len(t._original_target_patterns) != 1:
            continue
        target = t._original_target_patterns[0].rpartition(".")[2]
        names = [m.group(1) for p in t._original_source_patterns if (m := _PER_EXPERT.search(p))]
        ops = [(type(op), op.dim) for op in t.operations]
        merge = [(MergeModulelist, 0)] + ([(Concatenate, 1)] if len(names) == 2 else [])
        if len(names) == len(t._original_source_patterns) and ops == merge:
            found[target] = names
    gate_up, down = found.get("gate_up_proj", []), found.get("down_proj", [])
    if len(gate_up) != 2 or len(down) != 1:
        raise QuantkitError(f"{where}: transformers has no per-expert checkpoint layout for the fused experts of "
                            f"model type {model.config.model_type!r} (experts.*.NAME.weight merged into "
                            "gate_up_proj and down_proj); quantizing these fused MoE experts is not supported")
    return ExpertLayout(gate_up[0], gate_up[1], down[0])


def _check_fused(name: str, fused: nn.Module) -> tuple[int, int, int]:
    """(experts, hidden, intermediate) of a fused experts module in the layout :class:`SplitExperts` computes, or
    one error naming the module and what differs."""
    from transformers.integrations.moe import _default_apply_gate

    what = f"{name} ({type(fused).__name__})"
    gate_up, down = getattr(fused, "gate_up_proj", None), getattr(fused, "down_proj", None)
    if not isinstance(gate_up, nn.Parameter) or not isinstance(down, nn.Parameter) or gate_up.dim() != 3:
        raise QuantkitError(f"{what}: fused experts without 3-D gate_up_proj and down_proj parameters; quantizing "
                            "these fused MoE experts is not supported")
    E, two_i, H = gate_up.shape
    flags = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
             "has_post_expert_norm": False}
    odd = [f"{k}={getattr(fused, k, None)}" for k, v in flags.items() if getattr(fused, k, v) != v]
    if getattr(type(fused), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        odd.append("a custom gate activation")
    if odd or tuple(down.shape) != (E, H, two_i // 2) or two_i % 2:
        raise QuantkitError(f"{what}: fused experts in another layout than [gate; up] x down without bias "
                            f"({', '.join(odd) or 'shapes ' + str([list(gate_up.shape), list(down.shape)])}); "
                            "quantizing these fused MoE experts is not supported")
    return E, H, two_i // 2


class SplitExperts(nn.Module):
    """The experts of one MoE block, expert *e* the child named ``"e"`` with three ``nn.Linear`` (or quantized)
    projections named by ``layout``; called like the fused module it replaces: ``(hidden [T, H],
    top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, layout: ExpertLayout, act_fn: nn.Module,
                 *, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        for e in range(num_experts):
            expert = nn.Module()
            for name, (i, o) in ((layout.gate, (hidden, intermediate)), (layout.up, (hidden, intermediate)),
                                 (layout.down, (intermediate, hidden))):
                setattr(expert, name, nn.Linear(i, o, bias=False, device=device, dtype=dtype))
            self.add_module(str(e), expert)
        self.num_experts, self.layout, self.act_fn = num_experts, layout, act_fn

    def expert(self, e: int) -> nn.Module:
        return self._modules[str(e)]

    @classmethod
    def from_fused(cls, name: str, fused: nn.Module, layout: ExpertLayout) -> SplitExperts:
        """The same experts, each matrix its own linear (on the meta device when ``fused`` is)."""
        E, H, I = _check_fused(name, fused)
        gate_up, down = fused.gate_up_proj, fused.down_proj
        split = cls(E, H, I, layout, fused.act_fn, device=gate_up.device, dtype=gate_up.dtype)
        if not gate_up.is_meta:
            with torch.no_grad():
                for e in range(E):
                    expert = split.expert(e)
                    getattr(expert, layout.gate).weight.copy_(gate_up[e, :I])
                    getattr(expert, layout.up).weight.copy_(gate_up[e, I:])
                    getattr(expert, layout.down).weight.copy_(down[e])
        return split

    def fuse_weights(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """In ``tensors`` (a state dict by full name; this module is ``name``), replace the dense weights of these
        experts with the fused parameters transformers' module holds: how a checkpoint stores experts left
        unquantized, so that the loader, which splits only quantized experts, finds what its model expects."""
        L = self.layout
        tensors[f"{name}.gate_up_proj"] = torch.stack([
            torch.cat([tensors.pop(f"{name}.{e}.{L.gate}.weight"), tensors.pop(f"{name}.{e}.{L.up}.weight")])
            for e in range(self.num_experts)])
        tensors[f"{name}.down_proj"] = torch.stack([tensors.pop(f"{name}.{e}.{L.down}.weight")
                                                    for e in range(self.num_experts)])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        # transformers' eager experts loop (e.g. MixtralExperts.forward), one expert's linears at a time
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)  # [E, k, T]
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        gate, up, down = self.layout.gate, self.layout.up, self.layout.down
        for e in hit:
            expert = self.expert(e)
            top_k_pos, token_idx = torch.where(mask[e])
            x = hidden_states[token_idx]
            h = self.act_fn(getattr(expert, gate)(x)) * getattr(expert, up)(x)
            h = getattr(expert, down)(h) * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, h.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, layout={self.layout}"


def split_experts(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace the fused experts modules of ``model`` (those in ``names``; all by default) with
    :class:`SplitExperts`; returns the names replaced."""
    fused = fused_experts(model)
    names = sorted(fused) if names is None else names
    if not names:
        return []
    for name in names:
        _check_fused(name, fused[name])
    layout = expert_layout(model, f"{names[0]} ({type(fused[names[0]]).__name__})")
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                SplitExperts.from_fused(name, fused[name], layout))
    return names
