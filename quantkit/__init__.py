"""quantkit: post-training quantization of large language models.

``import quantkit`` registers the ``quantkit`` quantization method with transformers, so that
``AutoModelForCausalLM.from_pretrained(DIR)`` loads a folder written by ``quantkit quantize``.
"""

from __future__ import annotations

from quantkit.errors import QuantkitError, RecipeError
from quantkit.hf import QuantkitConfig, register
from quantkit.nn import QuantizedLinear
from quantkit.scheme import LayerScheme

__all__ = ["LayerScheme", "QuantizedLinear", "QuantkitConfig", "QuantkitError", "RecipeError", "__version__"]
__version__ = "0.1.0"

register()
