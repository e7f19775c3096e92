#!/usr/bin/env bash
# Issue 18, item 3: a measurement killed (SIGKILL) mid-walk and rerun resumes and writes the same measurement.json,
# byte for byte, as one run straight through. Both runs use the same model, candidates and calibration.
#   usage: QUANTKIT_DATA_DIR=../shared/data bash benchmarks/allocate_resume_check.sh OUTDIR [KILL_AT_LAYER]
#   env: MODEL (smollm2-135m), BUDGET (4.0), CALIB ("--calib c4 --nsamples 4 --seqlen 256 --seed 0"),
#        CANDIDATES (a YAML file; default: the built-in set), EXTRA (more allocate options)
set -euo pipefail
out=${1:?usage: allocate_resume_check.sh OUTDIR [KILL_AT_LAYER]}
kill_at=${2:-3}
: "${QUANTKIT_DATA_DIR:?set QUANTKIT_DATA_DIR to the data folder}"
model=${MODEL:-smollm2-135m}
read -r -a calib <<< "${CALIB:---calib c4 --nsamples 4 --seqlen 256 --seed 0}"
read -r -a extra <<< "${EXTRA:-}"
cands=(); [ -z "${CANDIDATES:-}" ] || cands=(--candidates "$CANDIDATES")
args=(allocate --model "$model" --budget "${BUDGET:-4.0}" "${calib[@]}" "${cands[@]}" "${extra[@]}")
mkdir -p "$out"
rm -rf "$out/straight" "$out/resumed"

echo "$(date '+%T') straight through"
quantkit "${args[@]}" --out "$out/straight" 2> "$out/straight.log"

echo "$(date '+%T') killed once layer $kill_at is measured"
quantkit "${args[@]}" --out "$out/resumed" 2> "$out/killed.log" &
pid=$!
state="$out/resumed/measurement.partial/state.json"
while kill -0 "$pid" 2> /dev/null; do
  if [ -f "$state" ] && python -c "import json, sys; sys.exit(json.load(open('$state'))['next_layer'] <= $kill_at)" \
      2> /dev/null; then
    kill -9 "$pid"; break
  fi
  sleep 1
done
wait "$pid" 2> /dev/null && { echo "the run ended before layer $kill_at: nothing was killed" >&2; exit 1; }
[ ! -f "$out/resumed/measurement.json" ] || { echo "measurement.json written despite the kill" >&2; exit 1; }
echo "$(date '+%T') killed at: $(cat "$state")"

echo "$(date '+%T') rerun"
quantkit "${args[@]}" --out "$out/resumed" 2> "$out/resumed.log"
if cmp "$out/straight/measurement.json" "$out/resumed/measurement.json"; then
  echo "identical: $(sha256sum < "$out/resumed/measurement.json" | cut -c1-16) ($(wc -c < "$out/resumed/measurement.json") bytes)"
else
  echo "DIFFERENT measurement.json after the resume" >&2; exit 1
fi
