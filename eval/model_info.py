"""What an evaluated model is: its method, bits per weight and size on disk (DESIGN.md, "What the numbers mean").

A quantkit checkpoint carries both figures in ``quantkit_report.json`` (every stored bit of the quantized linears
over their weights; the folder's size). A checkpoint without the report (e.g. re-saved with
``save_pretrained``) is measured the same way from its loaded ``QuantizedLinear`` modules. An unquantized model's
bits per weight is the stored width of its decoder layers' linear weights (32 for float32, 16 for bf16/fp16),
and its size is that of its folder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from quantkit.checkpoint import REPORT_NAME, folder_size
from quantkit.hf.config import QUANT_METHOD
from quantkit.loading import CheckpointReader, ModelSource
from quantkit.model import decoder_layers
from quantkit.nn import QuantizedLinear

__all__ = ["ModelInfo", "describe_model", "quantized_bits"]

logger = logging.getLogger(__name__)

_SAFETENSORS_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "I8": 8, "U8": 8}


@dataclass
class ModelInfo:
    method: str  # recipe name (+ " + finetune N steps"), "unquantized", or another tool's quant_method
    quantized: bool
    bits_per_weight: float | None
    size_on_disk_bytes: int
    format: str | None = None  # the packed format (quantkit checkpoints)
    stored_dtype: str | None = None  # unquantized: the linear weights' dtype on disk

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quantization_config(model) -> dict[str, Any] | None:
    q = getattr(model.config, "quantization_config", None)
    if q is None:
        return None
    return q if isinstance(q, dict) else q.to_dict()


def quantized_bits(model: nn.Module) -> tuple[int, int]:
    """(stored bits, weights) over the model's ``QuantizedLinear`` modules, each counted by its format
    (``Format.stored_bits``: the format's tensors, rotation signs and bias), as ``quantkit quantize`` counts them."""
    bits = weights = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            bits += m.stored_bits()
            weights += m.in_features * m.out_features
    return bits, weights


def _decoder_linear_bits(source: ModelSource, model: nn.Module) -> tuple[float | None, str | None]:
    """Mean stored width of the decoder layers' linear weights, read from the safetensors headers."""
    try:
        prefix, layers = decoder_layers(model)
        names = [f"{prefix}.{i}.{n}.weight" for i, layer in enumerate(layers)
                 for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
        weight_map = CheckpointReader(source.folder).weight_map
    except Exception as e:  # an unusual layout: say so in the log, report no figure rather than a wrong one
        logger.warning("cannot measure the stored width of %s's linear weights: %s", source.name, e)
        return None, None
    bits = weights = 0
    dtypes = set()
    by_file: dict[str, list[str]] = {}
    for k in names:
        if k in weight_map:
            by_file.setdefault(weight_map[k], []).append(k)
    for fname, keys in by_file.items():
        with safe_open(source.folder / fname, "pt") as h:
            for k in keys:
                s = h.get_slice(k)
                dtype, n = s.get_dtype(), int(torch.tensor(s.get_shape()).prod())
                if dtype not in _SAFETENSORS_BITS:
                    return None, dtype
                dtypes.add(dtype)
                bits += _SAFETENSORS_BITS[dtype] * n
                weights += n
    if weights == 0:
        return None, None
    return bits / weights, "/".join(sorted(dtypes))


def _formats(qcfg: dict[str, Any]) -> str:
    """The checkpoint's formats with their versions, e.g. ``quantkit-uniform v2``."""
    if qcfg.get("version", 0) < 3:
        return f"{qcfg.get('format')} v{qcfg.get('version')}"
    found = {(m["format"]["name"], m["format"]["version"]) for m in qcfg.get("modules", {}).values()}
    return ", ".join(f"{name} v{version}" for name, version in sorted(found))


def describe_model(source: ModelSource, model: nn.Module) -> ModelInfo:
    qcfg = _quantization_config(model)
    if qcfg is not None and qcfg.get("quant_method") == QUANT_METHOD:
        report_path = source.folder / REPORT_NAME
        method = qcfg.get("recipe") or "quantkit"
        if report_path.is_file():
            report = json.loads(report_path.read_text())
            bpw, size = report["bits_per_weight"], report["size_on_disk_bytes"]
            tuned = report.get("finetune")
            if isinstance(tuned, dict):  # quantkit finetune: same recipe and bits, other values; say so in the row
                method += f" + finetune {tuned.get('settings', {}).get('steps', '?')} steps"
        else:
            bits, weights = quantized_bits(model)
            bpw, size = (bits / weights if weights else None), folder_size(source.folder)
        return ModelInfo(method=method, quantized=True, bits_per_weight=bpw, size_on_disk_bytes=size,
                         format=_formats(qcfg))
    size = folder_size(source.folder)
    if qcfg is not None:  # another tool's checkpoint: name it, without guessing its bit count
        return ModelInfo(method=str(qcfg.get("quant_method")), quantized=True, bits_per_weight=None,
                         size_on_disk_bytes=size)
    bpw, dtype = _decoder_linear_bits(source, model)
    return ModelInfo(method="unquantized", quantized=False, bits_per_weight=bpw, size_on_disk_bytes=size,
                     stored_dtype=dtype)
