"""``finetune``: end-to-end tuning of a quantized checkpoint's continuous parameters (AQLM, QuIP#, PV-Tuning).

The student is the quantized folder loaded as ``from_pretrained`` loads it; the teacher is its fp source model (the
``model`` its report records, or ``--teacher``). The loss is KL(teacher || student) of the next-token distributions
on calibration windows (the loader ``quantize`` uses), one window per step in an order drawn from the seed.
Trainable: each quantized linear's ``Format.trainable`` tensors (codebooks and scales of the codebook formats, the
per-group scales of ``quantkit-uniform``), as fp32 copies the forward dequantizes through the format's reference
(``QuantizedLinear.start_tuning``), and the RMSNorm weights. Codes, integer tensors, embeddings and everything else
stay frozen. Adam; the tuned tensors are stored in their stored dtypes at the end, so the codes and the bits per
weight are the input's.

The teacher's logits of each window are kept after its first step, in fp32 and whole (a top-k cache would change
the loss), while all the windows' logits fit in ``TEACHER_CACHE_BYTES`` (SmolLM2, 16 × 512 tokens: 1.6 GB); past
that they are recomputed at every step. Kept or recomputed, they are the same values (the teacher is frozen and its
forward deterministic), so the cache changes the time, not the result.

Resume: every ``checkpoint_every`` steps the state (trainable tensors, Adam's moments and step, the data order's
generator, the losses so far) goes to ``OUT.quantkit-partial/`` under the run's fingerprint (input folder's files,
teacher's files, calibration text and settings but ``steps``); a rerun of the same command continues from it and
ends with the same bytes as an uninterrupted run. Nothing before a step depends on the total (constant lr), so a
rerun with another ``steps`` at or past the saved step continues too, and ends as a run of that many steps would:
a long run stopped at a checkpoint is published by rerunning it with ``--steps`` set to that checkpoint. The
output is published with quantkit.outdir like ``quantize``'s, under the fingerprint with ``steps``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from quantkit.checkpoint import (
    REPORT_NAME,
    atomic_save_file,
    atomic_write_text,
    copy_side_files,
    folder_size,
    write_shards,
)
from quantkit.data import calibration_ids, load_calibration_texts
from quantkit.errors import QuantkitError
from quantkit.fingerprint import source_digests, text_digest
from quantkit.loading import CheckpointReader, load_model, load_tokenizer, resolve_model
from quantkit.nn.linear import QuantizedLinear
from quantkit.outdir import MARKER, OutputFolder

__all__ = ["FinetuneOutput", "finetune", "kl_loss"]

logger = logging.getLogger(__name__)

FINETUNE_VERSION = 1
TEACHER_CACHE_BYTES = 4 << 30  # fp32 teacher logits kept across epochs up to this size
_ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                "num_attention_heads", "num_key_value_heads")


@dataclass
class FinetuneOutput:
    out: Path
    report: dict[str, Any]
    model: nn.Module | None = None  # the tuned student, when the run trained (not when the output was there)
    skipped: bool = False


def kl_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of the next-token distributions, in fp32 (nats per token)."""
    t = torch.log_softmax(teacher_logits.float(), dim=-1)
    s = torch.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def _quantkit_folder(qdir: str | Path) -> tuple[Path, dict[str, Any]]:
    """The folder and its report; one-line errors naming the file that makes it not a quantkit folder."""
    q = Path(qdir).expanduser()
    if not q.is_dir():
        raise QuantkitError(f"--model {qdir}: not a folder (a folder written by quantkit quantize)")
    try:
        config = json.loads((q / "config.json").read_text())
    except (OSError, ValueError):
        raise QuantkitError(f"{q / 'config.json'}: missing or not JSON; --model must be a folder written by "
                            "quantkit quantize") from None
    if (config.get("quantization_config") or {}).get("quant_method") != "quantkit":
        raise QuantkitError(f"{q / 'config.json'}: quantization_config.quant_method is not 'quantkit'; --model must "
                            "be a folder written by quantkit quantize")
    try:
        report = json.loads((q / REPORT_NAME).read_text())
    except (OSError, ValueError):
        raise QuantkitError(f"{q / REPORT_NAME}: missing or not JSON; --model must be a folder written by "
                            "quantkit quantize") from None
    return q, report


