"""``quantize``: the library entry point of ``quantkit quantize`` (DESIGN.md, "The pipeline").

It checks everything the user could get wrong before writing anything, then runs the layer walk
(quantkit.calibration.walk) with the quantize step and any extra steps, and assembles the checkpoint
(quantkit.assemble). Rerunning the same command after an interruption resumes at the next layer
(quantkit.resume) and produces the same bytes; the output folder is assembled beside ``out`` and renamed into
place at the end.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.assemble import assemble, check_out, fingerprint
from quantkit.calibration.capture import capture_inputs
from quantkit.calibration.quantize import QuantizeStep
from quantkit.calibration.steps import LayerStep
from quantkit.calibration.walk import LayerWalk
from quantkit.checkpoint import REPORT_NAME
from quantkit.config.recipe import Recipe, load_recipe
from quantkit.data import calibration_ids, load_calibration_texts
from quantkit.errors import QuantkitError
from quantkit.loading import CheckpointReader, ModelSource, check_causal_lm, load_tokenizer, resolve_model
from quantkit.model import build_skeleton, decoder_layers, linears, load_into
from quantkit.resume import Progress

__all__ = ["QuantizeOutput", "quantize"]

logger = logging.getLogger(__name__)


@dataclass
class QuantizeOutput:
    out: Path
    report: dict[str, Any]
    model: nn.Module | None = None  # the quantized model in memory, when asked for
    skipped: bool = False  # the output already held this exact result


def quantize(
    model: str | None,
    recipe: str | Path | Recipe,
    out: str | Path,
    *,
    calib: str = "c4",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    device: str = "cpu",
    overwrite: bool = False,
    data_dir: str | Path | None = None,
    keep_model: bool = False,
    progress: bool = True,
    steps: list[LayerStep] | None = None,
) -> QuantizeOutput:
    """Quantize ``model`` with ``recipe`` into the folder ``out``; ``steps`` run after the quantize step on each
    layer (quantkit.calibration.steps). See the module docstring."""
    t0 = time.time()
    out = Path(out).expanduser().resolve()
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    extra = list(steps or [])
    source, dev, calib_info, fp = _plan(model, recipe, extra, calib=calib, nsamples=nsamples, seqlen=seqlen,
                                        seed=seed, device=device)
    if check_out(out, fp, overwrite):
        logger.info("%s already holds this exact result; nothing to do", out)
        return QuantizeOutput(out, json.loads((out / REPORT_NAME).read_text()), skipped=True)

    ids = None
    if calib_info is not None:
        ids = calibration_ids(load_tokenizer(source), load_calibration_texts(calib, data_dir), nsamples=nsamples,
                              seqlen=seqlen, seed=seed)
    else:
        load_tokenizer(source)  # a folder without a usable tokenizer fails here, before anything is written
    reader = CheckpointReader(source.folder)
    skeleton = build_skeleton(source, dev)
    layers_name, layers = decoder_layers(skeleton)
    schemes = recipe.resolve([n for i, layer in enumerate(layers) for n in linears(layer, f"{layers_name}.{i}")])
    if not schemes:
        raise QuantkitError(f"recipe {recipe.name!r} quantizes no linear layer of this model")

    # Everything the user could get wrong has been checked: from here on, files are written.
    progress_dir = Progress(out, fp)
    start = progress_dir.next_layer
    # Embeddings, final norm, head: everything outside the decoder layers (tied weights are absent here).
    non_layer = reader.load([k for k in reader.keys() if not k.startswith(layers_name + ".")])
    load_into(skeleton, non_layer, dev, "model", complete=False)
    calib_data = capture_inputs(skeleton, layers, ids, dev) if ids is not None else None
    walk = LayerWalk(skeleton, layers_name, layers, reader, [QuantizeStep(schemes), *extra], progress_dir, dev,
                     calib_data, keep_model)
    records = walk.run(desc=f"quantize ({recipe.name})", show=progress)

    info = {"fingerprint": fp, "calibration": calib_info, "resumed_at_layer": start}
    report = assemble(out, source, reader, recipe, schemes, progress_dir, len(layers), records, info, t0)
    progress_dir.remove()
    if keep_model:
        skeleton.tie_weights()
    return QuantizeOutput(out, report, model=skeleton if keep_model else None)


def _plan(model: str | None, recipe: Recipe, steps: list[LayerStep], *, calib: str, nsamples: int, seqlen: int,
          seed: int, device: str) -> tuple[ModelSource, torch.device, dict[str, Any] | None, str]:
    """Check the arguments and name the run: the model, the device, the calibration settings (None when no step
    needs data) and the fingerprint that decides whether an output or partial progress is this run's."""
    if nsamples < 1 or seqlen < 2:
        raise QuantkitError("--nsamples must be >= 1 and --seqlen >= 2")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QuantkitError("--device cuda asked for, but no CUDA device is available")
    source = resolve_model(model)
    check_causal_lm(source.config)
    needs_calib = recipe.needs_calibration or any(s.needs_calibration for s in steps)
    calib_info = {"calib": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed} if needs_calib else None
    fp = fingerprint(source, recipe, calib_info or {}, dev.type, [[s.name, s.fingerprint()] for s in steps])
    return source, dev, calib_info, fp
