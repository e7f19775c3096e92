"""Bits per weight of a quantkit folder, split by stored tensor and recounted from the safetensors headers.

    python benchmarks/bits_split.py QDIR

Reports written since ``bits_per_weight_by_tensor`` existed hold the same split; this recounts it for older folders
and checks it against the report's total. The guard tensor (README: a ``[1]`` ``weight`` under the first quantized
linear) is no weight's data and is not counted, as in ``bits_per_weight``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from safetensors import safe_open

BITS = {"F16": 16, "BF16": 16, "F32": 32, "I8": 8, "U8": 8, "I16": 16, "I32": 32, "I64": 64}


def split(folder: Path) -> tuple[dict[str, float], float]:
    """(bits per weight by tensor name, the report's bits per weight)."""
    modules = json.loads((folder / "config.json").read_text())["quantization_config"]["modules"]
    report = json.loads((folder / "quantkit_report.json").read_text())
    stored: dict[str, tuple[list[int], str]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                s = h.get_slice(k)
                stored[k] = (s.get_shape(), s.get_dtype())
    bits: dict[str, int] = {}
    weights = 0
    for name in modules:
        out_features, in_features = report["layers"][name]["shape"]
        weights += out_features * in_features
        for key, (shape, dtype) in stored.items():
            tail = key[len(name) + 1 :]
            if key.startswith(name + ".") and "." not in tail and tail != "weight":
                bits[tail] = bits.get(tail, 0) + math.prod(shape) * BITS[dtype]
    return {k: v / weights for k, v in sorted(bits.items())}, report["bits_per_weight"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    parts, total = split(p.parse_args().folder)
    print("  ".join(f"{k} {v:.4f}" for k, v in parts.items()) + f"  total {sum(parts.values()):.4f} "
          f"(report: {total:.4f})")


if __name__ == "__main__":
    main()
