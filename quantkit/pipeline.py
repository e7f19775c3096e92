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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.assemble import assemble
from quantkit.calibration.capture import capture_inputs
from quantkit.calibration.kvcache import KVCacheStep
from quantkit.calibration.quantize import QuantizeStep
from quantkit.calibration.steps import LayerStep
from quantkit.calibration.walk import LayerWalk
from quantkit.checkpoint import REPORT_NAME
from quantkit.config.recipe import Recipe, load_recipe
from quantkit.data import calibration_ids, load_calibration_texts
from quantkit.errors import QuantkitError, RecipeError
from quantkit.fingerprint import fingerprint, text_digest
from quantkit.formats import get_format
from quantkit.loading import CheckpointReader, ModelSource, check_causal_lm, load_tokenizer, resolve_model
from quantkit.model import RenamedCheckpoint, build_skeleton, decoder_layers, linears, load_into
from quantkit.nn.experts import SplitExperts
from quantkit.outdir import OutputFolder
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
    out = Path(out).expanduser().absolute()
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    kv_steps = [KVCacheStep(recipe.kv_cache, seed=seed)] if recipe.kv_cache is not None else []
    extra = kv_steps + list(steps or [])
    plan = _plan(model, recipe, extra, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, device=device,
                 data_dir=data_dir)
    folder = OutputFolder(out)
    folder.check_not_source(*plan.sources)
    folder.holds(plan.fingerprint, overwrite)  # refuse at once, before taking the lock (checked again under it)
    skeleton = build_skeleton(plan.source, plan.device)
    reader = RenamedCheckpoint(CheckpointReader(plan.source.folder), skeleton)
    layers_name, layers = decoder_layers(skeleton)
    schemes = _schemes(recipe, skeleton, layers_name, layers, plan.source.config, nsamples * seqlen)
    _check_complete(skeleton, reader)

    # Everything the user could get wrong has been checked: from here on, files are written, under the lock.
    with folder:
        folder.recover()
        if folder.holds(plan.fingerprint, overwrite):
            shutil.rmtree(folder.partial, ignore_errors=True)  # a run killed after publishing, before cleaning up
            logger.info("%s already holds this exact result; nothing to do", out)
            return QuantizeOutput(out, json.loads((out / REPORT_NAME).read_text()), skipped=True)
        done = Progress(folder.partial, plan.fingerprint)
        start = done.next_layer
        try:
            # Embeddings, final norm, head: everything outside the decoder layers (tied weights are absent here).
            non_layer = reader.load([k for k in reader.keys() if not k.startswith(layers_name + ".")])
            load_into(skeleton, non_layer, plan.device, "model", complete=False)
            calib_data = capture_inputs(skeleton, layers, plan.ids, plan.device) if plan.ids is not None else None
            walk = LayerWalk(skeleton, layers_name, layers, reader, [QuantizeStep(schemes), *extra], done,
                             plan.device, calib_data, keep_model)
            records = walk.run(desc=f"quantize ({recipe.name})", show=progress)
        except QuantkitError:
            if done.created:  # bad input found on the way: leave nothing behind
                done.remove()
            raise
        info = {"fingerprint": plan.fingerprint, "calibration": plan.calib_info, "resumed_at_layer": start}
        dense = {n: m for n, m in skeleton.named_modules()
                 if isinstance(m, SplitExperts) and not any(k.startswith(n + ".") for k in schemes)}
        report = assemble(folder, plan.source, reader, recipe, schemes, done, len(layers), records, info, t0,
                          overwrite=overwrite, dense_experts=dense)
        done.remove()
    if keep_model:
        _as_loaded(skeleton, plan.source.config, recipe, out)
    return QuantizeOutput(out, report, model=skeleton if keep_model else None)


def _schemes(recipe: Recipe, skeleton: nn.Module, layers_name: str, layers: nn.ModuleList, config,
             calib_tokens: int) -> dict[str, Any]:
    """The recipe's scheme for each linear it quantizes, each checked against the layer's shape (and the KV-cache
    section against the model); refuses a recipe that quantizes nothing."""
    shapes = {n: m for i, layer in enumerate(layers) for n, m in linears(layer, f"{layers_name}.{i}").items()}
    schemes = recipe.resolve(list(shapes))
    if not schemes and recipe.kv_cache is None:
        raise QuantkitError(f"recipe {recipe.name!r} quantizes no linear layer of this model")
    if recipe.kv_cache is not None:
        _check_kv(recipe, config, calib_tokens)
    for name, scheme in schemes.items():
        try:
            get_format(scheme.format).check_layer(scheme, shapes[name].in_features, shapes[name].out_features)
        except RecipeError as e:
            raise RecipeError(f"recipe {recipe.name!r}: {name}: {e}") from None
    _check_experts(skeleton, schemes)
    return schemes


