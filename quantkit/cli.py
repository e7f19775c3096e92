"""``quantkit`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import traceback
from pathlib import Path

from quantkit.errors import QuantkitError, describe_os_error

__all__ = ["main"]


def _quantize(a: argparse.Namespace) -> int:
    from quantkit.pipeline import quantize

    r = quantize(
        a.model, a.recipe, a.out, calib=a.calib, nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed,
        device=a.device, overwrite=a.overwrite, data_dir=a.data_dir,
    )
    rep = r.report
    bpw = rep["bits_per_weight"]
    split = rep.get("bits_per_weight_by_tensor")  # absent in reports written before it existed
    split = f" ({', '.join(f'{k} {v:.3f}' for k, v in split.items())})" if split else ""
    kv = rep["recipe"].get("kv_cache")
    print(
        f"{'unchanged' if r.skipped else 'wrote'} {r.out}\n"
        f"  bits per weight  {'weights not quantized' if bpw is None else f'{bpw:.4f}{split}'}\n"
        + (f"  KV cache         {kv['method']} {kv['bits']} bits\n" if kv else "") +
        f"  size on disk     {rep['size_on_disk_bytes'] / 2**20:.1f} MiB\n"
        f"  time             {rep['seconds']:.1f} s\n"
        f"  peak RSS         {rep['peak_rss_bytes'] / 2**30:.2f} GiB"
    )
    errs = [s.get("relative_output_error") for s in rep["layers"].values()]
    if errs and errs[0] is not None:
        print(f"  mean relative layer output error {sum(errs) / len(errs):.4g} "
              f"(per layer: {r.out}/quantkit_report.json)")
    return 0


def _finetune(a: argparse.Namespace) -> int:
    from quantkit.finetune import finetune

    r = finetune(a.model, a.out, steps=a.steps, lr=a.lr, calib=a.calib, nsamples=a.nsamples, seqlen=a.seqlen,
                 seed=a.seed, teacher=a.teacher, checkpoint_every=a.checkpoint_every, data_dir=a.data_dir,
                 overwrite=a.overwrite)
    f = r.report["finetune"]
    print(f"{'unchanged' if r.skipped else 'wrote'} {r.out}\n"
          f"  bits per weight  {r.report['bits_per_weight']:.4f} (unchanged)\n"
          f"  KL (nats/token)  {f['loss_first_mean']:.4f} -> {f['loss_last_mean']:.4f} "
          f"(mean of the first and last {f['loss_mean_of']} steps)\n"
          f"  time             {f['seconds']:.1f} s\n"
          f"  peak RSS         {f['peak_rss_bytes'] / 2**30:.2f} GiB")
    return 0


def _budgets(v: str) -> list[float]:
    try:
        out = [float(x) for x in v.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of bits per weight: {v!r}") from None
    if not out or any(not 0 < b < 64 for b in out):
        raise argparse.ArgumentTypeError(f"budgets are bits per weight between 0 and 64: {v!r}")
    return sorted(set(out))


def _allocate(a: argparse.Namespace) -> int:
    from quantkit.allocate import SensitivitySettings, allocate, load_candidates

    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise QuantkitError(f"--out {out} is a file; name a folder")
    candidates = load_candidates(a.candidates)
    settings = SensitivitySettings(min(2, a.nsamples) if a.kl_windows is None else a.kl_windows,
                                   min(256, a.seqlen) if a.kl_tokens is None else a.kl_tokens, a.kl_noise,
                                   a.kl_probe)
    m, results = allocate(a.model, candidates, a.budget, out, calib=a.calib, nsamples=a.nsamples, seqlen=a.seqlen,
                          seed=a.seed, device=a.device, data_dir=a.data_dir, settings=settings,
                          granularity=a.granularity, sensitivity=a.sensitivity, reuse=a.reuse_errors)
    print(f"measurement {out / 'measurement.json'} ({len(m['linears'])} linears x {len(m['candidates'])} "
          "candidates)")
    unit = "nats/token" if a.sensitivity == "kl" else "(objective)"
    for r in results:
        print(f"  budget {r.budget:<5g} {r.bits_per_weight:.4f} bits per weight  predicted {r.predicted:.4g} "
              f"{unit}  solved in {r.seconds:.2f} s  -> {r.recipe}")
    return 0


def _eval(a: argparse.Namespace) -> int:
    from quantkit.eval.runner import evaluate, format_results, write_results

    if a.model_arg and a.model and a.model_arg != a.model:
        raise QuantkitError(f"two models named: {a.model_arg} and --model {a.model}")
    _check_writable(Path(a.out), "--out", replaceable=_is_results_file, what="a quantkit eval results file")
    r = evaluate(
        a.model or a.model_arg, ppl=a.ppl, ppl_windows=a.ppl_windows, seqlen=a.seqlen, tasks=a.tasks, limit=a.limit,
        batch_size=a.batch_size, data_dir=a.data_dir, device=a.device, dtype=a.dtype, command=a.command_line,
        kv_cache=a.kv_cache, kv_windows=a.kv_windows, kv_long_windows=a.kv_long_windows, kv_tables=a.kv_tables,
        kv_fisher=a.kv_fisher,
    )
    path = write_results(r, a.out)
    print(format_results(r))
    print(f"\nwrote {path}")
    return 0


def _report(a: argparse.Namespace) -> int:
    from quantkit.checkpoint import atomic_write_text
    from quantkit.eval.report import load_results, markdown_table, pareto_plot

    inputs = {Path(r).resolve() for r in a.results}
    for flag, path, suffixes in (("--out", a.out, (".md", ".markdown", ".txt")), ("--plot", a.plot, (".png",)),
                                 ("--bits-plot", a.bits_plot, (".png",))):
        if path is None:
            continue
        if Path(path).resolve() in inputs:
            raise QuantkitError(f"{flag} {path} is one of the results files being read")
        if Path(path).suffix.lower() not in suffixes:
            raise QuantkitError(f"{flag} {path}: expected a {' or '.join(suffixes)} file")
        _check_writable(Path(path), flag)
    runs = load_results(a.results)
    text = markdown_table(runs)
    if a.bits_plot:
        from quantkit.allocate.emit import folder_cells, heatmap

        folders = [r for r in runs if (Path(r.get("model_folder") or "") / "quantkit_report.json").is_file()]
        if not folders:
            raise QuantkitError("--bits-plot: no run is of a folder written by quantkit quantize")
        heatmap([(f"{r['_label']}: {r['bits_per_weight']:.3f} bits per weight", folder_cells(r["model_folder"]))
                 for r in folders], a.bits_plot)
        text += f"\n![stored bits per weight of each linear]({Path(a.bits_plot).as_posix()})\n"
    if a.plot:
        plot = pareto_plot(runs, a.plot)
        if a.out:  # link the plot from the report, relative to it when possible
            try:
                rel = Path(plot).resolve().relative_to(Path(a.out).resolve().parent)
            except ValueError:
                rel = Path(plot).resolve()
            text += f"\n![perplexity and zero-shot accuracy against bits per weight]({rel.as_posix()})\n"
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(a.out), text)
        print(f"wrote {a.out}" + (f" and {a.plot}" if a.plot else ""))
    else:
        print(text, end="")
        if a.plot:
            print(f"\nwrote {a.plot}")
    return 0


def _is_results_file(path: Path) -> bool:
    try:
        return "quantkit_eval" in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def _check_writable(path: Path, flag: str, *, replaceable=None, what: str = "") -> None:
    """Before any work: ``path`` can be written, and an existing file there is one we may replace."""
    if path.is_dir():
        raise QuantkitError(f"{flag} {path} is a folder; name a file")
    if path.exists() and replaceable is not None and not replaceable(path):
        raise QuantkitError(f"{flag} {path} exists and is not {what}; it is never overwritten: choose another path")
    parent = next((q for q in path.absolute().parents if q.exists()), None)
    if parent is None or not parent.is_dir():
        raise QuantkitError(f"{flag} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise QuantkitError(f"{flag} {path}: cannot write in {parent}")


def _batch_size(v: str) -> int | str:
    if v == "auto" or v.startswith("auto:"):
        return v
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer or 'auto': {v!r}") from None


def _recipes(a: argparse.Namespace) -> int:
    from quantkit.config.recipe import list_presets, load_recipe

    for name in list_presets():
        print(f"{name:16s} {load_recipe(name).description}")
    return 0


def _verify(a: argparse.Namespace) -> int:
    from quantkit.verify import verify

    print(verify(a.folder).summary())
    return 0


def _export(a: argparse.Namespace) -> int:
    from quantkit.export import export

    r = export(a.folder, a.to, a.out, overwrite=a.overwrite)
    print(f"{'unchanged' if r.skipped else 'wrote'} {r.out} ({r.target}, {r.report.get('format', '')})")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line like every other (``--help`` shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"quantkit: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="quantkit", description="Post-training quantization of LLMs")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_quantize, _add_finetune, _add_eval, _add_report, _add_verify, _add_export, _add_allocate,
                _add_recipes):
        add(sub)
    return p


def _add_quantize(sub) -> None:
    q = sub.add_parser("quantize", help="quantize a model with a recipe and write a packed checkpoint")
    q.add_argument("--model", default=None,
                   help="Hugging Face id, local folder, .gguf file, or smollm2-135m (the bundled model; default)")
    q.add_argument("--recipe", required=True, help="preset name (see `quantkit recipes`) or a YAML file")
    q.add_argument("--out", required=True, help="output folder (written atomically)")
    q.add_argument("--calib", default="c4", help="c4 | wikitext2 | PATH to .txt/.jsonl (field 'text'); default c4")
    q.add_argument("--nsamples", type=int, default=128, help="calibration sequences (default 128)")
    q.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration sequence (default 2048)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    q.add_argument("--data-dir", default=None, help="local data folder (default: $QUANTKIT_DATA_DIR)")
    q.add_argument("--overwrite", action="store_true", help="replace an output folder that holds another model")
    q.set_defaults(fn=_quantize)


def _add_finetune(sub) -> None:
    ft = sub.add_parser("finetune", help="tune a quantized checkpoint's codebooks, scales and norms end to end "
                        "(KL to its fp source model on calibration windows); codes stay as they are")
    ft.add_argument("--model", required=True, metavar="QDIR", help="a folder written by `quantkit quantize`")
    ft.add_argument("--out", required=True, help="output folder (written atomically; resumable)")
    ft.add_argument("--steps", type=int, default=200, help="Adam steps, one calibration window each (default 200)")
    ft.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    ft.add_argument("--teacher", default=None,
                    help="the fp model to match (default: the source model QDIR's report records)")
    ft.add_argument("--calib", default="c4", help="as for quantize (default c4)")
    ft.add_argument("--nsamples", type=int, default=16, help="calibration windows (default 16)")
    ft.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--checkpoint-every", type=int, default=25, help="save the state every N steps (default 25)")
    ft.add_argument("--data-dir", default=None, help="local data folder (default: $QUANTKIT_DATA_DIR)")
    ft.add_argument("--overwrite", action="store_true", help="replace an output folder quantkit wrote earlier")
    ft.set_defaults(fn=_finetune)


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="perplexity and zero-shot accuracy (lm-eval) of a model, quantized or not")
    e.add_argument("model_arg", nargs="?", default=None, metavar="MODEL", help="same as --model")
    e.add_argument("--model", default=None,
                   help="anything quantize accepts, or a folder written by quantize (default: smollm2-135m)")
    e.add_argument("--ppl", default="wikitext2",
                   help="comma-separated perplexity datasets: wikitext2, c4 (online only); 'none' to skip "
                   "(default wikitext2)")
    e.add_argument("--ppl-windows", type=int, default=None,
                   help="score only the first N windows (quick protocol: 16); default all (full protocol)")
    e.add_argument("--seqlen", type=int, default=2048, help="perplexity window length in tokens (default 2048)")
    e.add_argument("--tasks", default=None,
                   help="comma-separated zero-shot tasks: arc_easy,arc_challenge,piqa,winogrande,lambada_openai "
                   "or 'all' (offline: these five; online: any lm-eval task name)")
    e.add_argument("--limit", type=int, default=None, help="score only the first N documents of each task")
    e.add_argument("--batch-size", type=_batch_size, default=1,
                   help="lm-eval batch size, an integer or 'auto' (default 1, as the lm_eval command line)")
    e.add_argument("--data-dir", default=None,
                   help="local data folder: offline perplexity files and zero-shot task configs "
                   "(default: $QUANTKIT_DATA_DIR; neither: online, from the Hugging Face Hub)")
    e.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype of the unquantized parts (default: as stored)")
    e.add_argument("--kv-cache", default=None, metavar="SPEC", action="append",
                   help="KV-cache scheme scored by the chunked protocol (WikiText-2 windows of 512 in chunks of 64): "
                   "fp, kivi:bits=2,group_size=64,residual=64,sink=0, cq:bits=2,channels=4,residual=64, "
                   "quanto:bits=4, hqq:bits=2 (or a JSON object), or 'model': the scheme and tables the quantized "
                   "folder stores; repeat it to score several side by side in one run")
    e.add_argument("--kv-windows", type=int, default=None, help="chunked protocol: first N windows (default 64)")
    e.add_argument("--kv-long-windows", type=int, default=0,
                   help="also the long-context figure (windows of 2048, last 256 scored) over N windows (default 0)")
    e.add_argument("--kv-tables", default=None, help="CQ tables (safetensors); default: calibrate on C4 first")
    e.add_argument("--kv-fisher", action="store_true",
                   help="calibrate CQ tables Fisher-guided (each vector weighted by its squared loss gradients)")
    e.add_argument("--out", required=True, help="results JSON file")
    e.set_defaults(fn=_eval)


def _add_report(sub) -> None:
    rp = sub.add_parser("report", help="compare eval results: a Markdown table and a Pareto plot")
    rp.add_argument("results", nargs="+", help="results files written by `quantkit eval --out`")
    rp.add_argument("--out", default=None, help="write the Markdown report here (default: print it)")
    rp.add_argument("--plot", default=None, help="write the plot (PNG) here")
    rp.add_argument("--bits-plot", default=None,
                    help="write the stored bits per weight of each linear (decoder layers x linear kinds) of the "
                    "quantized runs here (PNG), one heat map per run")
    rp.set_defaults(fn=_report)


def _add_verify(sub) -> None:
    v = sub.add_parser("verify", help="check a quantized checkpoint: config, every tensor's presence, shape and "
                       "dtype, and the stored checksums (no model is run)")
    v.add_argument("folder", metavar="DIR", help="a folder written by `quantkit quantize`")
    v.set_defaults(fn=_verify)


def _add_export(sub) -> None:
    x = sub.add_parser("export", help="rewrite a quantized checkpoint in a format serving engines load "
                       "(compressed-tensors: transformers, vLLM); refuses layers the format cannot express exactly")
    x.add_argument("folder", metavar="DIR", help="a folder written by `quantkit quantize` (only read)")
    x.add_argument("--to", required=True, metavar="FORMAT",
                   help="compressed-tensors (pack-quantized: uniform integer grids of 1-8 bits, no rotation); "
                   "gptq is not implemented")
    x.add_argument("--out", required=True, help="output folder (written atomically)")
    x.add_argument("--overwrite", action="store_true", help="replace an output folder quantkit wrote earlier")
    x.set_defaults(fn=_export)


def _add_allocate(sub) -> None:
    al = sub.add_parser("allocate", help="mixed bit allocation: measure each linear's error per candidate scheme "
                        "and its sensitivity once, then write one recipe per bits budget")
    al.add_argument("--model", default=None, help="as for quantize (default: smollm2-135m, the bundled model)")
    al.add_argument("--candidates", default="default",
                    help="YAML list of candidate schemes (preset names, fp16, or scheme mappings); default: the "
                    "built-in set: gptq at 2 bits (g64/g128), 3 and 4 bits (g64/g128/g256/per row) and 8 bits, "
                    "the same after a Hadamard rotation at 2-4 bits, rtn-w4g128 and rtn-w8, the codebook presets "
                    "hadamard-gptq-vq2 and -vq3, vq3's pairs with 32/128/256 entries (2.5/3.5/4 bits), and fp16)")
    al.add_argument("--budget", required=True, type=_budgets,
                    help="comma-separated budgets in stored bits per weight, e.g. 2.5,3.0,3.5,4.0")
    al.add_argument("--out", required=True,
                    help="folder: measurement.json (reused by later runs with other budgets), recipe-B.yaml, "
                    "recipe-B.png, allocation.json")
    al.add_argument("--granularity", default="linear", choices=["linear", "layer"],
                    help="one candidate per linear (default) or per decoder layer")
    al.add_argument("--sensitivity", default="kl", choices=["kl", "lwq", "none"],
                    help="weight of each linear's relative error: its measured KL coefficient (default), the "
                    "layer's LWQ score 1-cos(in, out), or none")
    al.add_argument("--calib", default="c4", help="as for quantize (default c4)")
    al.add_argument("--nsamples", type=int, default=128, help="calibration sequences (default 128)")
    al.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration sequence (default 2048)")
    al.add_argument("--seed", type=int, default=0)
    al.add_argument("--kl-windows", type=int, default=None,
                    help="calibration sequences the KL sensitivity is measured on (default 2)")
    al.add_argument("--kl-tokens", type=int, default=None, help="their first N tokens (default 256, at most --seqlen)")
    al.add_argument("--kl-noise", type=float, default=0.01,
                    help="relative output error of the injected noise, with --kl-probe noise (default 0.01)")
    al.add_argument("--kl-probe", default=None, metavar="CANDIDATE[,CANDIDATE...]|noise",
                    help="whose errors measure each linear's sensitivity: candidates' rounding (one coefficient "
                         "per probe; a candidate is priced by the probe of its family: same rotation and "
                         "quantizer, else same rotation), or Gaussian noise (default: gptq-w3g128 and "
                         "hadamard-gptq-vq3, those that are candidates, else noise)")
    al.add_argument("--reuse-errors", default=None, metavar="MEASUREMENT.json",
                    help="take the candidates' errors from a kept measurement of the same model, candidates and "
                    "calibration (any sensitivity settings, quantkit measurement version 2 or later) and measure "
                    "only the sensitivities; --out must not hold another measurement")
    al.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    al.add_argument("--data-dir", default=None, help="local data folder (default: $QUANTKIT_DATA_DIR)")
    al.set_defaults(fn=_allocate)


def _add_recipes(sub) -> None:
    r = sub.add_parser("recipes", help="list preset recipes")
    r.set_defaults(fn=_recipes)

def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    a.command_line = shlex.join(["quantkit", *(sys.argv[1:] if argv is None else argv)])
    debug = a.verbose or os.environ.get("QUANTKIT_DEBUG", "") not in ("", "0")
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(levelname)s %(message)s",
                        force=True)
    try:
        return a.fn(a)
    except (QuantkitError, NotImplementedError) as e:
        return _fail(str(e), debug)
    except OSError as e:  # disk full, read-only folder, permissions: one line naming the file
        return _fail(describe_os_error(e), debug)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("quantkit: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # a bug of ours or of a library: still one line, the traceback on request
        return _fail(f"unexpected {type(e).__name__}: {e} (rerun with --verbose or QUANTKIT_DEBUG=1 for the "
                     "traceback, and please report it)", debug, code=1)


def _fail(message: str, debug: bool, code: int = 2) -> int:
    if debug:
        traceback.print_exc()
    message = " ".join(message.split()) or "failed"
    print(f"quantkit: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
