"""The Triton kernels compile for an H100/H200 (sm_90), on this CPU-only machine.

The interpreter tests (tests/test_kernels.py) check what the kernels compute; this checks that the compiler accepts
them, which the interpreter does not: it ran code the compiler rejects (a constexpr reassigned in an unrolled loop
in the Hadamard transform). Every variant is compiled with Triton's compiler and ptxas through
``benchmarks.kernel_aot``, in a subprocess because the test session imported Triton in interpreter mode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[1]  # the tools (benchmarks/) run from here; they are not in the wheel

# Each case: the variant builder and its arguments; the subprocess compiles them all and reports resources.
_SCRIPT = r"""
import json, sys, torch
from benchmarks import kernel_aot as aot
f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
cases = json.loads(sys.argv[1])
out = []
for name, kind, kw, which in cases:
    kw = dict(kw)
    if "dtype" in kw:
        kw["dtype"] = {"f16": f16, "bf16": bf16, "f32": f32}[kw["dtype"]]
    if kind == "fwht":
        variants = [aot.fwht_variants(*kw.pop("shape"), **kw)]
    else:
        variants = getattr(aot, kind + "_variants")(*kw.pop("shape"), **kw)
    if which == "first":
        variants = variants[:1]
    for v in variants:
        c = aot.compile_variant(v, "sm_90")
        ptx = c.asm["ptx"]
        out.append({"case": name, "label": v.label, "registers": c.registers, "spills": c.spill_stores,
                    "shared": c.shared, "mma": "mma.sync" in ptx or "wgmma" in ptx,
                    "atomic": "atom.global" in ptx or "red.global" in ptx})
