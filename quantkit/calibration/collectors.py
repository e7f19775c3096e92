"""Statistics collectors: named accumulators that watch a decoder layer's linears during the calibration forward.

A layer step asks for statistics by collector name and the linears it wants them for (``LayerStep.needs``); the
walk builds each requested collector once per layer, attaches them all, runs the calibration batch through the
layer once, and hands every step the results (``{collector: {linear: statistic}}``). Adding a statistic is
adding a file: a :class:`Collector` subclass registered with ``@register_collector(name)``.

- ``hessian``: ``H = 2 X Xᵀ / n`` of each linear's input (linears fed the same tensor share one accumulator).
- ``attention_hessian``: for value projections, one Hessian per key/value head with each token weighted by the
  attention it receives (quantkit.algos.attention); a projection whose attention cannot be observed is left out,
  with a warning, and its user falls back to the plain Hessian.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from quantkit.algos.attention import HeadHessianAccumulator, recording_attention, value_heads
from quantkit.algos.hessian import HessianAccumulator
from quantkit.registry import COLLECTORS

__all__ = ["AttentionHessianCollector", "Collector", "HessianCollector", "register_collector"]

logger = logging.getLogger(__name__)


def register_collector(name: str):
    """Class decorator: register a :class:`Collector` subclass under ``name`` (and set its ``name``)."""

    def wrap(cls: type[Collector]) -> type[Collector]:
        cls.name = name
        COLLECTORS.add(name, cls)
        return cls

    return wrap


class Collector:
    """Accumulates one statistic for ``linears`` (local names within ``layer``) over the calibration forward."""

    name: ClassVar[str] = ""

    def __init__(self, layer: nn.Module, linears: dict[str, nn.Linear], device: torch.device):
        self.layer, self.linears, self.device = layer, linears, device

    @contextlib.contextmanager
    def collecting(self) -> Iterator[None]:
        """Observe the forward passes run inside this context (install hooks, remove them after)."""
        handles = [m.register_forward_hook(self._hook(n)) for n, m in self.linears.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, name: str):
        def fn(_mod, inputs, _out):
            self.observe(name, inputs[0])

        return fn

    def observe(self, name: str, x: torch.Tensor) -> None:
        """The input ``x`` [..., in] of linear ``name`` in one forward chunk (the tensor itself, not a copy:
        linears that read the same input see the same object)."""

    def end_chunk(self) -> None:
        """Called after each chunk of the calibration batch."""

    def results(self) -> dict[str, Any]:
        """The statistic of each linear, by local name."""
        raise NotImplementedError


@register_collector("hessian")
class HessianCollector(Collector):
    def __init__(self, layer: nn.Module, linears: dict[str, nn.Linear], device: torch.device):
        super().__init__(layer, linears, device)
        self.acc: dict[str, HessianAccumulator] = {}
        self.alias: dict[str, str] = {}
        self._last: tuple[torch.Tensor | None, str | None] = (None, None)

    def observe(self, name: str, x: torch.Tensor) -> None:
        last_x, owner = self._last
        if x is last_x:  # the same tensor as the previous linear's input (q/k/v, gate/up): share its Hessian
            self.alias[name] = owner
            return
        if name not in self.acc:
            self.acc[name] = HessianAccumulator(x.shape[-1], self.device)
        self.acc[name].add(x.detach())
        self._last = (x, name)

    def end_chunk(self) -> None:
        self._last = (None, None)

    def results(self) -> dict[str, torch.Tensor]:
        acc = {**self.acc, **{name: self.acc[owner] for name, owner in self.alias.items()}}
        return {name: a.H for name, a in acc.items()}


@register_collector("attention_hessian")
class AttentionHessianCollector(Collector):
    """Per-head attention-weighted Hessians [heads, in, in] of value projections (quantkit/algos/attention.py)."""

    def __init__(self, layer: nn.Module, linears: dict[str, nn.Linear], device: torch.device):
        super().__init__(layer, linears, device)
        self.acc: dict[str, HeadHessianAccumulator] = {}
        self.parents: dict[str, nn.Module] = {}
        for name, linear in linears.items():
            parent = layer.get_submodule(name.rpartition(".")[0])
            heads = value_heads(parent, linear)
            if heads is None:
                logger.warning("%s: attention layout not recognized; using the unweighted Hessian", name)
                continue
            self.acc[name] = HeadHessianAccumulator(heads, linear.in_features, device)
            self.parents[name] = parent
        self._pending: dict[nn.Module, torch.Tensor] = {}

    @contextlib.contextmanager
    def collecting(self) -> Iterator[None]:
        handles = [self.linears[n].register_forward_hook(self._remember(p)) for n, p in self.parents.items()]
        callbacks = {p: self._weigh(n, p) for n, p in self.parents.items()}
        try:
            with recording_attention(callbacks):
                yield
        finally:
            for h in handles:
                h.remove()

    def _remember(self, attn: nn.Module):
        def fn(_mod, inputs, _out):
            self._pending[attn] = inputs[0].detach()

        return fn

    def _weigh(self, name: str, attn: nn.Module):
        def fn(received: torch.Tensor) -> None:
            self.acc[name].add(self._pending.pop(attn), received)

        return fn

    def results(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, acc in self.acc.items():
            if acc.n == 0:
                logger.warning("%s: its attention does not run through transformers' attention interface; "
                               "using the unweighted Hessian", name)
            else:
                out[name] = acc.H
        return out
