"""Time of fitting coupled-quantization tables for one decoder layer, and the k-means objective they reach.

One layer of SmolLM2-135M at the KV-cache step's settings: 3 KV heads of 64 channels, c = 2 channels per code at
4 bits per channel (256 centroids per table, 32 tables per head), 16,384 vectors per table, 20 Lloyd iterations;
keys and values. The data is synthetic and correlated (per-channel scales and offsets, each channel pair mixed, a
low-rank component shared by the head's channels), or SmolLM2's own keys and values with ``--real`` (collected by
``quantkit.kvcache.calibrate.collect_kv`` on C4 windows; run it under the heavy-job lock).

It times ``quantkit.kvcache.codebook.fit_codebooks`` and, with ``--reference``, the implementation it replaced
(plain k-means++ seeding, a [P, N] pass per centroid with ``torch.multinomial``, then plain Lloyd iterations),
kept below as ``reference_kmeans``, and prints for each: wall and CPU seconds and the objective, the mean squared
error per element of the vectors read back through their fp16 tables (each vector at its nearest centroid).

    python benchmarks/cq_fit.py --reference [--seeds 0,1] [--threads 1] [--real]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from quantkit.kvcache.codebook import fit_codebooks, nearest_centroid

__all__ = ["objective", "reference_kmeans", "synthetic_kv"]


def synthetic_kv(heads: int, vectors: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [heads, vectors, dim]: adjacent channel pairs mixed, log-normal channel scales, a shared
    rank-4 component; keys get large per-channel offsets (as post-RoPE keys of real models have)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for offset in (2.0, 0.2):
        pairs = torch.randn(heads, vectors, dim // 2, 1, 2, generator=g) @ torch.randn(heads, 1, dim // 2, 2, 2,
                                                                                      generator=g)
        x = pairs.reshape(heads, vectors, dim) * torch.exp(0.8 * torch.randn(heads, 1, dim, generator=g))
        x = x + 0.5 * torch.randn(heads, vectors, 4, generator=g) @ torch.randn(heads, 4, dim, generator=g)
        out.append(x + offset * torch.randn(heads, 1, dim, generator=g))
    return out[0], out[1]


def real_kv(layer: int, nsamples: int, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SmolLM2's keys and values at decoder ``layer`` over ``nsamples`` C4 windows of ``seqlen`` tokens."""
    from transformers import AutoModelForCausalLM

    from quantkit.data import calibration_ids, load_calibration_texts
    from quantkit.kvcache.calibrate import collect_kv
    from quantkit.loading import load_tokenizer, resolve_model

    source = resolve_model("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float32).eval()
    ids = calibration_ids(load_tokenizer(source), load_calibration_texts("c4"), nsamples=nsamples, seqlen=seqlen,
                          seed=0)
    K, V = collect_kv(model, ids)
    return K[layer], V[layer]


def reference_kmeans(X: torch.Tensor, K: int, *, iters: int = 20, seed: int = 0, chunk: int = 16) -> torch.Tensor:
    """The k-means of quantkit.kvcache.codebook before it was made faster (unweighted): k-means++ with
    ``torch.multinomial`` over every vector for each of the ``K`` centroids, then ``iters`` plain Lloyd
    iterations over all vectors and centroids, ``chunk`` problems at a time."""
    P, N, c = X.shape
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(0, P, chunk):
        Xs = X[s : s + chunk].float()
        p_, ar = Xs.shape[0], torch.arange(Xs.shape[0])
        C = Xs[ar, torch.randint(0, N, (p_,), generator=g)].unsqueeze(1)
        best = ((Xs - C) ** 2).sum(-1)
        for _ in range(1, K):
            total = best.sum(1, keepdim=True)
            p = torch.where(total > 0, best / total.clamp(min=1e-30), torch.full_like(best, 1.0 / N))
            nxt = Xs[ar, torch.multinomial(p, 1, generator=g).squeeze(1)].unsqueeze(1)
            C = torch.cat([C, nxt], dim=1)
            best = torch.minimum(best, ((Xs - nxt) ** 2).sum(-1))
        for _ in range(iters):
            d = (C * C).sum(-1).unsqueeze(1) - 2 * Xs @ C.transpose(1, 2)
            a = d.argmin(-1)
            num = torch.zeros_like(C).scatter_add_(1, a.unsqueeze(-1).expand(-1, -1, c), Xs)
            cnt = torch.zeros(C.shape[:2]).scatter_add_(1, a, torch.ones_like(a, dtype=torch.float32))
            C = torch.where(cnt.unsqueeze(-1) > 0, num / cnt.clamp(min=1).unsqueeze(-1), C)
        out.append(C)
    return torch.cat(out)


def _groups(X: torch.Tensor, c: int) -> torch.Tensor:
    """[H, N, D] -> [H·D/c, N, c], the problems of fit_codebooks."""
    H, N, D = X.shape
    return X.reshape(H, N, D // c, c).permute(0, 2, 1, 3).reshape(H * D // c, N, c)


def objective(X: torch.Tensor, C: torch.Tensor) -> float:
    """Mean squared error per element of ``X`` [P, N, c] at each vector's nearest centroid of ``C`` [P, K, c]."""
    C = C.float()
    a = nearest_centroid(X, C)
    return (X - torch.gather(C, 1, a.unsqueeze(-1).expand(-1, -1, X.shape[-1]))).pow(2).mean().item()


def _timed(fn, *args, **kwargs):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--bits", type=int, default=4, help="bits per channel (the table has 2^(c·bits) centroids)")
    ap.add_argument("--vectors", type=int, default=16384)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--seeds", default="0", help="k-means seeds, comma-separated")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--reference", action="store_true", help="also run the implementation before the speed-up")
    ap.add_argument("--real", action="store_true", help="SmolLM2's keys and values instead of synthetic ones")
    ap.add_argument("--layer", type=int, default=15, help="with --real: the decoder layer")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.real:
        K, V = real_kv(args.layer, nsamples=max(1, args.vectors // 2048 + 1), seqlen=2048)
        source = f"SmolLM2 layer {args.layer}, C4"
    else:
        K, V = synthetic_kv(args.heads, args.vectors, args.head_dim, seed=0)
        source = "synthetic"
    c, code_bits = args.channels, args.channels * args.bits
    rows = []
    for kind, X in (("keys", K), ("values", V)):
        if X.shape[1] > args.vectors:
            X = X[:, torch.randperm(X.shape[1], generator=torch.Generator().manual_seed(0))[: args.vectors]]
        problems = _groups(X, c)
        for seed in (int(s) for s in args.seeds.split(",")):
            C, wall, cpu = _timed(fit_codebooks, X, c, code_bits, iters=args.iters, seed=seed)
            row = {"kind": kind, "seed": seed, "new_s": round(wall, 2), "new_cpu_s": round(cpu, 2),
                   "new_obj": objective(problems, C.reshape(problems.shape[0], -1, c))}
            if args.reference:
                R, wall, cpu = _timed(reference_kmeans, problems, 2**code_bits, iters=args.iters, seed=seed)
                row.update(ref_s=round(wall, 2), ref_cpu_s=round(cpu, 2), ref_obj=objective(problems, R.half()))
                row.update(speedup=round(row["ref_s"] / max(row["new_s"], 1e-9), 2),
                           obj_ratio=round(row["new_obj"] / row["ref_obj"], 5))
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"source": source, "shape": list(K.shape), "vectors": args.vectors, "c": c, "bits": args.bits,
              "iters": args.iters, "threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