print(json.dumps(out))
"""

LLAMA = (1, 4096, 4096)
CASES = [
    # every autotune config of the decode GEMV and the prefill GEMM, W4 g128 fp16 (the common serving format)
    ("gemv-configs", "gemv", {"shape": LLAMA, "bits": 4, "group_size": 128}, "all"),
    ("gemm-configs", "gemm", {"shape": (128, 4096, 4096), "bits": 4, "group_size": 128}, "all"),
    # each bit width, the group sizes, symmetric, per channel, non-uniform levels, bias, dtypes, batch rows
    *[(f"gemv-w{b}g{g}", "gemv", {"shape": (4, 4096, 11008), "bits": b, "group_size": g}, "first")
      for b, g in ((2, 64), (3, 128), (8, -1), (4, 32))],
    *[(f"gemm-w{b}g{g}", "gemm", {"shape": (64, 4096, 11008), "bits": b, "group_size": g}, "first")
      for b, g in ((2, 64), (3, 128), (8, -1), (4, 32))],
    ("gemv-sym-bias-bf16", "gemv", {"shape": (2, 1000, 576), "bits": 4, "group_size": 64, "zeros": False,
                                    "bias": True, "dtype": "bf16"}, "first"),
    ("gemv-levels-f32", "gemv", {"shape": (8, 1000, 576), "bits": 4, "group_size": 128, "zeros": False,
                                 "levels": True, "dtype": "f32"}, "first"),
    ("gemm-sym-bias-bf16", "gemm", {"shape": (33, 1000, 576), "bits": 3, "group_size": 64, "zeros": False,
                                    "bias": True, "dtype": "bf16"}, "first"),
    ("gemm-levels-f32", "gemm", {"shape": (300, 1000, 576), "bits": 4, "group_size": 128, "zeros": False,
                                 "levels": True, "dtype": "f32"}, "first"),
    # the fused rotation: a block wider than every tile (Llama-2's 4096), one narrower (32), per bit width
    ("gemv-rot4096", "gemv", {"shape": LLAMA, "bits": 4, "group_size": 128, "rot_block": 4096}, "all"),
    ("gemv-rot32-w3", "gemv", {"shape": (1, 4096, 352), "bits": 3, "group_size": 32, "rot_block": 32}, "first"),
    ("gemv-rot256-w2", "gemv", {"shape": (8, 4096, 11008), "bits": 2, "group_size": 64, "rot_block": 256},
     "first"),
    # the standalone Hadamard transform, signs before and after, short and long blocks
    *[(f"fwht-{n}-{w}", "fwht", {"shape": (rows, n), "where": w}, "first")
      for rows, n, w in ((16, 4096, 1), (300, 64, 2), (3, 128, 0), (1, 16384, 1))],
    # the codebook kernels (quantkit-vq): every GEMV config for the 2-bit preset's codebook (4 dims, 256 entries), the
    # 3-bit preset's (2 dims, 64 entries) and 8 dims x 2^16 entries, act-order, on Llama-2-7B; a straddling width
    # (12 bits) with dim 3 padded to 4 lanes, bias and bf16; fp32; the dequantize kernel before the cuBLAS GEMM
    ("vq-gemv-d4b8-configs", "vq_gemv", {"shape": LLAMA, "dim": 4, "bits": 8, "perm": True}, "all"),
    ("vq-gemv-d8b16-configs", "vq_gemv", {"shape": LLAMA, "dim": 8, "bits": 16, "perm": True}, "all"),
    ("vq3-gemv-d2b6-configs", "vq_gemv", {"shape": LLAMA, "dim": 2, "bits": 6, "perm": True}, "all"),
    ("vq-gemv-d3b12-bias-bf16", "vq_gemv", {"shape": (4, 1000, 576), "dim": 3, "bits": 12, "perm": True,
                                            "bias": True, "dtype": "bf16"}, "first"),
    ("vq-gemv-d2b4-f32", "vq_gemv", {"shape": (8, 4096, 11008), "dim": 2, "bits": 4, "dtype": "f32"}, "first"),
    ("vq-dequant-d4b8", "vq_dequant", {"shape": (4096, 4096), "dim": 4, "bits": 8, "perm": True}, "all"),
    ("vq3-dequant-d2b6", "vq_dequant", {"shape": (4096, 4096), "dim": 2, "bits": 6, "perm": True}, "first"),
    ("vq-dequant-d8b16", "vq_dequant", {"shape": (11008, 4096), "dim": 8, "bits": 16, "perm": True}, "all"),
    ("vq-dequant-d6b10-bf16", "vq_dequant", {"shape": (4096, 11008), "dim": 6, "bits": 10, "dtype": "bf16"}, "all"),
    # additive codebooks (quantkit-aq, the same kernels with the tables summed): every GEMV config for
    # hadamard-gptq-aq2's 2 tables of 256 x 8 on Llama-2-7B (act-order); 3 tables of a straddling width with dim 3,
    # bias and bf16; the dequantize kernel with 2 tables
    ("aq2-gemv-d8b8-configs", "vq_gemv", {"shape": LLAMA, "dim": 8, "bits": 8, "perm": True, "tables": 2}, "all"),
    ("aq3-gemv-d3b5-bias-bf16", "vq_gemv", {"shape": (4, 1000, 576), "dim": 3, "bits": 5, "perm": True,
                                            "bias": True, "dtype": "bf16", "tables": 3}, "first"),
    ("aq2-dequant-d8b8", "vq_dequant", {"shape": (11008, 4096), "dim": 8, "bits": 8, "perm": True, "tables": 2},
     "all"),
    # decode attention over a CQ cache: Llama-3-8B's heads (32 query, 8 KV, 128 channels) at 8k tokens with the
    # 2-bit and 1-bit presets' codes, pre-RoPE keys; SmolLM2's (9 and 3 of 64) with 4-bit codes, post-RoPE, fp32
    ("kv-attn-cq2-pre", "kv_attention", {"shape": (1, 32, 8, 128, 8192), "channels": 4, "bits": 2,
                                         "pre_rope": True}, "all"),
    ("kv-attn-cq1-bf16", "kv_attention", {"shape": (4, 32, 8, 128, 8192), "channels": 8, "bits": 1,
                                          "pre_rope": True, "dtype": "bf16"}, "all"),
    ("kv-attn-cq4-smollm2-f32", "kv_attention", {"shape": (1, 9, 3, 64, 4096), "channels": 2, "bits": 4,
                                                 "dtype": "f32"}, "all"),
]


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    env.pop("PYTHONSAFEPATH", None)  # the script imports the tools (benchmarks/) from the repository root
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(CASES)], capture_output=True, text=True,
                          env=env, timeout=900, cwd=REPO)
    assert proc.returncode == 0, f"compiling for sm_90 failed:\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout)


def _rows(compiled: list[dict], case: str) -> list[dict]:
    rows = [r for r in compiled if r["case"] == case]
    assert rows, f"nothing compiled for {case}"
    return rows


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_compiles_for_sm90(compiled, case):
    for r in _rows(compiled, case):
        assert 0 < r["registers"] <= 255, r


def test_every_fp16_autotune_config_fits_in_registers(compiled):
    # A config that spills reads and writes local memory in its inner loop: the autotuner would only time it and
    # throw it away, so the lists should not offer one.
    for case in ("gemv-configs", "gemm-configs", "gemv-rot4096", "vq-gemv-d4b8-configs", "vq-gemv-d8b16-configs",
                 "aq2-gemv-d8b8-configs"):
        spilling = [r["label"] for r in _rows(compiled, case) if r["spills"]]
        assert not spilling, spilling


def test_kv_attention_default_tiles_fit_in_registers(compiled):
    for case in ("kv-attn-cq2-pre", "kv-attn-cq1-bf16", "kv-attn-cq4-smollm2-f32"):
        assert not [r["label"] for r in _rows(compiled, case) if r["spills"]]


def test_gemm_runs_on_tensor_cores_and_gemv_split_k_on_atomics(compiled):
    assert all(r["mma"] for r in _rows(compiled, "gemm-configs"))
    for case in ("gemv-configs", "vq-gemv-d4b8-configs", "vq-gemv-d8b16-configs", "aq2-gemv-d8b8-configs"):
        for r in _rows(compiled, case):  # split-K partial sums are added atomically, one split stores
            assert r["atomic"] == ("SK=1 " not in r["label"]), r["label"]


def test_warm_fills_the_cache_a_launch_reads(tmp_path):
    # `--warm` (gpu_session.sh's first step) compiles into Triton's on-disk cache; a second run must find every
    # variant there. Batch 16 on Llama-2-7B's shapes: the GEMM's two 16-row configs for K = 4096 and K = 11008, and
    # the codebook dequantize kernel (d4b8) for each K.
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    env.pop("PYTHONSAFEPATH", None)  # `-m benchmarks.kernel_aot` from the repository root
    cmd = [sys.executable, "-m", "benchmarks.kernel_aot", "--warm", "--models", "llama2-7b", "--batch", "16",
           "--formats", "w4g128", "--vq", "d4b8", "--jobs", "1"]
    # From the repository root, where the tools live (they are not in the wheel).
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "compiled 6 kernel variants for sm_90" in first.stdout
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert len(entries) == 6
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert second.returncode == 0, second.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == entries  # all hits: nothing compiled again
