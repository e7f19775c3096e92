#!/usr/bin/env bash
# Issue 18 on the full protocol: one `quantkit allocate` measurement of SmolLM2 (default candidates, 128 x 2048 C4
# calibration, seed 0) solved at every budget, each allocated recipe quantized with the same calibration and
# evaluated on all 148 WikiText-2 windows, then benchmarks/allocation_check.py over the allocated rows and the
# uniform rows whose full-protocol results files are in SEED (default benchmarks/results/smollm2).
# Resumable: a finished measurement, quantization or evaluation is skipped; an interrupted measurement resumes at its
# next layer (measurement.partial/), an interrupted quantization at its next layer. Run one job at a time.
#   usage: QUANTKIT_DATA_DIR=../shared/data bash benchmarks/allocate_full.sh OUTDIR [BUDGET ...]
#   progress: OUTDIR/progress.txt; time and peak memory of each step: OUTDIR/time_*.txt (/usr/bin/time -v)
#   env (for trying the script on a small model; the protocol is the default): MODEL (smollm2-135m),
#        CALIB ("--calib c4 --nsamples 128 --seqlen 2048 --seed 0"), WINDOWS (all; e.g. 16 for the quick protocol),
#        CANDIDATES (the built-in set), MEASUREMENT (a measurement.json to start from, e.g. the full protocol's in
#        benchmarks/results/smollm2/allocate/: copied into OUTDIR/alloc unless one is there; allocate refuses it if
#        it was measured on another model, candidate set or calibration), REUSE_ERRORS (a kept measurement whose
#        candidate errors to reuse, measuring only the sensitivities: `allocate --reuse-errors`)
set -euo pipefail
out=${1:?usage: allocate_full.sh OUTDIR [BUDGET ...]}; shift
: "${QUANTKIT_DATA_DIR:?set QUANTKIT_DATA_DIR to the data folder}"
here=$(cd "$(dirname "$0")" && pwd)
seed=${SEED:-$here/results/smollm2}
budgets=("$@")
[ ${#budgets[@]} -gt 0 ] || budgets=(2.5 3.0 3.5 4.0)
model=${MODEL:-smollm2-135m}
read -r -a calib <<< "${CALIB:---calib c4 --nsamples 128 --seqlen 2048 --seed 0}"
windows=(); [ -z "${WINDOWS:-}" ] || windows=(--ppl-windows "$WINDOWS")
cands=(); [ -z "${CANDIDATES:-}" ] || cands=(--candidates "$CANDIDATES")
reuse=(); [ -z "${REUSE_ERRORS:-}" ] || reuse=(--reuse-errors "$REUSE_ERRORS")
mkdir -p "$out/Q" "$out/E"
if [ -n "${MEASUREMENT:-}" ] && [ ! -f "$out/alloc/measurement.json" ]; then
  mkdir -p "$out/alloc" && cp "$MEASUREMENT" "$out/alloc/measurement.json"
fi
log() { echo "$(date '+%F %T') $*" >> "$out/progress.txt"; }

if [ ! -f "$out/alloc/allocation.json" ] || [ ! -f "$out/alloc/measurement.json" ]; then
  log "allocate: start"
  /usr/bin/time -v -o "$out/time_allocate.txt" quantkit allocate --model "$model" \
      --budget "$(IFS=,; echo "${budgets[*]}")" --out "$out/alloc" "${calib[@]}" "${cands[@]}" "${reuse[@]}" \
      2> "$out/allocate.log"
  log "allocate: done"
fi
# Budgets added later reuse the measurement (seconds).
quantkit allocate --model "$model" --budget "$(IFS=,; echo "${budgets[*]}")" --out "$out/alloc" "${calib[@]}" \
    "${cands[@]}" 2>> "$out/allocate.log"

runs=()
for b in "${budgets[@]}"; do
  q="$out/Q/alloc-$b"
  if [ ! -f "$q/quantkit_report.json" ]; then
    log "quantize $b: start"
    /usr/bin/time -v -o "$out/time_quantize_$b.txt" quantkit quantize --model "$model" \
        --recipe "$out/alloc/recipe-$b.yaml" "${calib[@]}" --out "$q" 2> "$out/quantize_$b.log"
    log "quantize $b: done"
  fi
  e="$out/E/eval_ppl_alloc-$b.json"
  if [ ! -f "$e" ]; then
    log "eval $b: start"
    /usr/bin/time -v -o "$out/time_eval_$b.txt" quantkit eval --model "$q" --ppl wikitext2 "${windows[@]}" --device cpu \
        --out "$e" 2> "$out/eval_$b.log"
    log "eval $b: done"
  fi
  runs+=("$q=$e")
done
if [ -z "${WINDOWS:-}" ] && [ "$model" = smollm2-135m ]; then
  fp="$seed/eval_ppl_fp32.json"
  for f in "$seed"/eval_ppl_smollm2-*.json; do  # uniform rows: their recipe stands in for the folder
    name=$(basename "$f" .json); name=${name#eval_ppl_smollm2-}
    case $name in
      alloc-*-*)  # an allocated row of an earlier measurement: alloc-v2-3.0 -> allocate/v2/recipe-3.0.yaml
        b=${name#alloc-}
        runs+=("$seed/allocate/${b%-*}/recipe-${b##*-}.yaml=$f") ;;
      alloc-*)  # an allocated row kept there: its recipe is in allocate/; this run's own budgets are above
        b=${name#alloc-}
        [[ " ${budgets[*]} " == *" $b "* ]] || runs+=("$seed/allocate/recipe-$b.yaml=$f") ;;
      *) runs+=("$name=$f") ;;
    esac
  done
else  # another model or protocol: its own fp row, no uniform rows
  fp="$out/E/eval_ppl_fp.json"
  [ -f "$fp" ] || quantkit eval --model "$model" --ppl wikitext2 "${windows[@]}" --device cpu --out "$fp" \
      2> "$out/eval_fp.log"
fi
python "$here/allocation_check.py" --skip-unmeasured "$out/alloc/measurement.json" "$fp" "${runs[@]}" \
    | tee "$out/allocation_check.md"
