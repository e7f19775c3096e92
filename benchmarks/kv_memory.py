"""KV-cache memory of a long generation (issue 19, "Memory"): greedy ``generate()`` of ``--new-tokens`` tokens at
batch 1 through each cache, one fresh process per cache so peak memories do not mix.

    python benchmarks/kv_memory.py                                   # fp, KIVI 2/4-bit, CQ 2-bit; 4,096 new tokens
    python benchmarks/kv_memory.py --new-tokens 512 --specs fp cq:bits=2,channels=4,residual=64
    python benchmarks/kv_memory.py --tables-dir /work/bench/kv/tables   # reuse kv_ppl.py's fitted CQ tables

Per cache, measured at the end of the generation:
- **cache bytes** and **bytes per token**: what the cache object holds (quantkit's caches: every stored code, scale,
  zero and full-precision sink/residual tensor, plus the CQ tables; ``DynamicCache``: its key and value tensors),
  counted from the tensors themselves, and divided by the cached tokens;
- **peak RSS − RSS after loading**: the process's peak resident memory (``ru_maxrss``) above what it held once the
  model and tables were loaded and a 4-token warm-up generation had paged the weights in, i.e. the generation's
  own memory: the cache, the per-step activations and the decoded keys and values of the layer being computed;
- tokens per second of the whole generation.

transformers' quanto/HQQ caches get the peak memory only (their tensors are the backends' own types). Run from
outside the repository root (``cd /tmp && python /work/main/benchmarks/kv_memory.py``): the root's ``kernels/``
shadows the Hub's ``kernels`` package, which transformers imports.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

DEFAULT_SPECS = ["fp", "kivi:bits=4,group_size=64,residual=64", "kivi:bits=2,group_size=64,residual=64",
                 "cq:bits=2,channels=4,residual=64"]
PROMPT = "The history of the city begins"


def _rss_kib() -> int:
    """Peak resident memory of this process so far, KiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _current_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return _rss_kib()


def _cache_bytes(cache) -> int | None:
    from transformers import DynamicCache

    from quantkit.kvcache import QuantizedKVCache

    if isinstance(cache, QuantizedKVCache):
        return cache.stored_bits() // 8
    if type(cache) is DynamicCache:
        return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
                   if t is not None)
    return None


def one(spec: str, a) -> dict:
    """The measurement of one cache, in this process."""
    from transformers import GenerationConfig

    from quantkit.kvcache import CQScheme, kv_cache, parse_kv_scheme
    from quantkit.kvcache.calibrate import cached_calibration
    from quantkit.loading import load_model

    torch.manual_seed(0)
    scheme = parse_kv_scheme(spec)
    model, tok = load_model(a.model, dtype=torch.float32)
    tables = None
    if isinstance(scheme, CQScheme):  # kv_ppl.py's default calibration (16 x 1024 C4 tokens), its cached file
        tables = cached_calibration(model, tok, scheme, a.tables_dir, data_dir=a.data_dir)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    mask = torch.ones_like(ids)
    config = GenerationConfig(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False,
                              pad_token_id=tok.eos_token_id)
    with torch.no_grad():  # warm-up: the first forward pages in the weights (their files are mapped, not read)
        model.generate(ids, attention_mask=mask, generation_config=GenerationConfig(
            max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id), cache=kv_cache(model, scheme, tables))
    cache = kv_cache(model, scheme, tables)
    rss_loaded = _current_rss_kib()
    peak_before = _rss_kib()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, generation_config=config, cache=cache)
    seconds = time.perf_counter() - t0
    tokens = out.shape[1] - 1  # the last token generated is never fed back, so never cached
    stored = _cache_bytes(cache)
    return {"spec": spec, "label": scheme.label, "new_tokens": out.shape[1] - ids.shape[1], "cached_tokens": tokens,
            "cache_bytes": stored, "bytes_per_token": None if stored is None else stored / tokens,
            "rss_after_load_kib": rss_loaded, "peak_rss_kib": _rss_kib(),
            "peak_rss_before_generate_kib": peak_before,
            "generation_peak_above_loaded_kib": _rss_kib() - rss_loaded,
            "seconds": round(seconds, 2), "tokens_per_second": round((out.shape[1] - ids.shape[1]) / seconds, 2),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--specs", nargs="+", default=DEFAULT_SPECS)
    p.add_argument("--new-tokens", type=int, default=4096)
    p.add_argument("--tables-dir", default=None, help="CQ tables fitted by kv_ppl.py (16 x 1024 C4), reused here")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process: one spec, JSON on stdout
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if a.one is not None:
        print(json.dumps(one(a.one, a)))
        return
    rows = []
    for spec in a.specs:
        cmd = [sys.executable, __file__, "--one", spec, "--model", a.model, "--new-tokens", str(a.new_tokens)]
        for flag, v in (("--tables-dir", a.tables_dir), ("--data-dir", a.data_dir)):
            if v is not None:
                cmd += [flag, v]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"spec": spec, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else
                         f"exit {proc.returncode}"})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    fp = next((r for r in rows if r.get("spec") == "fp" and "error" not in r), None)
    print(f"\nmodel {a.model}; greedy generate() of {a.new_tokens} new tokens at batch 1, one process per cache")
    print("| cache | bytes per token | cache MiB | peak RSS above loaded, MiB | vs fp | tokens/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['spec']} | {r['error']} |")
            continue
        bpt = "–" if r["bytes_per_token"] is None else f"{r['bytes_per_token']:,.0f}"
        mib = "–" if r["cache_bytes"] is None else f"{r['cache_bytes'] / 2**20:.1f}"
        peak = r["generation_peak_above_loaded_kib"] / 1024
        base = fp["generation_peak_above_loaded_kib"] / 1024 if fp else 0.0
        rel = f"{peak / base:.2f}×" if base >= 1.0 else "–"  # short runs stay inside memory already held
        print(f"| {r['label']} | {bpt} | {mib} | {peak:.1f} | {rel} | {r['tokens_per_second']:.1f} |")
    if a.out:
        Path(a.out).write_text(json.dumps({"model": a.model, "new_tokens": a.new_tokens, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
