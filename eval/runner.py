"""``quantkit eval``: perplexity and zero-shot accuracy of one model, as a table and a JSON results file.

Every input is checked before the model loads (task names, data files, perplexity datasets, the model folder),
so a mistake costs seconds, not a model load. The model (quantized or not) is loaded once, through transformers
with quantkit's quantizer registered: quantized linears stay packed (``QuantizedLinear``) during evaluation.

``--seqlen`` is checked against the model's ``max_position_embeddings`` before the model loads.

A figure that is not finite (the perplexity of a model whose logits hold NaN or inf) is never written as a bare
``NaN``/``Infinity``: the results file is strict JSON, with ``null`` in its place and an ``"error"`` field saying
what was not finite, in the perplexity entry and at the top level (see ``write_results``). After a non-finite
perplexity the zero-shot tasks are skipped; a NaN or inf log-likelihood in lm-eval stops the zero-shot run
(scores from such a model would mean nothing, yet lm-eval would report them). Either way the results file is
still written, for the record, and then ``quantkit eval`` exits 2 with one line naming the model and the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from quantkit.checkpoint import atomic_write_text
from quantkit.errors import QuantkitError
from quantkit.eval.c4 import C4_WINDOWS, c4_validation_ids
from quantkit.eval.model_info import describe_model
from quantkit.eval.perplexity import data_dir as resolve_data_dir
from quantkit.eval.perplexity import perplexity, wikitext2_text
from quantkit.eval.zeroshot import NonFiniteScores, resolve_tasks, zeroshot
from quantkit.loading import check_causal_lm, load_model, resolve_model

__all__ = ["PPL_DATASETS", "RESULTS_VERSION", "evaluate", "format_results", "software_versions", "write_results"]

logger = logging.getLogger(__name__)

PPL_DATASETS = ("wikitext2", "c4")
RESULTS_VERSION = 2  # 2: "kv_cache" is a list, one entry per KV-cache scheme


def _parse_ppl(ppl: str | list[str] | None, data: Path | None) -> list[str]:
    if ppl is None:
        return []
    names = ppl.split(",") if isinstance(ppl, str) else list(ppl)
    names = [n.strip() for n in names if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in PPL_DATASETS]
    if unknown:
        raise QuantkitError(f"unknown perplexity dataset(s): {', '.join(unknown)}; choose from "
                            f"{', '.join(PPL_DATASETS)}")
    if len(set(names)) != len(names):
        raise QuantkitError(f"a perplexity dataset is named twice: {','.join(names)}")
    if data is not None:
        if "c4" in names:
            c4_validation_ids(None, data=data)  # raises: no C4 validation data offline
        wiki = data / "wikitext-2-raw" / "wiki.test.raw"
        if "wikitext2" in names and not wiki.is_file():
            raise QuantkitError(f"WikiText-2 test file not found: {wiki}")
    return names


def software_versions() -> dict[str, str | None]:
    import quantkit

    out: dict[str, str | None] = {"python": platform.python_version(), "quantkit": quantkit.__version__}
    for dist in ("torch", "transformers", "lm_eval", "datasets", "accelerate", "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _ppl_entry(name: str, ids: torch.Tensor, model, *, seqlen: int, windows: int | None) -> dict[str, Any]:
    r = perplexity(model, ids, seqlen=seqlen, windows=windows)
    available = r.tokens // seqlen
    if name == "c4":
        protocol = f"GPTQ C4 validation: {r.windows} of its {C4_WINDOWS} random windows (seed 0)"
    elif r.windows == available:
        protocol = f"full: all {r.windows} windows"
    else:
        protocol = f"first {r.windows} of {available} windows"
    return {**asdict(r), "protocol": protocol}


def evaluate(
    model: str | os.PathLike | None,
    *,
    ppl: str | list[str] | None = "wikitext2",
    ppl_windows: int | None = None,
    seqlen: int = 2048,
    tasks: str | list[str] | None = None,
    limit: int | None = None,
    batch_size: int | str = 1,
    data_dir: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: str = "auto",
    command: str | None = None,
    keep_model: bool = False,
    kv_cache: str | dict[str, Any] | list[str | dict[str, Any]] | None = None,
    kv_windows: int | None = None,
    kv_long_windows: int = 0,
    kv_tables: str | os.PathLike | None = None,
    kv_fisher: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` (anything ``quantize`` accepts). Returns the results dict (see ``write_results``);
    with ``keep_model``, the loaded model is under the key ``"_model"`` (not serialized).

    ``kv_cache``: a KV-cache scheme, or a list of them scored side by side in this one run
    (quantkit.kvcache.parse_kv_scheme: ``"kivi:bits=2"``, ``"cq:bits=2,channels=4"``, ``"quanto:bits=4"``,
    ``"fp"``; ``"model"``: the folder's own), each by the chunked protocol (quantkit.eval.kv_perplexity) over the
    first ``kv_windows`` windows (default 64), and the long-context figure over ``kv_long_windows`` windows (0:
    off); results under ``"kv_cache"``, a list in the order given. CQ reads its tables from ``kv_tables`` or
    calibrates them first (C4; Fisher-guided with ``kv_fisher``)."""
    t0 = time.time()
    data, ppl_names, task_list, kv_schemes = _check_request(ppl, ppl_windows, seqlen, tasks, limit, data_dir,
                                                            kv_cache, kv_windows, kv_long_windows, kv_tables,
                                                            kv_fisher)
    source = resolve_model(model)
    _check_source(source, seqlen=seqlen, ppl=bool(ppl_names), kv_from_model="model" in kv_schemes)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    logger.info("loading %s", source.name)
    lm, tokenizer = load_model(model, dtype=dtype if dtype == "auto" else getattr(torch, dtype), device=device)
    info = describe_model(source, lm)

    results: dict[str, Any] = {
        "quantkit_eval": RESULTS_VERSION,
        "model": str(source.name),
        "model_folder": str(source.folder),
        **info.to_dict(),
        "dtype": str(next(p for p in lm.parameters() if p.is_floating_point()).dtype).removeprefix("torch."),
        "device": device,
        "data": "offline: " + str(data) if data is not None else "online: Hugging Face Hub",
        "perplexity": {},
        "tasks": {},
    }
    for name in ppl_names:
        results["perplexity"][name] = entry = _perplexity(name, lm, tokenizer, data, seqlen=seqlen,
                                                          windows=ppl_windows)
        if "error" in entry:
            results["error"] = f"{name} perplexity of {source.name}: {entry['error']}"
            if task_list:
                results["error"] += f"; zero-shot tasks {', '.join(t.name for t in task_list)} skipped"
            break
    if kv_schemes and "error" not in results:
        _kv_section(results, lm, tokenizer, source, kv_schemes, data, windows=kv_windows,
                    long_windows=kv_long_windows, tables=kv_tables, fisher=kv_fisher)
    if task_list and "error" not in results:
        try:
            results.update(_zeroshot(lm, tokenizer, task_list, data, limit=limit, batch_size=batch_size))
        except NonFiniteScores as e:
            results["error"] = f"zero-shot of {source.name}: {e}; no task scores written"
    results["versions"] = software_versions()
    results["command"] = command
    results["seconds"] = round(time.time() - t0, 1)
    if keep_model:
        results["_model"] = lm
    return results


