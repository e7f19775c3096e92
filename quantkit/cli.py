"""``quantkit`` command line."""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]


def _quantize(a: argparse.Namespace) -> int:
    from quantkit.pipeline import quantize

    r = quantize(
        a.model, a.recipe, a.out, calib=a.calib, nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed,
        device=a.device, overwrite=a.overwrite, data_dir=a.data_dir,
    )
    rep = r.report
    print(
        f"{'unchanged' if r.skipped else 'wrote'} {r.out}\n"
        f"  bits per weight  {rep['bits_per_weight']:.4f}\n"
        f"  size on disk     {rep['size_on_disk_bytes'] / 2**20:.1f} MiB\n"
        f"  time             {rep['seconds']:.1f} s\n"
        f"  peak RSS         {rep['peak_rss_bytes'] / 2**30:.2f} GiB"
    )
    errs = [s.get("relative_output_error") for s in rep["layers"].values()]
    if errs and errs[0] is not None:
        print(f"  mean relative layer output error {sum(errs) / len(errs):.4g} "
              f"(per layer: {r.out}/quantkit_report.json)")
    return 0


def _recipes(a: argparse.Namespace) -> int:
    from quantkit.recipe import list_presets, load_recipe

    for name in list_presets():
        print(f"{name:16s} {load_recipe(name).description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quantkit", description="Post-training quantization of LLMs")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

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

    r = sub.add_parser("recipes", help="list preset recipes")
    r.set_defaults(fn=_recipes)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(levelname)s %(message)s")
    from quantkit.errors import QuantkitError

    try:
        return a.fn(a)
    except (QuantkitError, NotImplementedError) as e:
        print(f"quantkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("quantkit: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
