"""The calibration pipeline: walk a causal LM's decoder layers in order, quantize each layer's linears per the
recipe, and write a packed checkpoint (DESIGN.md, "The pipeline").

Layer *i* is materialized from the checkpoint, fed the calibration activations while hooks accumulate each
linear's Hessian, quantized, then run again with its quantized weights to produce the inputs of layer *i+1*
(the sequential scheme of GPTQ). Each finished layer's packed tensors and the next layer's inputs are written to
``{out}.quantkit-partial/``, so rerunning the same command after an interruption resumes at the next layer and
produces the same bytes. The output folder is assembled beside ``out`` and renamed into place at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from quantkit.algos import get_method
from quantkit.algos.attention import HeadHessianAccumulator, recording_attention, value_heads
from quantkit.algos.hessian import HessianAccumulator, output_error
from quantkit.checkpoint import (
    REPORT_NAME,
    atomic_save_file,
    atomic_write_text,
    copy_side_files,
    folder_size,
    publish,
    write_shards,
)
from quantkit.data import calibration_ids, load_calibration_texts
from quantkit.errors import QuantkitError
from quantkit.formats import FORMAT_NAME, FORMAT_VERSION, UniformFormat
from quantkit.hf.config import QuantkitConfig
from quantkit.loading import CheckpointReader, ModelSource, check_causal_lm, load_tokenizer, resolve_model
from quantkit.nn import QuantizedLinear
from quantkit.recipe import Recipe, load_recipe
from quantkit.rotations import HadamardRotation, random_signs
from quantkit.scheme import LayerScheme

__all__ = ["QuantizeOutput", "quantize", "decoder_layers"]

logger = logging.getLogger(__name__)

# Sequences per forward chunk: bounds activation memory (attention and MLP intermediates) per layer call.
CHUNK_TOKENS = 8192


@dataclass
class QuantizeOutput:
    out: Path
    report: dict[str, Any]
    model: nn.Module | None = None  # the quantized model in memory, when asked for
    skipped: bool = False  # the output already held this exact result


@dataclass
class _Calibration:
    hidden: list[torch.Tensor]  # per chunk [b, seqlen, hidden]
    kwargs: list[dict[str, Any]] = field(default_factory=list)  # per chunk: what the model passes each layer


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for layer 0 to record what the model feeds its decoder layers, then stops the forward."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)  # e.g. `attention_type`, read by the model's loop

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise QuantkitError("decoder layer called with positional arguments beyond hidden_states; unsupported")
        self.captured.append((hidden_states, kwargs))
        raise _Stop


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers: the one with ``num_hidden_layers`` entries."""
    n = model.config.get_text_config().num_hidden_layers
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n and name.endswith("layers"):
            return name, m
    raise QuantkitError(f"cannot find the decoder layers of {type(model).__name__} (a ModuleList of {n} layers)")