def _check_teacher(student_config, teacher_config, teacher: str) -> None:
    s, t = student_config.get_text_config(), teacher_config.get_text_config()
    for field in _ARCH_FIELDS:
        if getattr(s, field, None) != getattr(t, field, None):
            raise QuantkitError(f"--teacher {teacher}: {field} is {getattr(t, field, None)!r}, the quantized "
                                f"model's is {getattr(s, field, None)!r}; the teacher must be its source model")


def _is_norm(m: nn.Module) -> bool:
    return type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), nn.Parameter)


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Start tuning every quantized linear and unfreeze the RMSNorm weights; returns the trained tensors by their
    checkpoint names. Everything else is frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    params: dict[str, nn.Parameter] = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            params.update({f"{name}.{k}": p for k, p in m.start_tuning().items()})
        elif _is_norm(m):
            m.weight.requires_grad_(True)
            params[f"{name}.weight"] = m.weight
    return params


def _stop_tuning(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.stop_tuning()
    for p in model.parameters():
        p.requires_grad_(False)


class _State:
    """``OUT.quantkit-partial/``: ``state.json`` (fingerprint, step) and ``state.safetensors`` (the tensors)."""

    def __init__(self, folder: Path, fingerprint: str):
        self.dir = folder
        self.created = not folder.exists()
        self.fingerprint = fingerprint
        stored = None
        try:
            stored = json.loads((folder / "state.json").read_text()).get("fingerprint")
        except (OSError, ValueError):
            pass
        if folder.exists() and stored != fingerprint:
            logger.warning("discarding partial progress of a different run in %s", folder)
            shutil.rmtree(folder)
            self.created = True
        folder.mkdir(parents=True, exist_ok=True)

    def load(self) -> tuple[int, dict[str, torch.Tensor], list[float]] | None:
        try:
            info = json.loads((self.dir / "state.json").read_text())
        except (OSError, ValueError):
            return None
        with safe_open(self.dir / "state.safetensors", "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return info["step"], tensors, info["losses"]

    def save(self, step: int, tensors: dict[str, torch.Tensor], losses: list[float]) -> None:
        atomic_save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                         self.dir / "state.safetensors")
        atomic_write_text(self.dir / "state.json",  # last: names a state.safetensors that is complete
                          json.dumps({"fingerprint": self.fingerprint, "step": step, "losses": losses}))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _pack_state(params: dict[str, nn.Parameter], opt: torch.optim.Adam, gen: torch.Generator,
                order: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {f"param.{k}": p.detach() for k, p in params.items()}
    for k, p in params.items():
        st = opt.state.get(p)
        if st:
            out[f"exp_avg.{k}"] = st["exp_avg"]
            out[f"exp_avg_sq.{k}"] = st["exp_avg_sq"]
            out[f"adam_step.{k}"] = st["step"].reshape(1)
    out["rng"] = gen.get_state()
    out["order"] = order
    return out


def _unpack_state(tensors: dict[str, torch.Tensor], params: dict[str, nn.Parameter], opt: torch.optim.Adam,
                  gen: torch.Generator) -> torch.Tensor:
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"param.{k}"])
            if f"exp_avg.{k}" in tensors:
                opt.state[p] = {"step": tensors[f"adam_step.{k}"].reshape(()).clone(),
                                "exp_avg": tensors[f"exp_avg.{k}"].clone(),
                                "exp_avg_sq": tensors[f"exp_avg_sq.{k}"].clone()}
    gen.set_state(tensors["rng"])
    return tensors["order"]


