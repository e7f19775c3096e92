"""``HfQuantizer`` for quantkit checkpoints: swaps ``nn.Linear`` for ``QuantizedLinear`` on the meta device
before the weights load, so the packed tensors fill the new modules directly.

Loading is strict. transformers warns about a missing tensor and initializes it at random, and drops an unexpected
one; for a quantized checkpoint either means running on weights it does not have (a missing ``scales``, a module
left out of ``quantization_config`` whose dense weight is then random). So before any weight loads, the headers of
the checkpoint files are checked against the model (quantkit.hf.checks.check_tensors): every tensor present with its
shape and dtype, nothing else, or one ``QuantkitError`` naming the tensor."""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from quantkit.checkpoint import guard_key, guard_tensor
from quantkit.config.scheme import LayerScheme
from quantkit.errors import QuantkitError
from quantkit.hf.checks import check_checkpoint
from quantkit.hf.config import QUANT_METHOD, QuantkitConfig
from quantkit.nn import QuantizedLinear
from quantkit.nn.experts import fused_experts, split_experts

__all__ = ["QuantkitHfQuantizer", "register", "replace_linears"]

logger = logging.getLogger(__name__)


def replace_linears(model: nn.Module, schemes: dict[str, LayerScheme], *, device: str = "meta") -> None:
    """Replace each named ``nn.Linear`` with an empty ``QuantizedLinear`` of the given scheme. Fused MoE experts
    holding quantized linears are split into per-expert linears first, as ``quantkit quantize`` stored them
    (quantkit.nn.experts)."""
    fused = fused_experts(model)
    split_experts(model, sorted({a for n in schemes for a in _ancestors(n) if a in fused}))
    for name, scheme in schemes.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as e:
            raise QuantkitError(f"quantized module {name!r} does not exist in this model") from e
        if isinstance(module, QuantizedLinear):
            continue
        if not isinstance(module, nn.Linear):
            raise QuantkitError(f"quantized module {name!r} is a {type(module).__name__}, not a Linear")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        dtype = module.weight.dtype
        new = QuantizedLinear(
            module.in_features, module.out_features, scheme, bias=module.bias is not None, device=device, dtype=dtype
        )
        setattr(parent, child, new)


def _ancestors(name: str) -> list[str]:
    """``a.b.c`` -> ``["a.b", "a"]``."""
    out = []
    while "." in name:
        name = name.rpartition(".")[0]
        out.append(name)
    return out


class QuantkitHfQuantizer(HfQuantizer):
    """Loads pre-quantized quantkit checkpoints (quantizing happens in ``quantkit quantize``)."""

    requires_calibration = True
    quantization_config: QuantkitConfig

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        schemes = self.quantization_config.schemes()
        replace_linears(model, schemes)
        files = [Path(f) for f in checkpoint_files or ()]
        self.folder = files[0].parent if files else None  # where a stored KV cache's tables are
        if files and all(f.suffix == ".safetensors" for f in files):  # a state dict in memory has no headers
            check_checkpoint(model, files)
        if schemes:  # a KV-only folder has no quantized linear, and no guard
            # The guard (quantkit.checkpoint.guard_key), checked above, has no parameter to load into.
            ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())  # a set in transformers 5
            model._keys_to_ignore_on_load_unexpected = ignore | {f"^{re.escape(guard_key(schemes))}$"}

    def _process_model_after_weight_loading(self, model, **kwargs):
        entry = self.quantization_config.kv_cache
        if entry is not None:  # the stored KV cache becomes the default one (quantkit.kvcache.stored)
            from quantkit.kvcache.stored import load_stored, save_tables_with, use_kv_cache

            if getattr(self, "folder", None) is None:
                raise QuantkitError("this checkpoint quantizes the KV cache, whose tables are read from its folder; "
                                    "load it from a folder of safetensors files")
            scheme, tables = load_stored(self.folder, entry, model.config)
            use_kv_cache(model, scheme, tables)
            if tables is not None:  # save_pretrained keeps them: its config still names their file
                save_tables_with(model, tables)
        # LoRA on the packed layers (quantkit.hf.peft): PEFT is optional, and imported only when installed.
        if importlib.util.find_spec("peft") is not None:
            from quantkit.hf.peft import register as register_peft

            try:
                register_peft()
            except QuantkitError as e:  # a PEFT whose internals moved: loading still works, LoRA does not
                logger.warning("%s", e)
        return model

    def get_state_dict_and_metadata(self, model):
        """``save_pretrained`` writes the guard too (quantkit.checkpoint.guard_key)."""
        names = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
        state_dict = model.state_dict()
        if names:
            state_dict[guard_key(names)] = guard_tensor()
        return state_dict, {}

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """Adapters train on top of the frozen packed weights (quantkit.hf.peft); transformers' Trainer accepts a
        quantized model only with adapters attached. The packed weights themselves do not train
        (``is_qat_trainable`` stays False)."""
        return True


def register() -> None:
    """Register the config and quantizer with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(QuantkitConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(QuantkitHfQuantizer)
