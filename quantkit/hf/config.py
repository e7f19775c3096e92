"""``config.json["quantization_config"]`` of a quantkit checkpoint."""

from __future__ import annotations

from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from quantkit.errors import QuantkitError
from quantkit.formats import FORMAT_NAME, FORMAT_VERSION
from quantkit.scheme import LayerScheme

__all__ = ["QuantkitConfig", "QUANT_METHOD"]

QUANT_METHOD = "quantkit"


class QuantkitConfig(QuantizationConfigMixin):
    """The format, its version and the resolved scheme of every quantized linear, keyed by module name."""

    def __init__(
        self,
        modules: dict[str, dict[str, Any]] | None = None,
        format: str = FORMAT_NAME,
        version: int = FORMAT_VERSION,
        recipe: str | None = None,
        quant_method: str = QUANT_METHOD,
        **kwargs: Any,
    ):
        if quant_method != QUANT_METHOD:
            raise QuantkitError(f"not a quantkit config: quant_method={quant_method!r}")
        self.quant_method = QUANT_METHOD
        self.format = format
        self.version = version
        self.recipe = recipe
        self.modules = dict(modules or {})
        self.post_init()

    def post_init(self) -> None:
        if self.format != FORMAT_NAME:
            raise QuantkitError(f"unknown quantkit format {self.format!r}; this quantkit reads {FORMAT_NAME!r}")
        if not isinstance(self.version, int) or self.version > FORMAT_VERSION:
            raise QuantkitError(
                f"checkpoint format version {self.version} is newer than this quantkit supports "
                f"({FORMAT_VERSION}); upgrade quantkit"
            )
        self.schemes()  # validate every entry now, not at first forward

    def schemes(self) -> dict[str, LayerScheme]:
        return {name: LayerScheme.from_dict(d) for name, d in self.modules.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "format": self.format,
            "version": self.version,
            "recipe": self.recipe,
            "modules": {k: dict(v) for k, v in self.modules.items()},
        }