def _as_loaded(skeleton: nn.Module, source_config, recipe: Recipe, out: Path) -> None:
    """The model kept in memory made to behave as ``from_pretrained(out)`` would: tied weights, the source's
    ``use_cache`` (off for the walk only) and the stored KV cache attached."""
    skeleton.tie_weights()
    skeleton.config.use_cache = source_config.use_cache
    if recipe.kv_cache is not None:
        from quantkit.kvcache.stored import load_stored, use_kv_cache

        config = json.loads((out / "config.json").read_text())
        use_kv_cache(skeleton, *load_stored(out, config["quantization_config"]["kv_cache"], skeleton.config))


def _check_experts(skeleton: nn.Module, schemes: dict[str, Any]) -> None:
    """Each MoE block's experts are quantized all or none: a loader splits fused experts into per-expert linears
    only for quantized ones, and transformers merges dense per-expert weights back into fused parameters."""
    for name, m in skeleton.named_modules():
        if isinstance(m, SplitExperts):
            inner = [f"{name}.{n}" for n, lin in m.named_modules() if isinstance(lin, nn.Linear)]
            left = [n for n in inner if n not in schemes]
            if left and len(left) < len(inner):
                raise RecipeError(f"the recipe quantizes some expert linears of {name} but not {left[0]} "
                                  f"({len(left)} of {len(inner)} left out): quantize all of a block's experts, or "
                                  "none")


def _check_kv(recipe: Recipe, config, tokens: int) -> None:
    """The recipe's KV-cache scheme fits the model, and CQ has calibration vectors enough to fill its tables."""
    from quantkit.kvcache.cache import _check_full_attention, head_dim_of

    where = f"recipe {recipe.name!r}"
    try:
        recipe.kv_cache.check_model(head_dim_of(config))
    except RecipeError as e:
        raise RecipeError(f"{where}: {e}") from None
    try:
        _check_full_attention(config, recipe.kv_cache)
    except QuantkitError as e:
        raise RecipeError(f"{where}: {e}") from None
    need = 2 ** getattr(recipe.kv_cache, "code_bits", 0)
    if recipe.kv_cache.method == "cq" and tokens < need:
        raise QuantkitError(f"{where}: kv_cache {recipe.kv_cache.label} fits tables of {need} centroids; "
                            f"--nsamples x --seqlen gives {tokens} calibration tokens")


def _check_complete(skeleton: nn.Module, reader: CheckpointReader) -> None:
    """Every parameter of the model is in the checkpoint with its shape, before any work: a missing norm or
    embedding would otherwise be published as whatever a loader initializes, a missing layer tensor found late."""
    tied = set(getattr(skeleton, "all_tied_weights_keys", None) or {})
    shapes = reader.shapes()
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        if name in tied:
            continue
        if name not in shapes:
            raise QuantkitError(f"{reader.folder}: the checkpoint lacks {name}")
        if list(shapes[name]) != list(p.shape):
            raise QuantkitError(f"{reader.folder}: {name} is {list(shapes[name])} in the checkpoint, the model's "
                                f"config makes it {list(p.shape)}")


@dataclass
class _Plan:
    source: ModelSource
    sources: list[Path]  # what --out may not touch: the model folder, and the file or folder the user named
    device: torch.device
    calib_info: dict[str, Any] | None  # None when no step needs data
    ids: torch.Tensor | None  # calibration token ids
    fingerprint: str


def _plan(model: str | None, recipe: Recipe, steps: list[LayerStep], *, calib: str, nsamples: int, seqlen: int,
          seed: int, device: str, data_dir: str | Path | None) -> _Plan:
    """Check the arguments, read the calibration data and name the run (quantkit.fingerprint)."""
    if nsamples < 1 or seqlen < 2:
        raise QuantkitError("--nsamples must be >= 1 and --seqlen >= 2")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QuantkitError("--device cuda asked for, but no CUDA device is available")
    source = resolve_model(model)
    config = source.config
    check_causal_lm(config)
    tokenizer = load_tokenizer(source)  # a folder without a usable tokenizer fails here, before anything is written
    needs_calib = recipe.needs_calibration or any(s.needs_calibration for s in steps)
    calib_info = ids = None
    if needs_calib:
        limit = getattr(config.get_text_config(), "max_position_embeddings", None)
        if limit is not None and seqlen > limit:
            raise QuantkitError(f"--seqlen {seqlen} is longer than the model's position limit "
                                f"(max_position_embeddings = {limit})")
        texts = load_calibration_texts(calib, data_dir)
        ids = calibration_ids(tokenizer, texts, nsamples=nsamples, seqlen=seqlen, seed=seed)
        calib_info = {"calib": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
        digest = {"nsamples": nsamples, "seqlen": seqlen, "seed": seed, "text_sha256": text_digest(texts)}
    fp = fingerprint(source, recipe, digest if needs_calib else {}, dev.type,
                     [[s.name, s.fingerprint()] for s in steps])
    named = Path(str(model)).expanduser() if model is not None else None
    sources = [source.folder] + ([named] if named is not None and named.exists() else [])
    return _Plan(source, sources, dev, calib_info, ids, fp)
