"""Per-layer progress of a quantization run, so an interrupted run resumes at its next layer.

``OUT.quantkit-partial/`` (quantkit.outdir) holds each finished layer's checkpoint tensors with its steps' records,
the next layer's calibration inputs, and ``state.json`` (the run's fingerprint and the next layer). A folder left by
a run with another fingerprint (other model weights, recipe, calibration text, settings, steps or format;
quantkit.fingerprint) is discarded, never mixed in. The files are written in the order layer, next inputs, state,
each atomically, so a run killed anywhere resumes at the first layer whose state was not written.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from quantkit.checkpoint import atomic_save_file, atomic_write_text

__all__ = ["Progress"]

logger = logging.getLogger(__name__)


class Progress:
    def __init__(self, folder: Path, fingerprint: str):
        self.dir = Path(folder)
        self.created = not self.dir.exists()
        state = self.dir / "state.json"
        if self.dir.exists() and self._stored_fingerprint(state) != fingerprint:
            logger.warning("discarding partial progress of a different run in %s", self.dir)
            shutil.rmtree(self.dir)
            self.created = True
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        if not state.is_file():
            self._write_state(0)
        self.next_layer: int = json.loads(state.read_text())["next_layer"]

    @staticmethod
    def _stored_fingerprint(state: Path) -> str | None:
        try:
            return json.loads(state.read_text()).get("fingerprint")
        except (OSError, json.JSONDecodeError):
            return None

    def _write_state(self, next_layer: int) -> None:
        atomic_write_text(self.dir / "state.json",
                          json.dumps({"fingerprint": self.fingerprint, "next_layer": next_layer}))

    def layer_file(self, i: int) -> Path:
        return self.dir / f"layer_{i:04d}.safetensors"

    def inputs_file(self, i: int) -> Path:
        return self.dir / f"inputs_{i:04d}.safetensors"

    def save_layer(self, i: int, tensors: dict[str, torch.Tensor], records: dict[str, Any],
                   next_inputs: list[torch.Tensor] | None) -> None:
        atomic_save_file({k: v.cpu() for k, v in tensors.items()}, self.layer_file(i),
                         metadata={"records": json.dumps(records)})
        if next_inputs is not None:
            atomic_save_file({f"chunk_{j:05d}": h.cpu().contiguous() for j, h in enumerate(next_inputs)},
                             self.inputs_file(i + 1))
        self._write_state(i + 1)
        self.inputs_file(i).unlink(missing_ok=True)
        self.next_layer = i + 1

    def load_layer(self, i: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The layer's checkpoint tensors and its records by step name."""
        with safe_open(self.layer_file(i), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["records"])

    def load_records(self, i: int) -> dict[str, Any]:
        """The layer's records by step name, without reading its tensors."""
        with safe_open(self.layer_file(i), "pt") as f:
            return json.loads(f.metadata()["records"])

    def load_inputs(self, i: int, device: torch.device) -> list[torch.Tensor]:
        with safe_open(self.inputs_file(i), "pt") as f:
            return [f.get_tensor(k).to(device) for k in sorted(f.keys())]

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