def _check_request(ppl, ppl_windows, seqlen, tasks, limit, data_dir, kv_cache, kv_windows, kv_long_windows,
                   kv_tables, kv_fisher=False) -> tuple[Path | None, list[str], list, Any]:
    """Every argument checked before a model is touched: the data folder, the perplexity sets, the tasks and the
    KV-cache schemes (``"model"``: the folder's own, read once it is loaded)."""
    for name, v in (("--ppl-windows", ppl_windows), ("--limit", limit)):
        if v is not None and v < 1:
            raise QuantkitError(f"{name} must be at least 1, got {v}")
    if seqlen < 2:
        raise QuantkitError(f"--seqlen must be at least 2 (a window's first token is never scored), got {seqlen}")
    data = resolve_data_dir(data_dir)
    if data is not None and not data.is_dir():
        raise QuantkitError(f"data folder not found: {data}")
    ppl_names = _parse_ppl(ppl, data)
    task_list = resolve_tasks(tasks, data) if tasks else []
    kv_schemes: list = []
    if kv_cache is not None:
        from quantkit.kvcache import parse_kv_scheme

        specs = kv_cache if isinstance(kv_cache, (list, tuple)) else [kv_cache]
        kv_schemes = ["model" if spec == "model" else parse_kv_scheme(spec) for spec in specs]
        if kv_windows is not None and kv_windows < 1:
            raise QuantkitError(f"--kv-windows must be at least 1, got {kv_windows}")
        if kv_long_windows is not None and kv_long_windows < 0:
            raise QuantkitError(f"--kv-long-windows must be at least 0, got {kv_long_windows}")
        if kv_tables is not None and not Path(kv_tables).is_file():
            raise QuantkitError(f"--kv-tables file not found: {kv_tables}")
    if kv_fisher and (kv_tables is not None or not any(getattr(k, "method", None) == "cq" for k in kv_schemes)):
        raise QuantkitError("--kv-fisher fits the tables of a 'cq' --kv-cache scheme here; it takes no --kv-tables "
                            "and needs such a scheme")
    if not ppl_names and not task_list and not kv_schemes:
        raise QuantkitError("nothing to evaluate: give --ppl, --tasks and/or --kv-cache")
    return data, ppl_names, task_list, kv_schemes