def finetune(
    model: str | Path,
    out: str | Path,
    *,
    steps: int = 200,
    lr: float = 1e-4,
    calib: str = "c4",
    nsamples: int = 16,
    seqlen: int = 512,
    seed: int = 0,
    teacher: str | None = None,
    checkpoint_every: int = 25,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> FinetuneOutput:
    """Fine-tune the quantized folder ``model`` into ``out`` (see the module docstring). ``on_step(step, loss)`` is
    called after each step (a test interrupts the run from it)."""
    t0 = time.time()
    _check_settings(steps=steps, lr=lr, nsamples=nsamples, seqlen=seqlen, checkpoint_every=checkpoint_every)
    qdir, qreport = _quantkit_folder(model)
    tsource, teacher_spec = _teacher(qdir, qreport, teacher, seqlen)
    texts = load_calibration_texts(calib, data_dir)
    ids = calibration_ids(load_tokenizer(tsource), texts, nsamples=nsamples, seqlen=seqlen, seed=seed)
    settings = {"steps": steps, "lr": lr, "calib": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
                "checkpoint_every": checkpoint_every, "teacher": str(teacher_spec), "optimizer": "adam",
                "batch": 1, "loss": "kl(teacher || student), mean over tokens"}
    blob = {"version": FINETUNE_VERSION, "input": source_digests(qdir), "teacher": source_digests(tsource.folder),
            "calibration_text": text_digest(texts), "settings": settings, "torch": torch.__version__}
    fp = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()
    # The saved state does not depend on --steps (constant lr, data order drawn epoch by epoch), so a run with more
    # or fewer steps continues from it: stop a long run at a checkpoint and publish it with --steps set there.
    state_blob = {**blob, "settings": {k: v for k, v in settings.items() if k != "steps"}}
    state_fp = hashlib.sha256(json.dumps(state_blob, sort_keys=True).encode()).hexdigest()

    out = Path(out).expanduser().absolute()
    folder = OutputFolder(out)
    folder.check_not_source(qdir, tsource.folder)
    folder.holds(fp, overwrite)
    with folder:
        folder.recover()
        if folder.holds(fp, overwrite):
            shutil.rmtree(folder.partial, ignore_errors=True)
            return FinetuneOutput(out, json.loads((out / REPORT_NAME).read_text()), skipped=True)
        state = _State(folder.partial, state_fp)
        try:
            student, tmodel, params, reader = _load_pair(qdir, tsource)
        except QuantkitError:
            if state.created:  # bad input found on the way: leave nothing behind
                state.remove()
            raise
        losses, times, start = _train(student, tmodel, params, ids, state, steps=steps, lr=lr, seed=seed,
                                      checkpoint_every=checkpoint_every, progress=progress, on_step=on_step)
        report = _publish(folder, qdir, qreport, reader, student, list(params), settings, losses, fp, t0,
                          times, start, overwrite)
        state.remove()
    return FinetuneOutput(out, report, model=student)


def _check_settings(*, steps: int, lr: float, nsamples: int, seqlen: int, checkpoint_every: int) -> None:
    if steps <= 0:
        raise QuantkitError(f"--steps must be > 0, not {steps}")
    if not lr > 0:
        raise QuantkitError(f"--lr must be > 0, not {lr}")
    if nsamples < 1 or seqlen < 2:
        raise QuantkitError("--nsamples must be >= 1 and --seqlen >= 2")
    if checkpoint_every < 1:
        raise QuantkitError(f"checkpoint_every must be >= 1, not {checkpoint_every}")


def _teacher(qdir: Path, qreport: dict[str, Any], teacher: str | None, seqlen: int):
    """The teacher's source (``--teacher``, else the model the report records) and its spec, checked against the
    quantized model's architecture and position limit."""
    teacher_spec = teacher if teacher is not None else qreport.get("model")
    if not teacher_spec:
        raise QuantkitError(f"{qdir / REPORT_NAME}: records no source model; name the teacher with --teacher")
    tsource = resolve_model(teacher_spec)
    student_config = resolve_model(qdir).config
    _check_teacher(student_config, tsource.config, str(teacher_spec))
    limit = getattr(student_config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise QuantkitError(f"--seqlen {seqlen} is longer than the model's position limit "
                            f"(max_position_embeddings = {limit})")
    return tsource, teacher_spec


def _load_pair(qdir: Path, tsource) -> tuple[nn.Module, nn.Module, dict[str, nn.Parameter], CheckpointReader]:
    """Student (tuning started) and frozen teacher in fp32, the trained tensors, and the student's checkpoint."""
    student, _ = load_model(qdir, dtype=torch.float32)
    tmodel, _ = load_model(tsource.folder, dtype=torch.float32)
    params = _trainable(student)
    if not params:
        raise QuantkitError(f"{qdir}: nothing to tune (no quantized linear with trainable tensors, no RMSNorm)")
    reader = CheckpointReader(qdir)
    missing = [k for k in params if k not in reader.shapes()]
    if missing:
        raise QuantkitError(f"{qdir}: the checkpoint stores no {missing[0]} (a name the model gives a tuned tensor)")
    for p in tmodel.parameters():
        p.requires_grad_(False)
    return student, tmodel, params, reader


def _train(student: nn.Module, tmodel: nn.Module, params: dict[str, nn.Parameter], ids: torch.Tensor,
           state: _State, *, steps: int, lr: float, seed: int, checkpoint_every: int, progress: bool,
           on_step: Callable[[int, float], None] | None) -> tuple[list[float], dict[str, Any], int]:
    """Adam on KL(teacher || student), one window a step, from the saved state if there is one; tuning stopped at
    the end. Returns the losses of every step, the times and the step this run started at."""
    from tqdm.auto import tqdm

    opt = torch.optim.Adam(list(params.values()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ids), generator=gen)
    start, losses = 0, []
    resumed = state.load()
    if resumed is not None and resumed[0] > steps:
        logger.warning("the saved state is at step %d, past --steps %d; starting over", resumed[0], steps)
        resumed = None
    if resumed is not None:
        start, tensors, losses = resumed
        order = _unpack_state(tensors, params, opt, gen)
        logger.info("resuming fine-tuning at step %d of %d", start, steps)
    bar = tqdm(range(start, steps), total=steps, initial=start, desc="finetune", disable=not progress)
    vocab = student.get_output_embeddings().weight.shape[0]
    cache: dict[int, torch.Tensor] | None = {} if ids.numel() * vocab * 4 <= TEACHER_CACHE_BYTES else None
    teacher_seconds, t_train = 0.0, time.time()
    for step in bar:
        if step % len(ids) == 0 and step > 0:
            order = torch.randperm(len(ids), generator=gen)
        i = int(order[step % len(ids)])
        window = ids[i].unsqueeze(0)
        t1 = time.time()
        tl = cache.get(i) if cache is not None else None
        if tl is None:
            with torch.no_grad():
                tl = tmodel(window, use_cache=False).logits.float()
            if cache is not None:
                cache[i] = tl
        teacher_seconds += time.time() - t1
        loss = kl_loss(tl, student(window, use_cache=False).logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            state.save(step + 1, _pack_state(params, opt, gen, order), losses)
        if on_step is not None:
            on_step(step, losses[-1])
    bar.close()
    _stop_tuning(student)
    times = {"teacher_forward_seconds": teacher_seconds, "train_seconds": time.time() - t_train,
             "steps_this_run": steps - start, "teacher_logits_cached": cache is not None}
    return losses, times, start


def _publish(folder: OutputFolder, qdir: Path, qreport: dict[str, Any], reader: CheckpointReader,
             student: nn.Module, tuned: list[str], settings: dict[str, Any], losses: list[float], fp: str,
             t0: float, times: dict[str, Any], resumed_at: int, overwrite: bool) -> dict[str, Any]:
    """The input folder with the tuned tensors replaced (each in its stored dtype), a report, published."""
    with folder.build(fp, overwrite) as tmp:
        tensors = reader.load(reader.keys())
        current = dict(student.state_dict(keep_vars=True))
        for k in tuned:
            t = current[k].detach()
            tensors[k] = t.to(tensors[k].dtype).contiguous()
            if not bool(torch.isfinite(tensors[k]).all()):
                raise QuantkitError(f"{k}: not finite after fine-tuning (lower --lr); nothing published")
        write_shards(tensors, tmp)
        shutil.copy2(qdir / "config.json", tmp / "config.json")
        copy_side_files(qdir, tmp)
        k = max(1, min(10, len(losses) // 10))
        report = {
            **{key: v for key, v in qreport.items() if key not in ("seconds", "peak_rss_bytes", "size_on_disk_bytes",
                                                                   "fingerprint")},
            "fingerprint": fp,
            "size_on_disk_bytes": folder_size(tmp),
            "finetune": {
                "input": str(qdir), "settings": settings, "tuned_tensors": len(tuned),
                "tuned_values": int(sum(tensors[n].numel() for n in tuned)),
                "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                "loss_first_mean": sum(losses[:k]) / k if losses else None,
                "loss_last_mean": sum(losses[-k:]) / k if losses else None, "loss_mean_of": k,
                "losses": losses, "seconds": time.time() - t0, **times,
                "resumed_at_step": resumed_at,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            },
            "quantize": {key: qreport.get(key) for key in ("seconds", "peak_rss_bytes", "fingerprint")},
        }
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    assert (folder.out / MARKER).is_file()
    return report
