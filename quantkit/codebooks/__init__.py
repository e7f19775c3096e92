"""Codebook quantizers: each code indexes a vector of ``dim`` weights in a learned table (VPTQ, AQLM, QuIP#).
They plug into the quantizer protocol (quantkit.quantizers) with ``codesz = dim``, so GPTQ's OBS loop rounds
``dim`` columns at a time and feeds their error forward, as it does for scalar grids."""

from __future__ import annotations

from quantkit.codebooks import aq as _aq  # noqa: F401  (registers "aq")
from quantkit.codebooks import vq as _vq  # noqa: F401  (registers "vq")
from quantkit.codebooks.aq import AQQuantizer, AQSpec
from quantkit.codebooks.vq import VQQuantizer, VQSpec, weighted_kmeans

__all__ = ["AQQuantizer", "AQSpec", "VQQuantizer", "VQSpec", "weighted_kmeans"]