def _check_source(source, *, seqlen: int, ppl: bool, kv_from_model: bool) -> None:
    """What the model's config alone can refuse: not a causal LM, no stored KV cache to score, windows longer
    than its positions."""
    check_causal_lm(source.config)
    if kv_from_model and not (getattr(source.config, "quantization_config", None) or {}).get("kv_cache"):
        raise QuantkitError(f"--kv-cache model: {source.name} stores no KV-cache scheme (quantize it with a recipe "
                            "that has a kv_cache section, or give a scheme)")
    limit_pos = getattr(source.config.get_text_config(), "max_position_embeddings", None)
    if ppl and isinstance(limit_pos, int) and seqlen > limit_pos:
        raise QuantkitError(f"--seqlen {seqlen} is longer than the position limit of {source.name} "
                            f"(max_position_embeddings = {limit_pos}); use --seqlen {limit_pos} or less")


def _kv_section(results: dict[str, Any], lm, tokenizer, source, kv_schemes: list, data: Path | None, *,
                windows: int | None, long_windows: int, tables, fisher: bool = False) -> None:
    """``results["kv_cache"]`` (one entry per scheme), and ``results["error"]`` at the first KV-cache perplexity
    that is not finite (the schemes after it are not scored)."""
    results["kv_cache"] = entries = []
    for kv_scheme in kv_schemes:
        own = tables
        if kv_scheme == "model":
            stored = getattr(lm, "_quantkit_kv_cache", None)
            if stored is None or stored[0] is None:
                raise QuantkitError(f"--kv-cache model: {source.name} loaded without its stored KV cache")
            kv_scheme, own = stored
        entries.append(kv := _kv_cache(lm, tokenizer, kv_scheme, data, windows=windows, long_windows=long_windows,
                                       tables=own, fisher=fisher))
        bad = [k for k in ("chunked", "long_context") if k in kv and not math.isfinite(kv[k]["ppl"])]
        if bad:
            results["error"] = f"KV-cache {kv['label']} {bad[0]} perplexity of {source.name} is not finite"
            return


def _kv_cache(lm, tokenizer, scheme, data: Path | None, *, windows: int | None, long_windows: int,
              tables: str | os.PathLike | None, fisher: bool = False) -> dict[str, Any]:
    from quantkit.eval.kv_perplexity import kv_evaluate
    from quantkit.kvcache import CQTables

    loaded = CQTables.load(tables) if isinstance(tables, (str, os.PathLike)) else tables  # or the folder's own
    entry = kv_evaluate(lm, tokenizer, scheme, windows=windows, long_windows=long_windows, tables=loaded, data=data,
                        calib={"fisher": True} if fisher else None)
    logger.info("KV cache %s: chunked perplexity %.4f (%s)", entry["label"], entry["chunked"]["ppl"],
                entry["chunked"]["protocol"])
    return entry


def _perplexity(name: str, lm, tokenizer, data: Path | None, *, seqlen: int, windows: int | None) -> dict[str, Any]:
    if name == "wikitext2":
        ids = tokenizer(wikitext2_text(data), return_tensors="pt").input_ids
    else:
        n = C4_WINDOWS if windows is None else min(windows, C4_WINDOWS)
        ids = c4_validation_ids(tokenizer, seqlen=seqlen, nsamples=n, data=data)
    entry = _ppl_entry(name, ids, lm, seqlen=seqlen, windows=windows)
    if not math.isfinite(entry["ppl"]):
        nll = entry["nll"]
        if math.isfinite(nll):
            entry["error"] = (f"not finite: the mean token NLL, {nll:.6g} nats, overflows exp (the model's "
                              "predictions are broken)")
        else:
            entry["error"] = (f"not finite: window {entry['windows']} has a {nll} token NLL (the model's logits "
                              "hold NaN or inf)")
        entry["ppl"] = None
        entry["nll"] = None if not math.isfinite(nll) else nll
        return entry
    logger.info("%s perplexity %.4f (%s)", name, entry["ppl"], entry["protocol"])
    return entry


