"""What the model feeds its decoder layers: the calibration batch's hidden states at the first layer, and the
keyword arguments (masks, position embeddings) the model passes each layer, captured in one forward of the
model with every layer stood in for; and running a layer over them.

The keyword arguments are captured per layer, not once at the first layer: models mixing attention types give
each layer its own (Gemma-2/3, Qwen2/3 with ``use_sliding_window``: a sliding-window or a full causal mask by
``config.layer_types[i]``; Gemma-3: local or global rotary embeddings by layer type as well)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantkit.errors import QuantkitError

__all__ = ["CHUNK_TOKENS", "Calibration", "capture_inputs", "run_layer"]

# Sequences per forward chunk: bounds activation memory (attention and MLP intermediates) per layer call.
CHUNK_TOKENS = 8192


@dataclass
class Calibration:
    hidden: list[torch.Tensor]  # per chunk [b, seqlen, hidden]: the current layer's inputs
    # per layer, per chunk: what the model passes that layer besides its hidden states (tensors shared between
    # layers of one type are one object, stored once)
    kwargs: list[list[dict[str, Any]]] = field(default_factory=list)


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for decoder layer ``index``: records its keyword arguments (and, at the first layer, its hidden
    states), returns the hidden states unchanged, and stops the forward after the last layer."""

    def __init__(self, layer: nn.Module, index: int, last: bool, calib: Calibration):
        super().__init__()
        self.layer, self.index, self.last, self.calib = layer, index, last, calib

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)  # e.g. `attention_type`, read by the model's loop

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise QuantkitError(f"decoder layer {self.index} called with positional arguments beyond "
                                "hidden_states; unsupported")
        if self.index == 0:
            self.calib.hidden.append(hidden_states)
        self.calib.kwargs[self.index].append(kwargs)
        if self.last:
            raise _Stop
        return hidden_states


def capture_inputs(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, device: torch.device) -> Calibration:
    """The first layer's inputs and every layer's keyword arguments for the calibration ``ids`` [n, seqlen], in
    chunks of at most ``CHUNK_TOKENS`` tokens. The layers themselves do not run (they may still be on the meta
    device); the model's own forward builds the masks and position embeddings."""
    per_chunk = max(1, CHUNK_TOKENS // ids.shape[1])
    calib = Calibration(hidden=[], kwargs=[[] for _ in layers])
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _Catcher(layer, i, i == len(originals) - 1, calib)
    try:
        with torch.no_grad():
            for chunk in ids.split(per_chunk):
                try:
                    model(input_ids=chunk.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    if not all(len(kw) == len(calib.hidden) for kw in calib.kwargs):
        raise QuantkitError("the model did not call each decoder layer once per forward; its layer loop is not "
                            "one the walk can follow")
    return calib


def run_layer(layer: nn.Module, calib: Calibration, *, keep_outputs: bool, index: int, after_chunk=None) -> None:
    """One pass of the calibration set through ``layer`` (decoder layer ``index``, whose keyword arguments it
    gets); ``keep_outputs``: its outputs become the next layer's inputs."""
    with torch.no_grad():
        for i, (h, kw) in enumerate(zip(calib.hidden, calib.kwargs[index], strict=True)):
            out = layer(h, **kw)
            if keep_outputs:
                calib.hidden[i] = out[0] if isinstance(out, tuple) else out
            if after_chunk is not None:
                after_chunk()
