"""Output of a quantization run: its fingerprint, the checks on the output folder, and the assembly of the
finished layers into a checkpoint folder (safetensors, config with ``quantization_config``, tokenizer files and
``quantkit_report.json``), published in one rename."""

from __future__ import annotations

import json
import logging
import resource
import time
from typing import Any

import torch

from quantkit.checkpoint import REPORT_NAME, copy_side_files, folder_size, guard_key, guard_tensor, write_shards
from quantkit.config.recipe import Recipe
from quantkit.config.scheme import LayerScheme
from quantkit.errors import QuantkitError
from quantkit.formats import get_format
from quantkit.hf.config import QuantkitConfig
from quantkit.loading import CheckpointReader, ModelSource
from quantkit.nn.experts import SplitExperts
from quantkit.outdir import OutputFolder
from quantkit.resume import Progress

__all__ = ["assemble", "stored_bits"]

logger = logging.getLogger(__name__)


def stored_bits(schemes: dict[str, LayerScheme], shapes: dict[str, list[int]],
                tensors: dict[str, torch.Tensor]) -> tuple[int, int, dict[str, int]]:
    """(stored bits, weights, bits by tensor name) of the quantized linears, each counted by its format
    (``Format.stored_bits_by_tensor``, whose sum is ``Format.stored_bits``). Each module's tensors are checked
    against its format's specs first: what is counted is what is written."""
    bits = weights = 0
    split: dict[str, int] = {}
    for name, scheme in schemes.items():
        out_features, in_features = shapes[name]
        fmt = get_format(scheme.format)
        for key, (shape, dtype) in fmt.layer_specs(scheme, in_features, out_features).items():
            t = tensors.get(f"{name}.{key}")
            if t is None or tuple(t.shape) != shape or t.dtype != dtype:
                raise QuantkitError(f"{name}.{key}: missing or not {dtype} {list(shape)}; refusing to publish")
        bias = tensors.get(f"{name}.bias")
        parts = fmt.stored_bits_by_tensor(scheme, in_features, out_features, bias.dtype if bias is not None else None)
        for key, b in parts.items():
            split[key] = split.get(key, 0) + b
        bits += sum(parts.values())
        weights += in_features * out_features
    return bits, weights, split


def assemble(out: OutputFolder, source: ModelSource, reader: CheckpointReader, recipe: Recipe,
             schemes: dict[str, LayerScheme], progress: Progress, nlayers: int, records: dict[str, Any],
             info: dict[str, Any], t0: float, *, overwrite: bool,
             dense_experts: dict[str, SplitExperts] | None = None) -> dict[str, Any]:
    """Write the checkpoint into ``out.tmp``, mark it complete and publish it (quantkit.outdir); returns the report.
    A run killed in here leaves its progress, from which the next run assembles again. ``dense_experts``: MoE
    experts the recipe leaves unquantized, stored fused as the model holds them (quantkit.nn.experts)."""
    with out.build(info["fingerprint"], overwrite) as tmp:
        tensors = reader.load([k for k in reader.keys() if k not in {f"{n}.weight" for n in schemes}])
        for i in range(nlayers):
            tensors.update(progress.load_layer(i)[0])
        for name, experts in (dense_experts or {}).items():
            experts.fuse_weights(name, tensors)
        layers = {n: s for per_layer in records["quantize"].values() for n, s in per_layer.items()}
        bits, weights, split = stored_bits(schemes, {n: layers[n]["shape"] for n in schemes}, tensors)
        kv = _kv_cache(recipe, tensors, nlayers, info, tmp)
        if schemes:
            tensors[guard_key(schemes)] = guard_tensor()  # transformers without quantkit refuses the folder
        write_shards(tensors, tmp)
        config = json.loads((source.folder / "config.json").read_text())
        config["quantization_config"] = QuantkitConfig.for_schemes(schemes, recipe.name, kv).to_dict()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_side_files(source.folder, tmp)
        report = {
            **info,
            "model": str(source.name),
            "recipe": recipe.to_dict(),
            "formats": {s.format: get_format(s.format).version for s in schemes.values()},
            "bits_per_weight": bits / weights if weights else None,
            "bits_per_weight_by_tensor": {k: b / weights for k, b in sorted(split.items())} if weights else None,
            "quantized_weights": weights,
            "quantized_bits": bits,
            "size_on_disk_bytes": folder_size(tmp),
            "seconds": time.time() - t0,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "layers": layers,
            "steps": {k: v for k, v in records.items() if k != "quantize"},
        }
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    logger.info("wrote %s: %s bits per weight, %.1f MB, %.0f s", out.out,
                "-" if not weights else f"{report['bits_per_weight']:.3f}", report["size_on_disk_bytes"] / 1e6,
                report["seconds"])
    return report


def _kv_cache(recipe: Recipe, tensors: dict[str, torch.Tensor], nlayers: int, info: dict[str, Any],
              folder) -> dict[str, Any] | None:
    """The recipe's KV-cache scheme for ``quantization_config``; CQ tables (left among ``tensors`` by the
    KV-cache step) moved into their own file (quantkit.kvcache.stored)."""
    if recipe.kv_cache is None:
        return None
    from quantkit.kvcache.scheme import CQScheme
    from quantkit.kvcache.stored import config_entry, tables_from_tensors, write_tables

    tables = None
    if isinstance(recipe.kv_cache, CQScheme):
        calib = {**(info.get("calibration") or {}), "model": "quantized layers",
                 "keys": "pre-RoPE" if recipe.kv_cache.pre_rope else "post-RoPE"}
        tables = tables_from_tensors(recipe.kv_cache, tensors, nlayers, calib)
        write_tables(tables, folder)
    return config_entry(recipe.kv_cache, tables)
