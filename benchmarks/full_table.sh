#!/usr/bin/env bash
# BENCHMARKS.md's full SmolLM2 table (issue 3): quantize SmolLM2 with each recipe (128 x 2048 C4 calibration,
# seed 0), then evaluate each folder with benchmarks/eval.sh (WikiText-2 full protocol + the five zero-shot tasks,
# all documents), one model at a time, and regenerate the report and Pareto plot after each model.
# Resumable: a finished quantization (its folder) and a finished evaluation (its results file) are skipped, and an
# interrupted quantization resumes at its next layer, so rerunning the same command continues where it stopped.
# Seed OUTDIR/E with eval_*_fp32.json (e.g. from benchmarks/results/smollm2/) to skip the fp32 row.
#   usage: QUANTKIT_DATA_DIR=../shared/data bash benchmarks/full_table.sh OUTDIR [recipe ...]
#   progress: OUTDIR/progress.txt (one line per step started and finished)
# On 2 cores, two instances with OMP_NUM_THREADS=1 on disjoint recipes (same OUTDIR) get more done than one with
# both cores: GPTQ calibration ran 1.24x the layers per minute that way (BENCHMARKS.md, "Quantization time").
# Evaluation does not gain: two one-thread perplexity runs side by side took 2.1x one two-thread run ("the full table").
set -euo pipefail
out=${1:?usage: full_table.sh OUTDIR [recipe ...]}; shift
: "${QUANTKIT_DATA_DIR:?set QUANTKIT_DATA_DIR to the data folder}"
recipes=("$@")
[ ${#recipes[@]} -gt 0 ] || recipes=(rtn-w4g128 rtn-w3g128 rtn-w2g64 gptq-w4g128 gptq-w3g128 gptq-w2g64)
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out/Q" "$out/E"
log() { echo "$(date '+%F %T') $*" >> "$out/progress.txt"; }

for r in "${recipes[@]}"; do
  q="$out/Q/smollm2-$r"
  if [ ! -f "$q/quantkit_report.json" ]; then
    log "quantize $r: start"
    /usr/bin/time -v -o "$out/time_quantize_$r.txt" quantkit quantize --model smollm2-135m --recipe "$r" \
        --calib c4 --nsamples 128 --seqlen 2048 --seed 0 --out "$q" 2> "$out/quantize_$r.log"
    log "quantize $r: done"
  fi
  log "eval $r: start"
  COMPARE=0 bash "$here/eval.sh" "$out/E" "$q"
  log "eval $r: done"
done