def _fingerprint(source: ModelSource, recipe: Recipe, calib: dict[str, Any], device: str) -> str:
    cfg = json.loads((source.folder / "config.json").read_text())
    blob = json.dumps(
        {"model": str(source.name), "config": cfg, "recipe": recipe.to_dict(), "calibration": calib,
         "device": device, "format": [FORMAT_NAME, FORMAT_VERSION]},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _check_out(out: Path, fingerprint: str, overwrite: bool) -> bool:
    """True when ``out`` already holds exactly this result. Raises if it holds something else."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise QuantkitError(f"output path exists and is not a folder: {out}")
    if not any(out.iterdir()):
        return False
    report = out / REPORT_NAME
    if report.is_file():
        try:
            if json.loads(report.read_text()).get("fingerprint") == fingerprint:
                return True
        except json.JSONDecodeError:
            pass
    if not overwrite:
        raise QuantkitError(
            f"output folder {out} already holds a different model; pass --overwrite to replace it"
        )
    return False


def _skeleton(source: ModelSource, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    config = source.config
    config.use_cache = False
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    for b in model.buffers():
        if b.is_meta:
            raise QuantkitError("model has buffers that cannot be built without weights; unsupported architecture")
    return model.to(device) if device.type != "cpu" else model


def _load_into(module: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device, what: str,
               *, complete: bool = True) -> None:
    """Assign checkpoint tensors (floats as fp32) to a meta-initialized module; ``complete``: all must be there."""
    tensors = {k: v.to(device=device, dtype=torch.float32 if v.is_floating_point() else v.dtype)
               for k, v in tensors.items()}
    _, unexpected = module.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise QuantkitError(f"{what}: checkpoint has tensors the model does not: {unexpected[:3]}")
    still_meta = [n for n, p in module.named_parameters() if p.is_meta]
    if complete and still_meta:
        raise QuantkitError(f"{what}: checkpoint lacks tensors for {still_meta[:3]}")


def _linears(layer: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    return {f"{prefix}.{n}": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _run_layer(layer: nn.Module, calib: _Calibration, *, keep_outputs: bool) -> None:
    for i, (h, kw) in enumerate(zip(calib.hidden, calib.kwargs, strict=True)):
        out = layer(h, **kw)
        if keep_outputs:
            calib.hidden[i] = out[0] if isinstance(out, tuple) else out


def _accumulate_hessians(layer: nn.Module, linears: dict[str, nn.Linear], calib: _Calibration,
                         device: torch.device, weighted: set[str] = frozenset()) -> dict[str, Any]:
    """One forward of the calibration set through ``layer``; linears fed the same tensor share a Hessian.

    The value projections named in ``weighted`` get per-head attention-weighted Hessians instead
    (quantkit/algos/attention.py); one whose attention cannot be observed keeps the plain Hessian.
    """
    acc: dict[str, Any] = {}
    alias: dict[str, str] = {}
    last: dict[str, Any] = {"x": None, "owner": None}
    head_acc: dict[str, HeadHessianAccumulator] = {}
    pending: dict[nn.Module, torch.Tensor] = {}
    callbacks: dict[nn.Module, Any] = {}

    def hook(name: str):
        def fn(_mod, inputs, _out):
            x = inputs[0]
            if x is last["x"]:
                alias[name] = last["owner"]
                return
            if name not in acc:
                acc[name] = HessianAccumulator(x.shape[-1], device)
            acc[name].add(x.detach())
            last["x"], last["owner"] = x, name

        return fn

    def remember(attn: nn.Module):
        def fn(_mod, inputs, _out):
            pending[attn] = inputs[0].detach()

        return fn

    def weigh(name: str, attn: nn.Module):
        def fn(received: torch.Tensor) -> None:
            head_acc[name].add(pending.pop(attn), received)

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    for name in weighted:
        parent = layer.get_submodule(name.rpartition(".")[0])
        heads = value_heads(parent, linears[name])
        if heads is None:
            logger.warning("%s: attention layout not recognized; using the unweighted Hessian", name)
            continue
        head_acc[name] = HeadHessianAccumulator(heads, linears[name].in_features, device)
        handles.append(linears[name].register_forward_hook(remember(parent)))
        callbacks[parent] = weigh(name, parent)
    try:
        with torch.no_grad(), recording_attention(callbacks):
            for h, kw in zip(calib.hidden, calib.kwargs, strict=True):
                layer(h, **kw)
                last["x"] = None
    finally:
        for hd in handles:
            hd.remove()
    for name, owner in alias.items():
        acc[name] = acc[owner]
    for name, ha in head_acc.items():
        if ha.n == 0:
            logger.warning("%s: its attention does not run through transformers' attention interface; "
                           "using the unweighted Hessian", name)
        else:
            acc[name] = ha
    return acc


def _layer_rotations(name: str, scheme: LayerScheme, W: torch.Tensor) -> dict[str, HadamardRotation]:
    """The rotations a scheme asks for, keyed by the name of their stored signs; seeded by layer name."""
    if scheme.rotation == "none":
        return {}
    out_features, in_features = W.shape
    rots = {"rot_in_signs": HadamardRotation(random_signs(in_features, scheme.rotation_seed, name), "input")}
    if scheme.rotate_output:
        signs = random_signs(out_features, scheme.rotation_seed, name + ":output")
        rots["rot_out_signs"] = HadamardRotation(signs, "output")
    return rots


def _quantize_linear(name: str, linear: nn.Linear, scheme: LayerScheme, H: torch.Tensor | None):
    W = linear.weight.detach().float()
    method = get_method(scheme.method)
    rots = _layer_rotations(name, scheme, W)
    if "rot_out_signs" in rots and H is not None and H.dim() == 3:
        raise QuantkitError(f"{name}: an output rotation mixes the heads of a per-head Hessian")
    # Rounding happens in the rotated basis. The rotations are orthogonal, so the weight error and the layer
    # objective measured there (with H rotated alike) are those of the original basis: no need to rotate back.
    for rot in rots.values():
        W = rot.fuse(W)
        if rot.side == "input" and H is not None:
            H = rot.rotate_hessian(H)
    try:
        result = method.fn(W, H, scheme)
    except QuantkitError as e:
        raise QuantkitError(f"{name}: {e}") from None
    packed = UniformFormat.pack(result, scheme, rotations={k: r.signs for k, r in rots.items()})
    stats: dict[str, Any] = {
        "method": scheme.method, "bits": scheme.bits, "group_size": scheme.group_size, "grid": scheme.grid,
        "shape": list(W.shape), "loss": result.loss,
        "weight_mse": (W - result.W_hat).pow(2).mean().item(),
    }
    for rot in rots.values():
        stats["rotation_" + rot.side] = rot.layout.describe()
    if H is not None:
        err = output_error(W, result.W_hat, H)
        base = output_error(W, torch.zeros_like(W), H)
        stats["output_error"] = err
        stats["relative_output_error"] = err / base if base > 0 else 0.0
    return packed, stats


class _Progress:
    """``{out}.quantkit-partial/``: finished layers' tensors, the next layer's inputs, and a state file."""

    def __init__(self, out: Path, fingerprint: str):
        self.dir = out.with_name(out.name + ".quantkit-partial")
        state = self.dir / "state.json"
        if self.dir.exists():
            ok = False
            if state.is_file():
                try:
                    ok = json.loads(state.read_text()).get("fingerprint") == fingerprint
                except json.JSONDecodeError:
                    ok = False
            if not ok:
                logger.warning("discarding partial progress of a different run in %s", self.dir)
                shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        if not state.is_file():
            self._write_state(0)
        self.next_layer: int = json.loads(state.read_text())["next_layer"]

    def _write_state(self, next_layer: int) -> None:
        atomic_write_text(self.dir / "state.json",
                          json.dumps({"fingerprint": self.fingerprint, "next_layer": next_layer}))

    def layer_file(self, i: int) -> Path:
        return self.dir / f"layer_{i:04d}.safetensors"

    def inputs_file(self, i: int) -> Path:
        return self.dir / f"inputs_{i:04d}.safetensors"

    def save_layer(self, i: int, packed: dict[str, torch.Tensor], stats: dict[str, Any],
                   next_inputs: list[torch.Tensor] | None) -> None:
        atomic_save_file({k: v.cpu() for k, v in packed.items()}, self.layer_file(i),
                         metadata={"stats": json.dumps(stats)})
        if next_inputs is not None:
            atomic_save_file({f"chunk_{j:05d}": h.cpu().contiguous() for j, h in enumerate(next_inputs)},
                             self.inputs_file(i + 1))
        self._write_state(i + 1)
        self.inputs_file(i).unlink(missing_ok=True)
        self.next_layer = i + 1

    def load_layer(self, i: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        with safe_open(self.layer_file(i), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["stats"])

    def load_inputs(self, i: int, device: torch.device) -> list[torch.Tensor]:
        with safe_open(self.inputs_file(i), "pt") as f:
            return [f.get_tensor(k).to(device) for k in sorted(f.keys())]


def _capture_inputs(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, device: torch.device) -> _Calibration:
    per_chunk = max(1, CHUNK_TOKENS // ids.shape[1])
    catcher = _Catcher(layers[0])
    layers[0] = catcher
    try:
        with torch.no_grad():
            for chunk in ids.split(per_chunk):
                try:
                    model(input_ids=chunk.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        layers[0] = catcher.layer
    return _Calibration(hidden=[h for h, _ in catcher.captured], kwargs=[kw for _, kw in catcher.captured])


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
) -> QuantizeOutput:
    """Quantize ``model`` with ``recipe`` into the folder ``out``; see the module docstring."""
    t0 = time.time()
    out = Path(out).expanduser().resolve()
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if nsamples < 1 or seqlen < 2:
        raise QuantkitError("--nsamples must be >= 1 and --seqlen >= 2")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QuantkitError("--device cuda asked for, but no CUDA device is available")
    source = resolve_model(model)
    check_causal_lm(source.config)
    needs_calib = recipe.needs_calibration
    calib_info = {"calib": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed} if needs_calib else None
    fingerprint = _fingerprint(source, recipe, calib_info or {}, dev.type)
    if _check_out(out, fingerprint, overwrite):
        logger.info("%s already holds this exact result; nothing to do", out)
        return QuantizeOutput(out, json.loads((out / REPORT_NAME).read_text()), skipped=True)

    tokenizer = load_tokenizer(source)
    ids = None
    if needs_calib:
        texts = load_calibration_texts(calib, data_dir)
        ids = calibration_ids(tokenizer, texts, nsamples=nsamples, seqlen=seqlen, seed=seed)

    reader = CheckpointReader(source.folder)
    skeleton = _skeleton(source, dev)
    layers_name, layers = decoder_layers(skeleton)
    linear_names = [n for i, layer in enumerate(layers) for n in _linears(layer, f"{layers_name}.{i}")]
    schemes = recipe.resolve(linear_names)
    if not schemes:
        raise QuantkitError(f"recipe {recipe.name!r} quantizes no linear layer of this model")

    # Everything the user could get wrong has been checked: from here on, files are written.
    progress_dir = _Progress(out, fingerprint)
    start = progress_dir.next_layer
    # Embeddings, final norm, head: everything outside the decoder layers (tied weights are absent here).
    non_layer = reader.load([k for k in reader.keys() if not k.startswith(layers_name + ".")])
    _load_into(skeleton, non_layer, dev, "model", complete=False)

    calib_data = None
    if needs_calib:
        calib_data = _capture_inputs(skeleton, layers, ids, dev)
        if start > 0:
            calib_data.hidden = progress_dir.load_inputs(start, dev)
    if start > 0:
        logger.info("resuming at layer %d of %d from %s", start, len(layers), progress_dir.dir)

    all_stats: dict[str, Any] = {}
    bar = tqdm(range(len(layers)), desc=f"quantize ({recipe.name})", disable=not progress)
    for i in bar:
        prefix = f"{layers_name}.{i}"
        bar.set_postfix_str(prefix)
        if i < start:
            packed, stats = progress_dir.load_layer(i)
            all_stats.update(stats)
            if keep_model:
                _materialize_quantized(skeleton, layers, i, prefix, reader, schemes, packed, dev)
            continue
        layer = layers[i]
        _load_into(layer, reader.load_prefix(prefix + "."), dev, prefix)
        linears = {n: m for n, m in _linears(layer, prefix).items() if n in schemes}
        local = {n[len(prefix) + 1:]: m for n, m in linears.items()}
        weighted = {n[len(prefix) + 1:] for n in linears if n.endswith(".v_proj") and schemes[n].attention_weighted
                    and not schemes[n].rotate_output and get_method(schemes[n].method).needs_hessian}
        hessians = _accumulate_hessians(layer, local, calib_data, dev, weighted) \
            if calib_data is not None and linears else {}
        packed_layer, stats_layer = {}, {}
        for name, linear in linears.items():
            acc = hessians.get(name[len(prefix) + 1:])
            packed, stats = _quantize_linear(name, linear, schemes[name], acc.H if acc is not None else None)
            packed_layer.update({f"{name}.{k}": v for k, v in packed.items()})
            stats_layer[name] = stats
            q = QuantizedLinear.from_packed(packed, schemes[name], linear.in_features, linear.bias)
            _set_module(skeleton, name, q.to(dev))
        del hessians
        last = i == len(layers) - 1
        if calib_data is not None and not last:
            with torch.no_grad():
                _run_layer(layers[i], calib_data, keep_outputs=True)
        progress_dir.save_layer(i, packed_layer, stats_layer,
                                calib_data.hidden if calib_data is not None and not last else None)
        all_stats.update(stats_layer)
        if not keep_model:
            layers[i] = layers[i].to("meta")
    bar.close()

    result = _assemble(out, source, reader, recipe, schemes, progress_dir, len(layers), all_stats,
                       fingerprint, calib_info, t0, start, overwrite)
    shutil.rmtree(progress_dir.dir, ignore_errors=True)
    model_out = None
    if keep_model:
        skeleton.tie_weights()
        model_out = skeleton
    return QuantizeOutput(out, result, model=model_out)


def _materialize_quantized(skeleton, layers, i, prefix, reader, schemes, packed, dev) -> None:
    """Rebuild a layer finished in an earlier run (for ``keep_model`` after a resume)."""
    layer = layers[i]
    _load_into(layer, reader.load_prefix(prefix + "."), dev, prefix)
    for name, linear in _linears(layer, prefix).items():
        if name in schemes:
            tensors = {k[len(name) + 1:]: v for k, v in packed.items() if k.startswith(name + ".")}
            q = QuantizedLinear.from_packed(tensors, schemes[name], linear.in_features, linear.bias)
            _set_module(skeleton, name, q.to(dev))


def _assemble(out, source, reader, recipe, schemes, progress_dir, nlayers, all_stats, fingerprint, calib_info,
              t0, start, overwrite) -> dict[str, Any]:
    tmp = out.with_name(out.name + ".quantkit-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        quantized_weight_keys = {f"{n}.weight" for n in schemes}
        tensors = reader.load([k for k in reader.keys() if k not in quantized_weight_keys])
        packed_bits = 0
        for i in range(nlayers):
            packed, _ = progress_dir.load_layer(i)
            tensors.update(packed)
            packed_bits += sum(t.numel() * t.element_size() * 8 for t in packed.values())
        bias_bits = sum(tensors[f"{n}.bias"].numel() * tensors[f"{n}.bias"].element_size() * 8
                        for n in schemes if f"{n}.bias" in tensors)
        n_weights = sum(s["shape"][0] * s["shape"][1] for n, s in all_stats.items() if n in schemes)
        write_shards(tensors, tmp)
        config = json.loads((source.folder / "config.json").read_text())
        qcfg = QuantkitConfig(modules={n: s.to_dict() for n, s in schemes.items()}, recipe=recipe.name)
        config["quantization_config"] = qcfg.to_dict()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_side_files(source.folder, tmp)
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        report = {
            "fingerprint": fingerprint,
            "model": str(source.name),
            "recipe": recipe.to_dict(),
            "calibration": calib_info,
            "format": {"name": FORMAT_NAME, "version": FORMAT_VERSION},
            "bits_per_weight": (packed_bits + bias_bits) / n_weights,
            "quantized_weights": n_weights,
            "quantized_bits": packed_bits + bias_bits,
            "size_on_disk_bytes": folder_size(tmp),
            "seconds": time.time() - t0,
            "resumed_at_layer": start,
            "peak_rss_bytes": peak_rss,
            "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "layers": all_stats,
        }
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        publish(tmp, out, overwrite=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s: %.3f bits per weight, %.1f MB, %.0f s", out, report["bits_per_weight"],
                report["size_on_disk_bytes"] / 1e6, report["seconds"])
    return report