def _zeroshot(lm, tokenizer, task_list, data: Path | None, *, limit: int | None,
              batch_size: int | str) -> dict[str, Any]:
    """The ``tasks`` and ``zeroshot_settings`` entries of the results."""
    import lm_eval

    tasks = {name: {**r.metrics, "samples": r.samples, "total": r.total, "lm_eval_task": r.lm_eval_name,
                    "source": r.source}
             for name, r in zeroshot(lm, tokenizer, task_list, data_dir=data, limit=limit,
                                     batch_size=batch_size).items()}
    settings = {
        "harness": "lm-eval", "num_fewshot": 0, "batch_size": batch_size, "limit": limit,
        "task_configs": "local (quantkit eval/tasks)" if data is not None else "lm-eval built-in",
        "lm_eval_version": lm_eval.__version__,
    }
    return {"tasks": tasks, "zeroshot_settings": settings}


def write_results(results: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write ``results`` to ``out`` (atomically) as strict JSON: any float that is not finite becomes ``null``,
    named in the top-level ``"error"``. When the results carry an ``"error"`` (a non-finite perplexity, say), the
    file is written and then a ``QuantkitError`` is raised, so ``quantkit eval`` exits 2 with one line."""
    path = Path(out)
    serializable = {k: v for k, v in results.items() if not k.startswith("_")}
    bad: list[str] = []
    serializable = _finite(serializable, "", bad)
    if bad:
        note = f"not finite, written as null: {', '.join(bad[:5])}" + (f" (+{len(bad) - 5} more)" if len(bad) > 5
                                                                       else "")
        serializable["error"] = f"{serializable['error']}; {note}" if serializable.get("error") else note
    text = json.dumps(serializable, indent=2, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    if serializable.get("error"):
        raise QuantkitError(f"{serializable['error']}; results written to {path}")
    return path


def _finite(x: Any, where: str, bad: list[str]) -> Any:
    """``x`` with every non-finite float replaced by None; their dotted paths are appended to ``bad``."""
    if isinstance(x, float) and not math.isfinite(x):
        bad.append(where or "(top level)")
        return None
    if isinstance(x, dict):
        return {k: _finite(v, f"{where}.{k}" if where else str(k), bad) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v, f"{where}[{i}]", bad) for i, v in enumerate(x)]
    return x


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def format_results(r: dict[str, Any]) -> str:
    """The terminal table ``quantkit eval`` prints."""
    bpw = r.get("bits_per_weight")
    lines = [
        f"model          {r['model']}",
        f"method         {r['method']}" + (f" ({r['format']})" if r.get("format") else ""),
        f"bits/weight    {_fmt(bpw)}" + (f"  ({r['stored_dtype']})" if r.get("stored_dtype") else ""),
        f"size on disk   {r['size_on_disk_bytes'] / 2**20:.1f} MiB",
    ]
    if r["perplexity"]:
        lines += ["", f"{'perplexity':16s}{'ppl':>10s}  protocol"]
        for name, p in r["perplexity"].items():
            lines.append(f"  {name:14s}{_fmt(p['ppl']):>10s}  {p['protocol']}, seqlen {p['seqlen']}"
                         + (f" ({p['error']})" if p.get("error") else ""))
    for kv in r.get("kv_cache") or []:
        b = kv["bits_per_element"]
        lines += ["", f"KV cache       {kv['label']}  ({b['512']:.3f} bits/element at 512 tokens, "
                  f"{b['4096']:.3f} at 4096)"]
        for key in ("chunked", "long_context"):
            if key in kv:
                lines.append(f"  {key:14s}{_fmt(kv[key]['ppl']):>10s}  {kv[key]['protocol']}")
    if r["tasks"]:
        s = r["zeroshot_settings"]
        lines += ["", f"zero-shot (lm-eval {s['lm_eval_version']}, {s['task_configs']} task configs"
                  + (f", first {s['limit']} documents" if s["limit"] else "") + ")",
                  f"  {'task':16s}{'acc':>8s}{'± stderr':>10s}{'acc_norm':>10s}{'± stderr':>10s}{'docs':>7s}"]
        for name, t in r["tasks"].items():
            lines.append(f"  {name:16s}{_fmt(t.get('acc')):>8s}{_fmt(t.get('acc_stderr')):>10s}"
                         f"{_fmt(t.get('acc_norm')):>10s}{_fmt(t.get('acc_norm_stderr')):>10s}{t['samples']:>7d}")
        accs = [t["acc"] for t in r["tasks"].values() if t.get("acc") is not None]
        if accs:
            lines.append(f"  {'average (acc)':16s}{sum(accs) / len(accs):8.4f}")
        for name, t in r["tasks"].items():
            if t.get("perplexity") is not None:
                lines.append(f"  ({name} perplexity {t['perplexity']:.4f})")
    return "\n".join(lines)
