"""Export to compressed-tensors' ``pack-quantized`` format (``quant_method: "compressed-tensors"``), which
transformers loads through its ``CompressedTensorsHfQuantizer`` and vLLM serves with its WNA16 kernels.

What a quantized linear ``{m}`` becomes (compressed-tensors' ``PackedQuantizationCompressor``):

- ``{m}.weight_packed`` int32 [out, ceil(in·b/32)]: signed codes ``q = code − 2^(b−1)`` in original column order,
  packed by compressed-tensors' own ``pack_to_int32``;
- ``{m}.weight_scale`` fp16 [out, in/G] (strategy ``group``, G columns per group) or [out, 1] (``channel``):
  quantkit's fp16 scales, unchanged;
- ``{m}.weight_zero_point`` int32 [ceil(out·b/32), in/G], asymmetric grids only: ``zp = zero − 2^(b−1)``, packed
  along the output dimension (``pack_to_int32(..., packed_dim=0)``); symmetric grids store none (zp = 0);
- ``{m}.weight_shape`` int64 [2] = (out, in); the bias, if any, unchanged.

compressed-tensors dequantizes ``(q − zp) · scale``, quantkit ``scale · (code − zero)`` (quantkit.formats.uniform):
the same integers and the same fp16 scale. Rounding enters only in the loader's arithmetic. transformers'
``dequantize`` path (which this export asks for, below) multiplies in the stored scale's dtype, float16: each weight
is the float16 rounding of quantkit's exact product (relative error at most 2^-11), identical to quantkit's own
float16 load. Its default path multiplies in the model's dtype: exact in float32, the scale first rounded in bfloat16.

Groups must tile the original column order, G columns each, G dividing ``in``. A quantkit layout that is not literally
that is re-expressed exactly where it can be: each original column's group (``g_idx[perm[j]] = j // g`` with
act-order, ``i // g`` without) is spread over the largest G dividing ``in`` on whose aligned runs it is constant,
scales and zeros repeated to match. SmolLM2's 576 = 4·128 + 64 columns in groups of 128 become 9 groups of 64.
Act-order with groups in processing order (the stored ``perm``) has no such runs in general, and compressed-tensors
0.20 removed the per-column ``g_idx`` that carried it (actorder ``"group"``): a re-expression that would more than
double a layer's scales is refused, as are rotations (an online transform transformers does not apply), non-uniform
grids and codebooks.

The loader's constraints (transformers 5.24, compressed-tensors 0.20.1): its default path cannot read packed
asymmetric zero points (it allocates them unpacked and refuses the checkpoint's as a size mismatch), and its
``dequantize`` path decompresses every dense layer with one config group's scheme. So layers of one bit width and
symmetry share one group size where that stays within the bound (SmolLM2: 64 for every layer); an export with one
config group asks for ``dequantize``; several groups load only through the default path, so only if symmetric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from quantkit.config.scheme import LayerScheme
from quantkit.errors import QuantkitError
from quantkit.export import ExportTarget, Source, register_target
from quantkit.formats.packing import unpack_codes
from quantkit.quantizers.groups import group_size_of, num_groups

__all__ = ["CompressedTensorsTarget", "column_groups", "run_length"]

MAX_SCALE_GROWTH = 2  # a re-expression may store at most this many times a layer's scales and zeros


def column_groups(perm: torch.Tensor | None, group_size: int, in_features: int) -> torch.Tensor:
    """``g_idx`` [in] int64: the group of each original column. Groups are runs of ``group_size`` stored columns,
    and stored column ``j`` is original column ``perm[j]`` (identity without act-order's permutation)."""
    stored = torch.arange(in_features) // group_size_of(group_size, in_features)
    return stored if perm is None else torch.empty_like(stored).index_copy_(0, perm.long(), stored)


def run_length(g_idx: torch.Tensor) -> int:
    """The largest ``G`` dividing ``len(g_idx)`` such that ``g_idx`` is constant on each aligned run of ``G``."""
    n = g_idx.numel()
    for d in (d for d in range(n, 0, -1) if n % d == 0):
        runs = g_idx.view(-1, d)
        if bool((runs == runs[:, :1]).all()):
            return d
    raise AssertionError("unreachable: runs of one column are constant")


@dataclass
class _Layer:
    """One quantized linear in compressed-tensors' terms: ``G`` columns per group (``in``: one per row, strategy
    ``channel``), and for each exported group the source group whose scale and zero it repeats."""

    bits: int
    symmetric: bool
    in_features: int
    source_groups: int  # groups per row in the source
    g_idx: torch.Tensor  # [in] the source group of each original column
    G: int

    @property
    def groups(self) -> torch.Tensor:
        return self.g_idx[:: self.G]

    def args(self) -> dict[str, Any]:
        channel = self.G == self.in_features
        return {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric,
                "strategy": "channel" if channel else "group", "group_size": None if channel else self.G,
                "dynamic": False}


def _refuse(name: str, why: str) -> QuantkitError:
    return QuantkitError(f"cannot export {name} to compressed-tensors: {why}")


def _check_scheme(name: str, scheme: LayerScheme) -> None:
    """Refuse what pack-quantized cannot hold at all, whatever the layer's shape."""
    q = scheme.quantizer
    if scheme.rotation.active:
        raise _refuse(name, f"its weight is stored rotated (rotation {scheme.rotation.kind.value}) and needs the "
                            "rotation applied to its input online; pack-quantized stores the unrotated weight, and "
                            "transformers does not apply compressed-tensors transforms")
    if scheme.format != "quantkit-uniform":
        raise _refuse(name, f"format {scheme.format!r} ({q.name} quantizer) is not a scalar integer grid; "
                            "pack-quantized stores integer codes with a scale per group")
    if q.name != "uniform":
        raise _refuse(name, f"its grid {q.name!r} is non-uniform (a table of levels); pack-quantized stores "
                            "uniform integer grids only")
    if not 1 <= q.bits <= 8:
        raise _refuse(name, f"{q.bits}-bit codes; pack-quantized packs 1 to 8 bits")


def _layer(name: str, scheme: LayerScheme, in_features: int, perm: torch.Tensor | None, version: str) -> _Layer:
    """The layer's finest exact layout, or a refusal naming it."""
    q = scheme.quantizer
    ng = num_groups(q.group_size, in_features)
    g_idx = column_groups(perm, q.group_size, in_features)
    layer = _Layer(q.bits, q.symmetric, in_features, ng, g_idx, run_length(g_idx))
    if layer.groups.numel() > MAX_SCALE_GROWTH * ng:
        g = group_size_of(q.group_size, in_features)
        if perm is not None:
            cause = (f"its {ng} groups of {g} columns are runs in act-order's processing order (the stored perm), "
                     f"not in the original column order, and compressed-tensors {version} has no per-column g_idx "
                     "(actorder 'group' was removed); re-quantize with static_groups: true (compressed-tensors' "
                     "actorder 'weight')")
        else:
            cause = (f"{in_features} columns in groups of {g} leave a last group of {in_features % g}, and "
                     "compressed-tensors needs a group size dividing the columns")
        raise _refuse(name, f"{cause}; the exact re-expression needs groups of {layer.G} column(s), "
                            f"{layer.groups.numel()} scales per row instead of {ng} (more than {MAX_SCALE_GROWTH}x)")
    return layer


def _share_group_sizes(layers: dict[str, _Layer]) -> None:
    """Grouped layers of one bit width and symmetry take one group size, the gcd of theirs, when no layer's scales
    then grow past the bound (transformers' dequantize path reads every layer with one scheme)."""
    kinds: dict[tuple[int, bool], list[_Layer]] = {}
    for layer in layers.values():
        if layer.G != layer.in_features:
            kinds.setdefault((layer.bits, layer.symmetric), []).append(layer)
    for same in kinds.values():
        G = math.gcd(*(lay.G for lay in same))
        if all(lay.in_features // G <= MAX_SCALE_GROWTH * lay.source_groups for lay in same):
            for lay in same:
                lay.G = G


@dataclass
class _Plan:
    layers: dict[str, _Layer]
    groups: list[tuple[dict[str, Any], list[str]]]  # (weight args, module names) per config group
    dequantize: bool  # ask transformers to decompress at load (one config group)


def _import_ct():
    try:
        import compressed_tensors
        from compressed_tensors.compressors.pack_quantized import pack_to_int32
    except ImportError as e:
        raise QuantkitError("--to compressed-tensors needs the compressed-tensors package "
                            "(pip install 'quantkit[export]')") from e
    return compressed_tensors, pack_to_int32


@register_target
class CompressedTensorsTarget(ExportTarget):
    name = "compressed-tensors"
    version = 1
    description = "compressed-tensors pack-quantized (transformers, vLLM): uniform integer grids of 1-8 bits"

    def plan(self, source: Source) -> _Plan:
        ct, _ = _import_ct()
        names = [n for n in source.linears if n in source.schemes]  # the model's order: layer 0's first
        for name in names:  # what no layout can fix first, so that the message names the real obstacle
            _check_scheme(name, source.schemes[name])
        keys = set(source.reader.keys())
        layers = {}
        for name in names:
            perm = source.reader.load([f"{name}.perm"])[f"{name}.perm"] if f"{name}.perm" in keys else None
            layers[name] = _layer(name, source.schemes[name], source.linears[name][1], perm, ct.__version__)
        _share_group_sizes(layers)
        groups: dict[str, tuple[dict[str, Any], list[str]]] = {}
        for name, layer in layers.items():
            args = layer.args()
            groups.setdefault(repr(sorted(args.items())), (args, []))[1].append(name)
        plan = _Plan(layers, list(groups.values()), dequantize=len(groups) == 1)
        if not plan.dequantize and not all(args["symmetric"] for args, _ in plan.groups):
            (a, (first, *_)), (b, (second, *_)) = plan.groups[:2]
            raise _refuse(second, f"it needs another scheme than {first} ({_describe(b)} against {_describe(a)}), "
                                  f"and transformers' compressed-tensors loader (with compressed-tensors "
                                  f"{ct.__version__}) reads asymmetric pack-quantized layers under one scheme only")
        return plan

    def write(self, source: Source, plan: _Plan):
        ct, pack_to_int32 = _import_ct()
        from compressed_tensors.base import (
            COMPRESSION_VERSION_NAME,
            QUANTIZATION_METHOD,
            QUANTIZATION_METHOD_NAME,
            SPARSITY_CONFIG_NAME,
            TRANSFORM_CONFIG_NAME,
        )
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

        tensors: dict[str, torch.Tensor] = {}
        for name, layer in plan.layers.items():
            out_features = source.linears[name][0]
            tensors.update(_pack_layer(name, layer, source.module_tensors(name), out_features, pack_to_int32))
        config_groups = {f"group_{i}": QuantizationScheme(targets=names, weights=QuantizationArgs(**args))
                         for i, (args, names) in enumerate(plan.groups)}
        ignore = sorted(n for n in source.linears if n not in plan.layers)  # the other Linears stay dense (lm_head)
        qc = QuantizationConfig(config_groups=config_groups, format="pack-quantized",
                                quantization_status="compressed", ignore=ignore)
        # The layout of compressed-tensors' own ModelCompressor.update_config.
        qconfig = {COMPRESSION_VERSION_NAME: ct.__version__, QUANTIZATION_METHOD_NAME: QUANTIZATION_METHOD,
                   SPARSITY_CONFIG_NAME: {}, TRANSFORM_CONFIG_NAME: {}, **qc.model_dump(exclude={"quant_method"})}
        if plan.dequantize:  # a loading attribute of transformers' CompressedTensorsConfig; vLLM ignores it
            qconfig["dequantize"] = True
        summary = {"compressed_tensors_version": ct.__version__, "format": "pack-quantized",
                   "config_groups": {k: {"weights": args, "modules": len(names)}
                                     for k, (args, names) in zip(config_groups, plan.groups, strict=True)},
                   # layers stored with more groups per row than the source (split groups, same scales)
                   "regrouped": {n: {"groups_per_row": lay.groups.numel(), "source_groups_per_row": lay.source_groups}
                                 for n, lay in plan.layers.items() if lay.groups.numel() != lay.source_groups}}
        return tensors, qconfig, summary


def _describe(args: dict[str, Any]) -> str:
    size = "per channel" if args["strategy"] == "channel" else f"groups of {args['group_size']}"
    return f"{args['num_bits']}-bit {'symmetric' if args['symmetric'] else 'asymmetric'}, {size}"


def _pack_layer(name: str, layer: _Layer, t: dict[str, torch.Tensor], out_features: int,
                pack_to_int32) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quantized linear (see the module docstring)."""
    half = 2 ** (layer.bits - 1)
    codes = unpack_codes(t["qweight"], layer.bits, layer.in_features, torch.int16)  # [out, in], stored order
    if "perm" in t:  # stored column j is original column perm[j]
        codes = torch.empty_like(codes).index_copy_(1, t["perm"].long(), codes)
    groups = layer.groups
    out = {
        f"{name}.weight_packed": pack_to_int32((codes - half).to(torch.int8), layer.bits),
        f"{name}.weight_scale": t["scales"][:, groups].contiguous(),
        f"{name}.weight_shape": torch.tensor([out_features, layer.in_features], dtype=torch.int64),
    }
    if not layer.symmetric:
        zp = t["zeros"][:, groups].float() - half
        if not torch.equal(zp, zp.round()) or zp.min() < -half or zp.max() >= half:
            raise QuantkitError(f"{name}.zeros: not integers in [0, {2 * half}) as the format requires")
        out[f"{name}.weight_zero_point"] = pack_to_int32(zp.to(torch.int8), layer.bits, packed_dim=0)
    return out
