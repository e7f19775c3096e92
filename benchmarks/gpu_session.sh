#!/usr/bin/env bash
# Every check that needs a GPU, in one command (device time is scarce and each start costs minutes):
#   1. the kernel tests compiled for the GPU instead of interpreted (TRITON_INTERPRET=0);
#   2. kernels/bench.py: dequant-matmul speed against fp16 cuBLAS and the memory-bandwidth bound;
#   3. benchmarks/rotation_cost.py --device cuda: the online Hadamard transform against the W4 g128 kernel, batch 1.
# Results go to $OUT (default ./gpu_out), one file per step, ready for BENCHMARKS.md.
#
# The GPU image has torch, triton, transformers, accelerate, safetensors, pytest, tqdm and pyyaml (device KINDS.md),
# which is all these steps import; it has no network, so any other wheel travels in an ignored folder `.wheels`
# (carry it with the device tool), installed from there when present. Run from the repository root:
#   bash benchmarks/gpu_session.sh
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
if [ -d .wheels ]; then
  python3 -m pip install -q --no-index --find-links .wheels .wheels/*.whl > "$out/pip.log" 2>&1
fi
python3 -m pip install -q --no-deps --no-build-isolation . >> "$out/pip.log" 2>&1 || { echo "install failed"; tail "$out/pip.log"; exit 1; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$out/versions.txt" 2>&1
cat "$out/versions.txt"
cd /tmp  # import the installed package, not the source tree (kernels/ maps to quantkit.kernels only when installed)
src=$OLDPWD
TRITON_INTERPRET=0 timeout 300 python3 -m pytest -q -p no:cacheprovider "$src/tests/test_kernels.py" \
    "$src/tests/test_kernel_hadamard.py" > "$out/tests.txt" 2>&1
echo "kernel tests (compiled): $(tail -n 1 "$out/tests.txt")"
timeout 240 python3 -m quantkit.kernels.bench --models llama2-7b --batches 1,16,128 --formats w4g128,w3g128,w2g64 \
    > "$out/bench.md" 2>&1
tail -n 30 "$out/bench.md"
timeout 120 python3 "$src/benchmarks/rotation_cost.py" --device cuda --models smollm2-135m,llama2-7b,llama3-8b \
    > "$out/rotation_cost.md" 2>&1
cat "$out/rotation_cost.md"
