"""quantkit: post-training quantization of large language models.

``import quantkit`` registers the built-in methods, quantizers, formats and statistics collectors
(quantkit.registry) and the ``quantkit`` quantization method with transformers, so that
``AutoModelForCausalLM.from_pretrained(DIR)`` loads a folder written by ``quantkit quantize``.
"""

from __future__ import annotations

from quantkit import algos as _algos  # noqa: F401  (registers rtn, gptq)
from quantkit import calibration as _calibration  # noqa: F401  (registers the statistics collectors)
from quantkit import codebooks as _codebooks  # noqa: F401  (registers vq)
from quantkit import formats as _formats  # noqa: F401  (registers quantkit-uniform)
from quantkit import quantizers as _quantizers  # noqa: F401  (registers the scalar grids)
from quantkit.config import LayerScheme, Recipe
from quantkit.errors import QuantkitError, RecipeError
from quantkit.hf import QuantkitConfig, register
from quantkit.kvcache import kv_cache
from quantkit.nn import QuantizedLinear

__all__ = ["LayerScheme", "QuantizedLinear", "QuantkitConfig", "QuantkitError", "Recipe", "RecipeError",
           "__version__", "kv_cache"]
__version__ = "0.1.0"

register()
