"""Which half of a CQ cache costs the perplexity: the chunked KV-cache perplexity (DESIGN.md) with only the keys
coded and the values kept in full precision, then the other way round.

    cd /tmp && python /work/main/benchmarks/kv_split.py --tables TABLES.safetensors \\
        --spec cq:bits=2,channels=4,residual=64,sink=1,keys=pre-rope --windows 8

``--tables``: CQ tables fitted for ``--spec`` (``benchmarks/kv_ppl.py --tables-dir`` caches them). The half left
in full precision is stored as it comes (its ``encode`` and ``decode`` are the identity), so the cache, its
residual and sink windows and the protocol are otherwise those of ``kv_ppl.py``.
"""

from __future__ import annotations

import argparse

import torch


def main(argv: list[str] | None = None) -> None:
    from quantkit.eval.kv_perplexity import kv_evaluate, wikitext2_ids
    from quantkit.kvcache import CQTables
    from quantkit.kvcache.layers import CQLayer
    from quantkit.loading import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tables", required=True)
    p.add_argument("--spec", required=True)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--data-dir", default=None)
    a = p.parse_args(argv)
    model, tok = load_model(a.model, dtype=torch.float32)
    ids = wikitext2_ids(tok, a.data_dir)
    tables = CQTables.load(a.tables)
    encode, decode = CQLayer.encode, CQLayer.decode

    def only(coded: str):
        def enc(self, x, kind, positions):
            return encode(self, x, kind, positions) if kind == coded else {"codes": x.clone()}

        def dec(self, t, kind):
            return decode(self, t, kind) if kind == coded else t["codes"].float()

        return enc, dec

    fp = kv_evaluate(model, tok, "fp", ids=ids, windows=a.windows, progress=False)["chunked"]["ppl"]
    print(f"{a.model}, first {a.windows} windows: fp {fp:.3f}")
    try:
        for coded in ("keys", "values"):
            CQLayer.encode, CQLayer.decode = only(coded)
            ppl = kv_evaluate(model, tok, a.spec, ids=ids, windows=a.windows, tables=tables,
                              progress=False)["chunked"]["ppl"]
            print(f"{a.spec}, only the {coded} coded: {ppl:.3f} ({100 * (ppl / fp - 1):+.1f}%)")
    finally:
        CQLayer.encode, CQLayer.decode = encode, decode


if __name__ == "__main__":
    main()
