"""Measure once, for every linear of the decoder layers and every candidate: the exact stored bits and the relative
output error, and the linear's sensitivity, in one layer walk (quantkit.calibration.walk).

- **Bits**: ``Format.stored_bits`` of the candidate's scheme for the linear's shape (its tensors, rotation signs
  and bias), the count ``quantkit quantize`` reports.
- **Relative output error** ``‖(W − Ŵ) X‖² / ‖W X‖² = tr(Δ H Δᵀ) / tr(W H Wᵀ)`` with the layer-input Hessian
  ``H ∝ XᵀX`` of the calibration batch (no need to keep ``X``); ``Ŵ`` is what the candidate stores, decoded by its
  format and rotated back. The rounding itself is the quantize step's (``quantize_linear``), with the Hessian it
  would use (attention-weighted for value projections where the scheme asks).
- **Sensitivity** (HIGGS, "Pushing the Limits of Large Language Model Quantization via the Linearity Theorem"):
  the increase of the KL divergence from the full-precision model's next-token distribution is close to
  ``Σ_l α_l e_l`` for small relative errors ``e_l``. ``α_l`` is estimated by putting one known error into linear
  ``l`` alone and measuring the KL divergence on a few calibration windows (the first ``windows`` sequences, first
  ``tokens`` tokens): ``α_l = KL / e``. At decoder layer ``i`` the walk already holds the windows' inputs; the step
  runs the layer once per linear and probe (plus once unperturbed), then all those streams together through layers
  ``i+1 …`` (each materialized once per layer ``i``) and the head.
- **Which error** (``probe``). The rounding error of a candidate itself, one probe per candidate family: by default
  ``gptq-w3g128`` and ``hadamard-gptq-vq3``, those the set has, so ``α_l`` is measured on an error shaped as the
  candidates' errors are; each candidate is priced by the coefficient of its family's probe (:func:`probe_of`).
  The families differ: in SmolLM2's ``layers.12.self_attn.k_proj`` the same relative error costs 14-23 times more
  KL unrotated than rotated (BENCHMARKS.md). Gaussian noise of relative
  output error ``noise`` (``probe: noise``, HIGGS's own procedure) costs the same, and fits data-free rounding,
  whose error is close to isotropic after a rotation. It does not fit GPTQ on a linear whose inputs carry massive
  activations (SmolLM2's ``layers.11.mlp.down_proj``: token norms up to 3,293 against a median of 5.8). There
  ``‖WX‖²`` and the noise are both dominated by a few tokens, while GPTQ spends its error on the others, so the
  noise's ``α`` under-predicted the KL of gptq-w2g64 there 3.3-fold (0.0092 against 0.0306 measured) and the
  allocation gave that linear 2 bits.
- **Layer-Wise Quantization's score** (Dumitru et al., "Layer-Wise Quantization"): ``1 − cos(h_in, h_out)`` of
  each decoder layer on the same windows, a measurement-free ranking.

The walk's per-layer progress (quantkit.resume) makes the measurement resumable: a rerun after a kill continues
at the next layer and writes the same ``measurement.json``. Its fingerprint covers the model's files, the
candidates, the calibration (text, settings) and the sensitivity settings; a measurement with another is refused.
The candidates' errors do not depend on the sensitivity settings: ``reuse`` takes them from a kept measurement of
the same model, candidates and calibration and rounds only the probes (whose errors must agree with the kept ones).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from quantkit.algos.gptq import reuse_factors
from quantkit.algos.hessian import output_error
from quantkit.allocate.candidates import Candidate
from quantkit.calibration.capture import Calibration, capture_inputs
from quantkit.calibration.quantize import QuantizeStep, layer_rotations, quantize_linear
from quantkit.calibration.steps import LayerContext, LayerStep
from quantkit.calibration.walk import LayerWalk, release_freed_memory
from quantkit.checkpoint import atomic_write_text
from quantkit.config.scheme import LayerScheme
from quantkit.data import calibration_ids, load_calibration_texts
from quantkit.errors import QuantkitError, RecipeError
from quantkit.fingerprint import source_digests, text_digest
from quantkit.formats import get_format
from quantkit.loading import CheckpointReader, check_causal_lm, load_tokenizer, resolve_model
from quantkit.model import RenamedCheckpoint, build_skeleton, decoder_layers, linears, load_into
from quantkit.resume import Progress

__all__ = ["MEASUREMENT_NAME", "MeasureStep", "Plan", "SensitivitySettings", "check_measurement", "measure", "plan",
           "noise_kl", "probe_of", "reference_log_probs", "resolve_probe", "reusable_errors", "stored_weight",
           "weight_kl"]

logger = logging.getLogger(__name__)

MEASUREMENT_NAME = "measurement.json"
MEASUREMENT_VERSION = 3  # 2: the sensitivity's probe; 3: one probe per candidate family, errors reusable
DEFAULT_PROBES = ("gptq-w3g128", "hadamard-gptq-vq3")


@dataclass(frozen=True)
class SensitivitySettings:
    windows: int = 2  # calibration sequences the KL divergence is measured on
    tokens: int = 256  # their first tokens
    noise: float = 0.01  # relative output error of the injected noise (probe "noise")
    # the candidates whose errors measure the sensitivity (comma-separated; "noise" for Gaussian noise), one per
    # candidate family (see probe_of); None: see resolve_probe
    probe: str | None = None


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


@dataclass
class Plan:
    """What a measurement is of, checked before any work: the model, its linears' shapes, each candidate's stored
    bits per linear (None: the candidate cannot store that shape), the calibration ids and the fingerprint."""

    source: Any
    candidates: list[Candidate]
    device: torch.device
    linears: dict[str, dict[str, Any]]  # name -> {layer, kind, shape, bits: [int | None]}
    ids: torch.Tensor
    calibration: dict[str, Any]
    settings: SensitivitySettings
    fingerprint: dict[str, str]  # model, candidates, calibration, sensitivity
    text_sha256: str = ""

    @property
    def weights(self) -> int:
        return sum(v["shape"][0] * v["shape"][1] for v in self.linears.values())


def plan(model: str | None, candidates: list[Candidate], *, calib: str = "c4", nsamples: int = 128,
         seqlen: int = 2048, seed: int = 0, device: str = "cpu", data_dir: str | Path | None = None,
         settings: SensitivitySettings = SensitivitySettings()) -> Plan:
    if nsamples < 1 or seqlen < 2:
        raise QuantkitError("--nsamples must be >= 1 and --seqlen >= 2")
    if not 1 <= settings.windows <= nsamples:
        raise QuantkitError(f"--kl-windows {settings.windows}: must be 1 to --nsamples ({nsamples})")
    if not 2 <= settings.tokens <= seqlen:
        raise QuantkitError(f"--kl-tokens {settings.tokens}: must be 2 to --seqlen ({seqlen})")
    if not 0 < settings.noise < 1:
        raise QuantkitError(f"--kl-noise {settings.noise}: must be in (0, 1)")
    settings = replace(settings, probe=resolve_probe(settings.probe, candidates))
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QuantkitError("--device cuda asked for, but no CUDA device is available")
    source = resolve_model(model)
    check_causal_lm(source.config)
    limit = getattr(source.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise QuantkitError(f"--seqlen {seqlen} is longer than the model's position limit "
                            f"(max_position_embeddings = {limit})")
    tokenizer = load_tokenizer(source)
    skeleton = build_skeleton(source, torch.device("cpu"))
    reader = RenamedCheckpoint(CheckpointReader(source.folder), skeleton)
    layers_name, layers = decoder_layers(skeleton)
    table: dict[str, dict[str, Any]] = {}
    for i, layer in enumerate(layers):
        prefix = f"{layers_name}.{i}"
        for name, lin in linears(layer, prefix).items():
            bias = reader.load([f"{name}.bias"])[f"{name}.bias"].dtype if lin.bias is not None else None
            bits: list[int | None] = []
            for c in candidates:
                fmt = get_format(c.scheme.format)
                try:
                    fmt.check_layer(c.scheme, lin.in_features, lin.out_features)
                except RecipeError:
                    bits.append(None)
                    continue
                bits.append(fmt.stored_bits(c.scheme, lin.in_features, lin.out_features, bias))
            if all(b is None for b in bits):
                raise RecipeError(f"{name}: no candidate can quantize a {lin.out_features}x{lin.in_features} linear")
            table[name] = {"layer": i, "kind": name[len(prefix) + 1:], "shape": [lin.out_features, lin.in_features],
                           "bits": bits}
    if not table:
        raise QuantkitError("the model has no linear layer in its decoder layers")
    texts = load_calibration_texts(calib, data_dir)
    ids = calibration_ids(tokenizer, texts, nsamples=nsamples, seqlen=seqlen, seed=seed)
    calibration = {"calib": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    formats = sorted({(c.scheme.format, get_format(c.scheme.format).version) for c in candidates})
    digest = text_digest(texts)
    fp = {
        "model": _sha(source_digests(source.folder)),
        "candidates": _sha({"candidates": [c.to_dict() for c in candidates], "formats": formats}),
        "calibration": _sha({**calibration, "calib": None, "text_sha256": digest, "device": dev.type}),
        "sensitivity": _sha({"sensitivity": asdict(settings), "version": MEASUREMENT_VERSION}),
    }
    return Plan(source, candidates, dev, table, ids, calibration, settings, fp, digest)


def _errors_digest_v2(p: Plan, sensitivity: dict[str, Any]) -> str:
    """The calibration part of a version-2 fingerprint (which folded the sensitivity settings in)."""
    settings = {k: sensitivity.get(k) for k in ("windows", "tokens", "noise", "probe")}
    return _sha({**p.calibration, "calib": None, "text_sha256": p.text_sha256, "sensitivity": settings,
                 "device": p.device.type, "version": 2})


def resolve_probe(probe: str | None, candidates: list[Candidate]) -> str:
    """The sensitivity's probes, comma-separated: candidates' names or ``"noise"``; None picks those of
    ``DEFAULT_PROBES`` the set has, else noise."""
    names = [c.name for c in candidates]
    if probe is None:
        return ",".join(p for p in DEFAULT_PROBES if p in names) or "noise"
    probes = [p.strip() for p in probe.split(",") if p.strip()]
    if not probes:
        raise QuantkitError("--kl-probe: name at least one candidate, or 'noise'")
    for p in probes:
        if p != "noise" and p not in names:
            raise QuantkitError(f"--kl-probe {p}: not a candidate ({', '.join(names)}), nor 'noise'")
    if len(set(probes)) < len(probes):
        raise QuantkitError(f"--kl-probe {probe}: names a probe twice")
    return ",".join(probes)


def _family(c: Candidate) -> tuple[str, str]:
    return c.scheme.rotation.kind, c.scheme.quantizer.name


def probe_of(probe: str, candidates: list[Candidate]) -> list[str]:
    """Which probe's coefficient prices each candidate's error: the probe of the same family (rotation and
    quantizer), else one with the same rotation, else the first probe. A rotation spreads a linear's error over
    its outputs and inputs; unrotated GPTQ leaves it where the weights' outliers are, and on SmolLM2 the same
    relative error in ``layers.12.self_attn.k_proj`` costs 14-23x more KL divergence unrotated
    (benchmarks/sensitivity_noise.py), so one probe for all misprices the other family."""
    by_name = {c.name: c for c in candidates}
    probes = probe.split(",")
    out = []
    for c in candidates:
        scored = [(2 if _family(by_name[p]) == _family(c) else 1, -i, p) for i, p in enumerate(probes)
                  if p != "noise" and by_name[p].scheme.rotation.kind == c.scheme.rotation.kind]
        out.append(max(scored)[2] if scored else probes[0])
    return out


_WHAT = {"model": "another model (its files differ)", "candidates": "another candidate set",
         "calibration": "another calibration (text or settings)", "sensitivity": "other sensitivity settings"}


def check_measurement(m: dict[str, Any], fingerprint: dict[str, str], where: str) -> None:
    """Refuse a measurement whose fingerprint is not ``fingerprint``, naming what differs."""
    version = m.get("quantkit_measurement") if isinstance(m, dict) else None
    if type(version) is int and 1 <= version < MEASUREMENT_VERSION:
        raise QuantkitError(f"{where} was written by an older quantkit (measurement version {version}, now "
                            f"{MEASUREMENT_VERSION}); measure again into another --out, or delete it")
    if version != MEASUREMENT_VERSION:
        raise QuantkitError(f"{where} is not a quantkit measurement (version {MEASUREMENT_VERSION})")
    got = m.get("fingerprint") or {}
    for part in ("model", "candidates", "calibration", "sensitivity"):
        if got.get(part) != fingerprint[part]:
            raise QuantkitError(f"{where} was measured on {_WHAT[part]}; measure again into another --out, or "
                                "delete it")


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"quantkit-allocate-noise:{name}".encode()).digest()[:8], "little") >> 1


def relative_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(Δ H Δᵀ) / tr(W H Wᵀ)``: the relative output error ``‖(W − Ŵ) X‖² / ‖W X‖²``."""
    base = output_error(W, torch.zeros_like(W), H)
    return output_error(W, W_hat, H) / base if base > 0 else 0.0


