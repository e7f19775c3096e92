"""The layer walk: the driver of calibration (DESIGN.md, "The pipeline").

Layer *i* is materialized from the checkpoint, the calibration batch runs through it once while the statistics
collectors its steps asked for accumulate, the steps run (quantize; measure; calibrate a KV cache), and the
layer runs again, as the steps left it, to produce the inputs of layer *i+1* (the sequential scheme of GPTQ).
When a step wants the keys and values the layer caches (``LayerStep.wants_kv``), that final pass records them
(also for the last layer, which otherwise needs no final pass) and hands them to the step's ``after_pass``.
Each finished layer is saved with :class:`quantkit.resume.Progress` and taken off the device, so memory holds
one layer plus the calibration activations.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quantkit.calibration.capture import Calibration, run_layer
from quantkit.calibration.steps import KVRecorder, LayerContext, LayerStep
from quantkit.errors import QuantkitError
from quantkit.loading import CheckpointReader
from quantkit.model import load_into
from quantkit.registry import COLLECTORS
from quantkit.resume import Progress

__all__ = ["LayerWalk"]

logger = logging.getLogger(__name__)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand the allocator's free memory back to the OS between layers. After a large block is freed, glibc raises
    its mmap threshold (up to 32 MiB), so the next layers' weights (4-50 MiB each) come from the heap, whose freed
    pages stay resident: without this, a run's resident memory grows by about one layer's weights per layer."""
    if (trim := _malloc_trim()) is not None:
        trim(0)


@dataclass
class LayerWalk:
    model: nn.Module  # skeleton: everything outside the decoder layers loaded, layers on the meta device
    layers_name: str
    layers: nn.ModuleList
    reader: CheckpointReader
    steps: list[LayerStep]
    progress: Progress
    device: torch.device
    calib: Calibration | None = None  # None: data-free steps only
    keep_model: bool = False  # keep finished layers in memory (the quantized model is returned)

    def run(self, *, desc: str = "quantize", show: bool = True) -> dict[str, dict[str, Any]]:
        """Walk every layer; returns each step's records by layer prefix: ``{step: {prefix: record}}``."""
        records: dict[str, dict[str, Any]] = {s.name: {} for s in self.steps}
        start = self.progress.next_layer
        if start > 0:
            logger.info("resuming at layer %d of %d from %s", start, len(self.layers), self.progress.dir)
            if self.calib is not None and start < len(self.layers):  # all done: only the assembly remains
                self.calib.hidden = self.progress.load_inputs(start, self.device)
        with tqdm(range(len(self.layers)), desc=desc, disable=not show) as bar:  # closed (a newline) on errors too
            for i in bar:
                ctx = self._context(i)
                bar.set_postfix_str(ctx.prefix)
                done = self._restore(ctx) if i < start else self._process(ctx)
                for name, rec in done.items():
                    records[name][ctx.prefix] = rec
                if not self.keep_model:
                    self.layers[i] = self.layers[i].to("meta")
                    release_freed_memory()
        return records

    def _context(self, i: int) -> LayerContext:
        return LayerContext(i, f"{self.layers_name}.{i}", self.layers[i], self.model, self.device,
                            calibrated=self.calib is not None, calib=self.calib)

    def _materialize(self, ctx: LayerContext) -> None:
        load_into(ctx.layer, self.reader.load_prefix(ctx.prefix + "."), self.device, ctx.prefix)

    def _restore(self, ctx: LayerContext) -> dict[str, Any]:
        if not self.keep_model:  # the tensors are read once, when the checkpoint is assembled
            return self.progress.load_records(ctx.index)
        ctx.tensors, records = self.progress.load_layer(ctx.index)
        self._materialize(ctx)
        for step in self.steps:
            step.restore(ctx, records[step.name])
        return records

    def _process(self, ctx: LayerContext) -> dict[str, Any]:
        self._materialize(ctx)
        stats = self._collect(ctx)
        records = {step.name: step.run(ctx, stats) for step in self.steps}
        del stats
        last = ctx.index == len(self.layers) - 1
        recording = [step for step in self.steps if step.wants_kv(ctx)]
        if recording and self.calib is None:
            raise QuantkitError(f"step {recording[0].name!r} wants the keys and values of {ctx.prefix} on the "
                                "calibration set, and this run has none")
        if self.calib is not None and (not last or recording):  # the final pass
            recorder = KVRecorder() if recording else None
            run_layer(self.layers[ctx.index], _with_cache(self.calib, ctx.index, recorder), keep_outputs=not last,
                      index=ctx.index)
            if not last and not all(torch.isfinite(h).all() for h in self.calib.hidden):
                raise QuantkitError(f"{ctx.prefix}: its outputs on the calibration batch hold NaN or inf, as "
                                    "quantized (the next layer would calibrate on them); refusing to go on")
            if recording:
                keys, values, positions = recorder.result(ctx.prefix)
                for step in recording:
                    records[step.name] = step.after_pass(ctx, records[step.name], keys, values, positions)
                del keys, values, positions, recorder
        next_inputs = self.calib.hidden if self.calib is not None and not last else None
        self.progress.save_layer(ctx.index, ctx.tensors, records, next_inputs)
        return records

    def _collect(self, ctx: LayerContext) -> dict[str, dict[str, Any]]:
        """One forward of the calibration batch through the layer with every requested collector attached."""
        wanted: dict[str, set[str]] = {}
        for step in self.steps:
            for name, linears in step.needs(ctx).items():
                wanted.setdefault(name, set()).update(linears)
        wanted = {k: v for k, v in wanted.items() if v}
        if self.calib is None or not wanted:
            return {}
        modules = dict(ctx.layer.named_modules())
        collectors = [COLLECTORS.get(name)(ctx.layer, {n: modules[n] for n in sorted(linears)}, self.device)
                      for name, linears in wanted.items()]

        def end_chunk() -> None:
            for c in collectors:
                c.end_chunk()

        with contextlib.ExitStack() as stack:
            for c in collectors:
                stack.enter_context(c.collecting())
            run_layer(ctx.layer, self.calib, keep_outputs=False, index=ctx.index, after_chunk=end_chunk)
        return {c.name: c.results() for c in collectors}


def _with_cache(calib: Calibration, index: int, cache: KVRecorder | None) -> Calibration:
    """``calib`` whose calls of layer ``index`` pass ``cache`` (it shares the hidden-states list, which the pass
    updates in place); ``calib`` itself when ``cache`` is None."""
    if cache is None:
        return calib
    kwargs = list(calib.kwargs)
    kwargs[index] = [{**{k: v for k, v in kw.items() if k != "past_key_values"}, "cache": cache}
                     for kw in calib.kwargs[index]]
    return replace(calib, kwargs=kwargs)
