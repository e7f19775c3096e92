#!/usr/bin/env bash
# Every check that needs a GPU, in one command (device time is scarce and each start costs minutes):
#   tests     every Triton kernel test compiled for the GPU instead of interpreted (TRITON_INTERPRET=0): the
#             dequant-matmul, Hadamard, codebook (VQ and AQ) and KV decode-attention kernels against their references;
#   kvattn    benchmarks/kv_attention_bench.py: decode attention over a CQ 2-bit and a pre-RoPE CQ 1-bit cache
#             (Llama-3-8B heads, 1k-32k tokens), the Triton kernel against dequantize + SDPA and an fp16 cache;
#   warm      compile the kernels bench and decode will autotune over (about 330 variants for Llama-2-7B's shapes)
#             in parallel into Triton's cache; compiled one after another inside the autotuner they take minutes;
#   bench     benchmarks/kernel_bench.py at batches 1 and 16: dequant-matmul (W4/W3/W2) and lookup-table (VQ d4b8,
#             d8b16, AQ 2x8) speed against fp16 cuBLAS and the memory-bandwidth bound;
#   codebooks the codebook rows of bench alone, their kernels compiled first (not in the default list);
#   decode    benchmarks/decode_bench.py: end-to-end greedy decode tokens/s, Llama-2-7B shapes, fp16 vs W4/W3/W2;
#   rotation  benchmarks/rotation_cost.py --device cuda: the online Hadamard transform against the W4 g128 kernel;
#   generate  benchmarks/kernel_vs_reference.py: a quantized SmolLM2 folder's greedy text, kernel path vs reference
#             (only if $QK_FOLDER names such a folder on that machine; see that script for getting one there).
# Steps run in the order given (default: tests kvattn warm bench decode rotation), each under its own time limit,
# and none past QK_BUDGET_S seconds from the start when that is set (a step is cut to what is left, or skipped):
# set it a little under the device call's timeout so that whatever ran comes back. Results go to $OUT (default
# ./gpu_out), one file per step, ready for BENCHMARKS.md.
#
# The GPU image has torch, triton, transformers, accelerate, safetensors, pytest, tqdm and pyyaml (device KINDS.md),
# which is all these steps import; it has no network, so any other wheel travels in an ignored folder `.wheels`
# (carry it with the device tool), installed from there when present. quantkit itself is installed from a wheel
# built beforehand into .wheels when one is there (`pip wheel --no-deps -w .wheels .`: the image's setuptools may
# be older than pyproject.toml's build requirement), else built there. Run from the repository root:
#   bash benchmarks/gpu_session.sh [step ...]
set -uo pipefail
out=${OUT:-gpu_out}
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(tests kvattn warm bench decode rotation)
deadline=$(( $(date +%s) + ${QK_BUDGET_S:-86400} ))
left() {  # left N: N seconds, or fewer if the budget ends sooner
  local l=$(( deadline - $(date +%s) )); echo $(( l < $1 ? l : $1 ))
}
mkdir -p "$out"
if compgen -G ".wheels/quantkit-*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps .wheels/*.whl > "$out/pip.log" 2>&1
else
  if [ -d .wheels ]; then python3 -m pip install -q --no-index --no-deps .wheels/*.whl > "$out/pip.log" 2>&1; fi
  python3 -m pip install -q --no-deps --no-build-isolation . >> "$out/pip.log" 2>&1
fi || { echo "install failed"; tail "$out/pip.log"; exit 1; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > "$out/versions.txt" 2>&1
cat "$out/versions.txt"
cd /tmp  # import the installed package, not the source tree (kernels/ maps to quantkit.kernels only when installed)
src=$OLDPWD
# The tools (benchmarks/, not in the wheel) import as benchmarks.*: a folder holding only a link to them, so that
# the source tree's quantkit/ does not shadow the installed one.
mkdir -p /tmp/quantkit-tools && ln -sfn "$src/benchmarks" /tmp/quantkit-tools/benchmarks
export PYTHONPATH=/tmp/quantkit-tools${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export TRITON_CACHE_AUTOTUNING=1  # decode reuses bench's autotuning of the same shapes instead of redoing it
for step in "${steps[@]}"; do
  if [ "$(left 60)" -lt 20 ]; then echo "== $step skipped: under 20 s of QK_BUDGET_S left"; continue; fi
  echo "== $step $(date +%T)"
  case $step in
    warm)  # batches: bench's 1 and 16, and the decode prefills (1 x 128 and 16 x 128 tokens)
      timeout "$(left 60)" python3 -m benchmarks.kernel_aot --warm --target auto --models llama2-7b \
          --batch 1 16 128 2048 --formats w4g128 w3g128 w2g64 --gemm-decode > "$out/warm.txt" 2>&1
      tail -n 3 "$out/warm.txt" ;;
    codebooks)  # the codebook rows alone (VQ d4b8 and d8b16, AQ 2x8), batches 1 and 16, compiled first
      timeout "$(left 30)" python3 -m benchmarks.kernel_aot --warm --target auto --models llama2-7b --batch 1 16 \
          --formats > "$out/warm_codebooks.txt" 2>&1
      tail -n 1 "$out/warm_codebooks.txt"
      timeout "$(left 120)" python3 -m benchmarks.kernel_bench --models llama2-7b --batches 1,16 --formats "" \
          --vq d4b8,d8b16,m2d8b8 > "$out/bench_codebooks.md" 2>&1
      cat "$out/bench_codebooks.md" ;;
    bench)
      timeout "$(left 180)" python3 -m benchmarks.kernel_bench --models llama2-7b --batches 1,16 \
          --formats w4g128,w3g128,w2g64 --vq d4b8,d8b16,m2d8b8 > "$out/bench.md" 2>&1
      tail -n 30 "$out/bench.md" ;;
    decode)
      timeout "$(left 150)" python3 -m benchmarks.decode_bench --config llama2-7b --batches 1,16 \
          --formats fp16,w4g128,w3g128,w2g64 > "$out/decode.md" 2>&1
      cat "$out/decode.md" ;;
    rotation)  # its shapes' W4 g128 batch-1 kernels, plain and with the rotation fused, compiled in parallel first
      timeout "$(left 30)" python3 -m benchmarks.kernel_aot --warm --target auto --models llama2-7b llama3-8b \
          --shapes 576x576 192x576 1536x576 576x1536 --batch 1 --formats w4g128 --rotated > "$out/warm_rotation.txt" 2>&1
      tail -n 1 "$out/warm_rotation.txt"
      timeout "$(left 60)" python3 "$src/benchmarks/rotation_cost.py" --device cuda --models smollm2-135m,llama2-7b,llama3-8b \
          > "$out/rotation_cost.md" 2>&1
      cat "$out/rotation_cost.md" ;;
    tests)
      # pytest-xdist (on the image) compiles the suite's kernels on several cores at once. A worker that dies
      # (a crash in compiled code) stops xdist without naming the cause: then the suite runs again in one
      # process, stopping at the first failure, with faulthandler's stack of a crash (tests_serial.txt).
      files=("$src/tests/test_kernels.py" "$src/tests/test_kernel_hadamard.py" "$src/tests/test_kernel_codebook.py"
             "$src/tests/test_kernel_aq.py" "$src/tests/test_kernel_kv.py")
      par=(); python3 -c "import xdist" 2> /dev/null && par=(-n 8 -p no:benchmark)
      TRITON_INTERPRET=0 timeout "$(left 150)" python3 -m pytest -q -rfE -p no:cacheprovider "${par[@]}" \
          "${files[@]}" > "$out/tests.txt" 2>&1
      echo "kernel tests (compiled): $(tail -n 1 "$out/tests.txt")"
      if grep -q "INTERNALERROR\|crashed" "$out/tests.txt"; then
        TRITON_INTERPRET=0 timeout "$(left 120)" python3 -X faulthandler -m pytest -x -q -rfE -p no:cacheprovider \
            -p no:xdist "${files[@]}" > "$out/tests_serial.txt" 2>&1
        echo "kernel tests (compiled, one process, to the first failure): $(tail -n 1 "$out/tests_serial.txt")"
        grep -m 20 -B2 -A12 "Fatal Python error\|^FAILED\|Error" "$out/tests_serial.txt" | head -n 60
      fi ;;
    generate)
      if [ -z "${QK_FOLDER:-}" ]; then echo "generate: set QK_FOLDER to a quantized folder"; continue; fi
      timeout "$(left 240)" python3 "$src/benchmarks/kernel_vs_reference.py" "$QK_FOLDER" > "$out/generate.txt" 2>&1
      cat "$out/generate.txt" ;;
    kvattn)
      timeout "$(left 60)" python3 "$src/benchmarks/kv_attention_bench.py" > "$out/kv_attention.md" 2>&1
      timeout "$(left 45)" python3 "$src/benchmarks/kv_attention_bench.py" --pre-rope --bits 1 --channels 8 \
          >> "$out/kv_attention.md" 2>&1
      cat "$out/kv_attention.md"
      # the kernel's tile and warps around its defaults (64 tokens, 8 warps), at two lengths and batches
      for cfg in "32 4" "64 4" "128 8" "32 8"; do
        set -- $cfg
        timeout "$(left 30)" python3 "$src/benchmarks/kv_attention_bench.py" --contexts 4096 32768 --batches 1 8 \
            --block-t "$1" --num-warps "$2" >> "$out/kv_attention_sweep.md" 2>&1
      done
      grep -v "^|---" "$out/kv_attention_sweep.md" ;;
    *) echo "unknown step $step (tests, kvattn, warm, bench, codebooks, decode, rotation, generate)" ;;
  esac
done