def noise(name: str, W: torch.Tensor, H: torch.Tensor, e: float) -> torch.Tensor:
    """Gaussian noise [out, in] (seeded by the linear's name) scaled so its relative output error is exactly ``e``."""
    Z = torch.randn(W.shape, generator=torch.Generator().manual_seed(_seed(name))).to(W.device)
    return Z * (e / relative_error(W, W - Z, H)) ** 0.5


def stored_weight(name: str, lin: nn.Linear, scheme: LayerScheme, H: torch.Tensor) -> torch.Tensor:
    """What ``scheme`` stores for this linear (rounded by the quantize step's own ``quantize_linear``), decoded and
    rotated back to the original basis."""
    packed, _ = quantize_linear(name, lin, scheme, H)
    fmt = get_format(scheme.format)
    W_hat = fmt.dequantize({k: v for k, v in packed.items() if not k.startswith("rot_")}, scheme, lin.in_features)
    for rot in reversed(layer_rotations(name, scheme, lin.weight).values()):
        W_hat = rot.unfuse(W_hat)
    return W_hat


def _head(model: nn.Module):
    """``hidden [.., d] -> logits``: the final norm and the output embedding (with Gemma's soft-capping)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    norm = getattr(decoder, "norm", None)
    head = model.get_output_embeddings()
    if norm is None or head is None:
        raise QuantkitError(f"{type(model).__name__}: cannot find its final norm and output head for the KL "
                            "sensitivity")
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)

    def fn(h: torch.Tensor) -> torch.Tensor:
        logits = head(norm(h)).float()
        return torch.tanh(logits / cap) * cap if cap else logits

    return fn


def _log_probs(stream: list[torch.Tensor], head) -> list[torch.Tensor]:
    """Next-token log-probabilities [T, vocab] of each sequence of a stream (chunks of [b, T, d])."""
    return [torch.log_softmax(head(h[s]).double(), -1) for h in stream for s in range(h.shape[0])]


def _kl(ref: list[torch.Tensor], other: list[torch.Tensor], head) -> float:
    """Mean over positions of KL(p_ref ‖ p_other); ``ref`` from :func:`_log_probs`, ``other`` a stream."""
    total, n = 0.0, 0
    for lp, lq in zip(ref, _log_probs(other, head), strict=True):
        total += (lp.exp() * (lp - lq)).sum().item()
        n += lp.shape[0]
    return total / n


def _out(y):
    return y[0] if isinstance(y, tuple) else y


class MeasureStep(LayerStep):
    """The measurement of one decoder layer (see the module docstring); its record holds each linear's errors per
    candidate, KL divergence and sensitivity coefficient, and the layer's LWQ score."""

    name: ClassVar[str] = "measure"
    needs_calibration: ClassVar[bool] = True

    def __init__(self, plan: Plan, model: nn.Module, layers_name: str, layers: nn.ModuleList, reader,
                 windows: Calibration, reused: dict[str, list[float | None]] | None = None, reuse_path: str = ""):
        self.plan, self.model, self.layers_name, self.layers, self.reader = plan, model, layers_name, layers, reader
        self.reused, self.reuse_path = reused, reuse_path  # candidate errors of a kept measurement, per linear
        self.windows = windows  # the sensitivity windows: inputs of layer ``self.at`` (full precision)
        self.at = 0
        self.head = _head(model)
        self.weighted = any(QuantizeStep._weighted(c.scheme) for c in plan.candidates)

    def needs(self, ctx: LayerContext) -> dict[str, set[str]]:
        lin = linears(ctx.layer, ctx.prefix)
        return {"hessian": {ctx.local(n) for n in lin},
                "attention_hessian": {ctx.local(n) for n in lin if n.endswith(".v_proj") and self.weighted}}

    def run(self, ctx: LayerContext, stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
        self._advance(ctx.index)
        plain, weighted = stats["hessian"], stats.get("attention_hessian", {})
        targets = linears(ctx.layer, ctx.prefix)
        probes = self.plan.settings.probe.split(",")
        record: dict[str, Any] = {"linears": {}}
        # name -> probe -> (weight with the probe's error, its relative error, what it was: the probe or "noise")
        perturbed: dict[str, dict[str, tuple[torch.Tensor, float, str]]] = {}
        for name, lin in targets.items():
            H = plain[ctx.local(name)]
            W = lin.weight.detach().float()
            errors: list[float | None] = []
            perturbed[name] = {}
            reused = self.reused[name] if self.reused is not None else None
            with reuse_factors():  # the candidates of one linear share its Hessian (and its rotated Hessian)
                for k, (c, bits) in enumerate(zip(self.plan.candidates, self.plan.linears[name]["bits"],
                                                  strict=True)):
                    if bits is None or (reused is not None and c.name not in probes):
                        errors.append(None if bits is None else reused[k])
                        continue
                    Hm = weighted.get(ctx.local(name)) if QuantizeStep._weighted(c.scheme) else None
                    W_hat = stored_weight(name, lin, c.scheme, H if Hm is None else Hm)
                    errors.append(relative_error(W, W_hat, H))
                    if reused is not None:
                        self._check_reused(name, c.name, reused[k], errors[-1])
                        errors[-1] = reused[k]
                    if c.name in probes and errors[-1] > 0:
                        perturbed[name][c.name] = (W_hat, errors[-1], c.name)
            for probe in probes:  # noise, asked for or where the probe cannot store this linear
                if probe not in perturbed[name]:
                    e = self.plan.settings.noise
                    perturbed[name][probe] = (W + noise(name, W, H, e), e, "noise")
            record["linears"][name] = {"error": errors}
        # Sensitivity: the unperturbed stream and one stream per linear and probe, its error in that linear alone.
        streams = [self._run(ctx.layer, ctx.index, self.windows.hidden)]
        for name, lin in targets.items():
            W0 = lin.weight.data.clone()
            for probe in probes:
                lin.weight.data.copy_(perturbed[name][probe][0].to(W0.dtype))
                try:
                    streams.append(self._run(ctx.layer, ctx.index, self.windows.hidden))
                finally:
                    lin.weight.data.copy_(W0)
        record["lwq"] = self._lwq(self.windows.hidden, streams[0])
        self.windows.hidden, self.at = streams[0], ctx.index + 1
        for j in range(ctx.index + 1, len(self.layers)):
            layer = self._materialize(j)
            streams = [self._run(layer, j, s) for s in streams]
            self.layers[j] = layer.to("meta")
            release_freed_memory()
        ref = _log_probs(streams[0], self.head)
        rest = iter(streams[1:])
        for name in targets:
            record["linears"][name]["probes"] = {}
            for probe in probes:
                kl = _kl(ref, next(rest), self.head)
                _, e, used = perturbed[name][probe]
                # A KL divergence is >= 0; a linear whose probe does not move the output can round below it.
                record["linears"][name]["probes"][probe] = {"kl": kl, "coeff": max(kl, 0.0) / e, "error": e,
                                                            "used": used}
        return record

    def _check_reused(self, name: str, candidate: str, kept: float | None, now: float) -> None:
        """A reused measurement's error of a probe must be what this walk measures: else its inputs differ."""
        if kept is None or abs(kept - now) > 1e-3 * max(abs(now), 1e-12):
            raise QuantkitError(f"{self.reuse_path}: {name} under {candidate} has relative error {kept}, this "
                                f"walk measures {now:.6g}: its errors come from other inputs; measure again")

    def _materialize(self, j: int) -> nn.Module:
        prefix = f"{self.layers_name}.{j}"
        load_into(self.layers[j], self.reader.load_prefix(prefix + "."), self.plan.device, prefix)
        return self.layers[j]

    def _run(self, layer: nn.Module, j: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return [_out(layer(h, **kw)) for h, kw in zip(hidden, self.windows.kwargs[j], strict=True)]

    def _advance(self, i: int) -> None:
        """Bring the sensitivity windows to layer ``i``'s inputs (a resumed run starts past layer 0)."""
        while self.at < i:
            layer = self._materialize(self.at)
            self.windows.hidden = self._run(layer, self.at, self.windows.hidden)
            self.layers[self.at] = layer.to("meta")
            self.at += 1

    @staticmethod
    def _lwq(inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
        """Layer-Wise Quantization's importance: 1 − the mean cosine similarity of a token's hidden state before
        and after the layer."""
        cos = [torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).flatten()
               for a, b in zip(inputs, outputs, strict=True)]
        return 1.0 - torch.cat(cos).double().mean().item()


def reusable_errors(path: str | Path, p: Plan) -> tuple[dict[str, list[float | None]], str]:
    """The candidate errors of a kept measurement (this version's or version 2) of the same model, candidates and
    calibration, whatever its sensitivity settings, and the file's sha256; another one is refused."""
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
        m = json.loads(raw)
    except OSError as e:
        raise QuantkitError(f"--reuse-errors {path}: cannot read it ({e.strerror or e})") from None
    except ValueError:
        raise QuantkitError(f"--reuse-errors {path}: not a quantkit measurement (not JSON)") from None
    version = m.get("quantkit_measurement") if isinstance(m, dict) else None
    if version not in (2, MEASUREMENT_VERSION):
        raise QuantkitError(f"--reuse-errors {path}: not a quantkit measurement of version 2 or "
                            f"{MEASUREMENT_VERSION}")
    got = m.get("fingerprint") or {}
    calibration = p.fingerprint["calibration"] if version == MEASUREMENT_VERSION else _errors_digest_v2(
        p, m.get("sensitivity") or {})
    for part, want in (("model", p.fingerprint["model"]), ("candidates", p.fingerprint["candidates"]),
                       ("calibration", calibration)):
        if got.get(part) != want:
            raise QuantkitError(f"--reuse-errors {path} was measured on {_WHAT[part]}; its errors do not apply")
    try:
        errors = {name: m["linears"][name]["error"] for name in p.linears}
    except (KeyError, TypeError):
        raise QuantkitError(f"--reuse-errors {path}: lacks a linear's errors") from None
    return errors, hashlib.sha256(raw).hexdigest()


def measure(p: Plan, out: str | Path, *, progress: bool = True, reuse: str | Path | None = None) -> dict[str, Any]:
    """Measure into ``out/measurement.json`` (resuming ``out/measurement.partial``), or return the measurement
    already there when its fingerprint is this plan's; another one is refused. ``reuse``: take the candidates'
    errors from that kept measurement (see :func:`reusable_errors`) and measure only the sensitivities (the
    probes' errors are measured again, and must agree)."""
    out = Path(out).expanduser()
    path = out / MEASUREMENT_NAME
    if path.exists():
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError):
            raise QuantkitError(f"{path} is not a quantkit measurement (not JSON)") from None
        check_measurement(m, p.fingerprint, str(path))
        logger.info("%s: measured before with the same model, candidates and calibration; reusing it", path)
        return m
    reused, reused_sha = reusable_errors(reuse, p) if reuse is not None else (None, None)
    out.mkdir(parents=True, exist_ok=True)
    done = Progress(out / "measurement.partial", _sha({**p.fingerprint, "errors_from": reused_sha}))
    skeleton = build_skeleton(p.source, p.device)
    reader = RenamedCheckpoint(CheckpointReader(p.source.folder), skeleton)
    layers_name, layers = decoder_layers(skeleton)
    non_layer = reader.load([k for k in reader.keys() if not k.startswith(layers_name + ".")])
    load_into(skeleton, non_layer, p.device, "model", complete=False)
    skeleton.tie_weights()
    calib = capture_inputs(skeleton, layers, p.ids, p.device)
    s = p.settings
    windows = capture_inputs(skeleton, layers, p.ids[: s.windows, : s.tokens].contiguous(), p.device)
    step = MeasureStep(p, skeleton, layers_name, layers, reader, windows, reused, str(reuse))
    walk = LayerWalk(skeleton, layers_name, layers, reader, [step], done, p.device, calib)
    records = walk.run(desc="measure", show=progress)["measure"]
    linears_out: dict[str, Any] = {}
    layer_scores: dict[str, float] = {}
    for prefix, rec in records.items():
        layer_scores[prefix] = rec["lwq"]
        for name, r in rec["linears"].items():
            linears_out[name] = {**p.linears[name], **r, "lwq": rec["lwq"]}
    nprobes = len(s.probe.split(","))
    nlayers, members = len(layers), sum(nprobes * len(rec["linears"]) + 1 for rec in records.values())
    tokens = s.windows * s.tokens
    m = {
        "quantkit_measurement": MEASUREMENT_VERSION,
        "fingerprint": p.fingerprint,
        "model": str(p.source.name),
        "calibration": p.calibration,
        "sensitivity": {**asdict(s), "probe_of": probe_of(s.probe, p.candidates),
                        "method": "KL divergence from the full-precision model with one linear given a probe's "
                        "error (a candidate's rounding, or Gaussian noise of relative output error `noise`); "
                        "coeff = kl / error; each candidate is priced by the coefficient of its probe_of"},
        "errors_from": None if reuse is None else {"path": str(reuse), "sha256": reused_sha},
        "candidates": [c.to_dict() for c in p.candidates],
        "weights": p.weights,
        # Work, in tokens through one decoder layer: the calibration walk (statistics, then the next inputs) and
        # the sensitivity streams (each layer's unperturbed and perturbed streams through the rest of the model).
        "cost": {"calibration_layer_tokens": 2 * p.ids.numel() * nlayers,
                 "sensitivity_layer_tokens": tokens * sum(
                     (nprobes * len(rec["linears"]) + 1) * (nlayers - i) for i, rec in enumerate(records.values())),
                 "sensitivity_head_tokens": tokens * members},
        "layers": layer_scores,
        "linears": linears_out,
    }
    atomic_write_text(path, json.dumps(m, indent=1) + "\n")
    done.remove()
    return m


def reference_log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The unquantized model's next-token log-probabilities on ``ids`` (float64), the reference of :func:`weight_kl`;
    compute it once to price many weights on the same tokens."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits.double(), -1)


def weight_kl(model: nn.Module, ids: torch.Tensor, name: str, W_new: torch.Tensor,
              ref: torch.Tensor | None = None) -> float:
    """KL divergence of a whole in-memory model's next-token distribution on ``ids`` when linear ``name`` holds
    ``W_new`` (for tests and checks; the walk does this batched). ``ref``: :func:`reference_log_probs` of the same
    model and ``ids``, computed here when not given."""
    lp = reference_log_probs(model, ids) if ref is None else ref
    lin = model.get_submodule(name)
    W0 = lin.weight.data.clone()
    with torch.no_grad():
        lin.weight.data.copy_(W_new.to(W0.dtype))
        try:
            got = model(input_ids=ids).logits
        finally:
            lin.weight.data.copy_(W0)
    lq = torch.log_softmax(got.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


def noise_kl(model: nn.Module, ids: torch.Tensor, name: str, e: float, H: torch.Tensor,
             ref: torch.Tensor | None = None) -> float:
    """:func:`weight_kl` of linear ``name`` given the noise :func:`noise` of relative output error ``e``."""
    W0 = model.get_submodule(name).weight.data.float()
    return weight_kl(model, ids, name, W0 + noise(name, W0, H, e), ref)
