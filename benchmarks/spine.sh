#!/usr/bin/env bash
# Quantize SmolLM2 with each spine recipe (128 x 2048 C4 calibration, seed 0) and measure full-protocol
# WikiText-2 perplexity (148 windows of 2048). Runs one job at a time: on a 2-core machine, parallel jobs
# oversubscribe the cores and every job slows down several times.
#   usage: bash benchmarks/spine.sh OUTDIR [recipe ...]     (needs QUANTKIT_DATA_DIR for offline data)
set -euo pipefail
out=${1:?usage: spine.sh OUTDIR [recipe ...]}; shift
recipes=("$@")
[ ${#recipes[@]} -gt 0 ] || recipes=(gptq-w4g128 rtn-w4g128 rtn-w3g128 gptq-w3g128 rtn-w2g64 gptq-w2g64)
mkdir -p "$out"
[ -f "$out/ppl_fp32.json" ] || python -m quantkit.eval.perplexity --model smollm2-135m --out "$out/ppl_fp32.json"
for r in "${recipes[@]}"; do
  /usr/bin/time -v -o "$out/time_$r.txt" quantkit quantize --model smollm2-135m --recipe "$r" --calib c4 \
      --nsamples 128 --seqlen 2048 --seed 0 --out "$out/smollm2-$r" 2> "$out/quantize_$r.log"
  [ -f "$out/ppl_$r.json" ] || python -m quantkit.eval.perplexity --model "$out/smollm2-$r" --out "$out/ppl_$r.json"
done
python - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
fp = json.loads((out / "ppl_fp32.json").read_text())
print(f"| model | bits/weight | size on disk (MiB) | WikiText-2 ppl ({fp['windows']} x {fp['seqlen']}) |")
print("|---|---|---|---|")
print(f"| fp32 | 32 | - | {fp['ppl']:.3f} |")
for p in sorted(out.glob("ppl_*.json")):
    name = p.stem[4:]
    if name == "fp32":
        continue
    rep = json.loads((out / f"smollm2-{name}" / "quantkit_report.json").read_text())
    r = json.loads(p.read_text())
    print(f"| {name} | {rep['bits_per_weight']:.4f} | {rep['size_on_disk_bytes'] / 2**20:.1f} | {r['ppl']:.3f} |")
PY
