"""The learned tables of a coupled-quantization KV cache, as plain tensors plus a small JSON header.

Safetensors keys: ``layers.{i}.keys.centroids`` and ``layers.{i}.values.centroids`` (fp16 [H, D/c, 2^(c·b), c]),
and, when the fit was weighted, ``layers.{i}.keys.weights`` / ``layers.{i}.values.weights`` (fp32 [H, D/c, c]).
The header (``to_dict``) holds the scheme, the layer count and how the tables were calibrated.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from quantkit.errors import QuantkitError
from quantkit.kvcache.scheme import CQScheme, parse_kv_scheme

__all__ = ["CQTables", "TABLES_VERSION"]

TABLES_VERSION = 1
_META_KEY = "quantkit_kv_cache"


@dataclass
class CQTables:
    scheme: CQScheme
    key_centroids: list[torch.Tensor]  # per layer [H, D/c, 2^(c·b), c] fp16
    value_centroids: list[torch.Tensor]
    key_weights: list[torch.Tensor] | None = None  # per layer [H, D/c, c], or None: unweighted
    value_weights: list[torch.Tensor] | None = None
    calibration: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.key_centroids)

    def table_bits(self) -> int:
        """Bits the tables occupy (what the bits count amortizes over the context)."""
        ts = [*self.key_centroids, *self.value_centroids, *(self.key_weights or []), *(self.value_weights or [])]
        return sum(t.numel() * t.element_size() * 8 for t in ts)

    def to_dict(self) -> dict[str, Any]:
        return {"version": TABLES_VERSION, "scheme": self.scheme.to_dict(), "num_layers": self.num_layers,
                "weighted": self.key_weights is not None, "calibration": self.calibration}

    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i in range(self.num_layers):
            out[f"layers.{i}.keys.centroids"] = self.key_centroids[i].contiguous()
            out[f"layers.{i}.values.centroids"] = self.value_centroids[i].contiguous()
            if self.key_weights is not None and self.value_weights is not None:
                out[f"layers.{i}.keys.weights"] = self.key_weights[i].contiguous()
                out[f"layers.{i}.values.weights"] = self.value_weights[i].contiguous()
        return out

    @classmethod
    def from_dict(cls, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> CQTables:
        if header.get("version") != TABLES_VERSION:
            raise QuantkitError(f"KV-cache tables version {header.get('version')!r} is not {TABLES_VERSION}")
        scheme = parse_kv_scheme(header["scheme"])
        if not isinstance(scheme, CQScheme):
            raise QuantkitError(f"KV-cache tables are for method {scheme.method!r}, not 'cq'")
        n = int(header["num_layers"])

        def get(name: str) -> torch.Tensor:
            if name not in tensors:
                raise QuantkitError(f"KV-cache tables lack tensor {name}")
            return tensors[name]

        kc = [get(f"layers.{i}.keys.centroids") for i in range(n)]
        vc = [get(f"layers.{i}.values.centroids") for i in range(n)]
        kw = [get(f"layers.{i}.keys.weights") for i in range(n)] if header.get("weighted") else None
        vw = [get(f"layers.{i}.values.weights") for i in range(n)] if header.get("weighted") else None
        for i, C in enumerate(kc + vc):
            if C.dim() != 4 or C.shape[2] != 2**scheme.code_bits or C.shape[3] != scheme.channels:
                raise QuantkitError(f"KV-cache table {i % n} has shape {tuple(C.shape)}, not "
                                    f"[H, D/{scheme.channels}, {2**scheme.code_bits}, {scheme.channels}]")
        return cls(scheme, kc, vc, kw, vw, dict(header.get("calibration") or {}))

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        save_file(self.state_dict(), str(path), metadata={_META_KEY: json.dumps(self.to_dict())})

    @classmethod
    def load(cls, path: str | os.PathLike) -> CQTables:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = (f.metadata() or {}).get(_META_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, ValueError) as e:
            raise QuantkitError(f"cannot read KV-cache tables {path} ({type(e).__name__}: {e})") from None
        if meta is None:
            raise QuantkitError(f"{path} holds no quantkit KV-cache tables (no '{_META_KEY}' header)")
        return cls.from_dict(json.loads(meta), tensors)
