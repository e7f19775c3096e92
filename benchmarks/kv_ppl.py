"""KV-cache quantization on SmolLM2 (or any model): the chunked WikiText-2 perplexity (DESIGN.md, "KV-cache
perplexity") of the fp cache and each quantized cache, in one run and one table.

    python benchmarks/kv_ppl.py                                  # the default rows, first 64 windows
    python benchmarks/kv_ppl.py --windows 8                      # quick
    python benchmarks/kv_ppl.py --long-windows 16                # plus the long-context figure
    python benchmarks/kv_ppl.py --specs fp kivi:bits=2 cq:bits=2,channels=4 --tables-dir /tmp/kvtables

Rows: method (the scheme's label: bits, group ``g``, residual window ``r`` and sink tokens ``s`` in full
precision), stored bits per element at 512 and at 4096 tokens of context (CQ tables amortized over it; quanto/HQQ:
codes, scales and zeros only), the perplexity and its change from the fp row. CQ tables are calibrated on C4
(``--calib-*``; cached under ``--tables-dir`` when given). Run from outside the repository root (its ``kernels/``
shadows the Hub's ``kernels`` package, which transformers imports): ``cd /tmp && python /work/main/benchmarks/...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

DEFAULT_SPECS = [
    "fp",
    "kivi:bits=4,group_size=64,residual=64",
    "kivi:bits=2,group_size=64,residual=64",
    "cq:bits=4,channels=2,residual=64",
    "cq:bits=2,channels=4,residual=64",
    "cq:bits=1,channels=8,residual=64",
    "cq:bits=4,channels=2,residual=64,keys=pre-rope",
    "cq:bits=2,channels=4,residual=64,keys=pre-rope",
    "cq:bits=1,channels=8,residual=64,keys=pre-rope",
    "quanto:bits=4",
    "quanto:bits=2",
    "hqq:bits=4",
    "hqq:bits=2",
]


def _tables(model, tok, scheme, args):
    from quantkit.kvcache import CQScheme
    from quantkit.kvcache.calibrate import cached_calibration

    if not isinstance(scheme, CQScheme):
        return None
    return cached_calibration(model, tok, scheme, args.tables_dir, nsamples=args.calib_nsamples,
                              seqlen=args.calib_seqlen, iters=args.iters, sample=args.sample, seed=args.seed,
                              fisher=args.fisher or args.channel_weights, channel_weights=args.channel_weights,
                              data_dir=args.data_dir)


def main(argv: list[str] | None = None) -> None:
    from quantkit.eval.kv_perplexity import kv_evaluate, wikitext2_ids
    from quantkit.kvcache import parse_kv_scheme
    from quantkit.loading import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--specs", nargs="+", default=DEFAULT_SPECS)
    p.add_argument("--windows", type=int, default=64, help="chunked protocol: first N windows of 512 (default 64)")
    p.add_argument("--long-windows", type=int, default=0, help="long-context figure over N windows of 2048 (0: off)")
    p.add_argument("--calib-nsamples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=1024)
    p.add_argument("--iters", type=int, default=20, help="Lloyd iterations of the CQ tables")
    p.add_argument("--sample", type=int, default=16384, help="calibration vectors per CQ table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fisher", action="store_true", help="Fisher-guided CQ tables (quantkit.kvcache.calibrate)")
    p.add_argument("--channel-weights", action="store_true",
                   help="Fisher-guided CQ tables with per-channel weights too (implies --fisher)")
    p.add_argument("--tables-dir", default=None, help="cache fitted CQ tables here")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="write every row as JSON here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    schemes = [parse_kv_scheme(s) for s in a.specs]  # every spec checked before the model loads
    model, tok = load_model(a.model, dtype=torch.float32)
    ids = wikitext2_ids(tok, a.data_dir)
    rows = []
    for scheme in schemes:
        t0 = time.time()
        try:
            tables = _tables(model, tok, scheme, a)
            entry = kv_evaluate(model, tok, scheme, ids=ids, windows=a.windows, long_windows=a.long_windows,
                                tables=tables, progress=False)
        except Exception as e:  # a backend that does not install here: a row saying so, not a lost run
            logging.warning("%s: %s", scheme.label, e)
            entry = {"label": scheme.label, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
        entry["seconds"] = round(time.time() - t0, 1)
        rows.append(entry)
        logging.info("%s", json.dumps({k: v for k, v in entry.items() if k != "tables"}))

    fp = next((r for r in rows if r.get("scheme", {}).get("method") == "fp" and "chunked" in r), None)
    print(f"\nmodel {a.model}; chunked protocol: first {a.windows} windows of 512 in chunks of 64"
          + (f"; long context: {a.long_windows} windows of 2048, last 256 scored" if a.long_windows else ""))
    head = f"| {'method':28s} | bits/el @512 | bits/el @4096 | ppl      | Δ% vs fp |"
    if a.long_windows:
        head += " long ppl | Δ% vs fp |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        if "error" in r:
            print(f"| {r['label']:28s} | {r['error']}")
            continue
        b = r["bits_per_element"]
        line = f"| {r['label']:28s} | {b['512']:12.3f} | {b['4096']:13.3f} | {_ppl(r, fp, 'chunked')} |"
        if a.long_windows:
            line += f" {_ppl(r, fp, 'long_context')} |"
        print(line)
    if a.out:
        Path(a.out).write_text(json.dumps({"model": a.model, "windows": a.windows, "long_windows": a.long_windows,
                                           "rows": rows}, indent=2))


def _ppl(r: dict, fp: dict | None, key: str) -> str:
    ppl = r[key]["ppl"]
    delta = f"{100 * (ppl / fp[key]['ppl'] - 1):+8.2f}" if fp is not None and key in fp else f"{'-':>8s}"
    return f"{ppl:8.3f} | {delta}"


if __name__ == "__main__":
    main()
