#!/usr/bin/env bash
# Full evaluation for BENCHMARKS.md: WikiText-2 perplexity (full protocol, 148 x 2048) and the five zero-shot tasks
# (all documents, lm-eval, local task configs) for the unquantized SmolLM2 and each quantized folder given; then
# lm-eval run on its own (`lm_eval --model hf`) on the unquantized folder with the same local task configs and the
# same settings, a side-by-side comparison of the two, and `quantkit report` (Markdown table + Pareto plot).
# Each model's perplexity and zero-shot runs are separate `quantkit eval` calls writing their own results file
# (eval_ppl_NAME.json, eval_zeroshot_NAME.json; `quantkit report` merges a model's files into one row), and a step whose
# file exists is skipped: an interrupted run resumes by running the same command again.
# Each step's wall time and peak memory go to OUTDIR/time_eval_*.txt (`/usr/bin/time -v`).
# Runs one job at a time (parallel jobs oversubscribe a small machine's cores).
#   usage: QUANTKIT_DATA_DIR=../shared/data bash benchmarks/eval.sh OUTDIR [QUANTIZED_FOLDER ...]
#   env:   DEVICE (default cpu; use the same device for both sides of the comparison)
#          BATCH (default 16): lm-eval's batch size, the same on both sides. A quantized model's CPU forward
#          dequantizes every weight on each call, so larger batches spread that cost over more requests.
#          COMPARE (default 1): 0 skips the `lm_eval --model hf` run and its comparison (table and plot only).
set -euo pipefail
out=${1:?usage: eval.sh OUTDIR [QUANTIZED_FOLDER ...]}; shift
: "${QUANTKIT_DATA_DIR:?set QUANTKIT_DATA_DIR to the data folder (offline task configs read it)}"
device=${DEVICE:-cpu}
batch=${BATCH:-16}
tasks=arc_easy,arc_challenge,piqa,winogrande,lambada_openai
mkdir -p "$out"

run() {  # NAME MODEL
  [ -f "$out/eval_ppl_$1.json" ] || /usr/bin/time -v -o "$out/time_eval_ppl_$1.txt" \
      quantkit eval --model "$2" --ppl wikitext2 --device "$device" \
      --out "$out/eval_ppl_$1.json" 2> "$out/eval_ppl_$1.log"
  [ -f "$out/eval_zeroshot_$1.json" ] || /usr/bin/time -v -o "$out/time_eval_zeroshot_$1.txt" \
      quantkit eval --model "$2" --ppl none --tasks "$tasks" --device "$device" \
      --batch-size "$batch" --out "$out/eval_zeroshot_$1.json" 2> "$out/eval_zeroshot_$1.log"
}
run fp32 smollm2-135m
for folder in "$@"; do run "$(basename "$folder")" "$folder"; done

if [ "${COMPARE:-1}" != 0 ]; then
  folder=$(python -c 'from quantkit.loading import resolve_model; print(resolve_model("smollm2-135m").folder)')
  include=$(python -c 'from quantkit.eval.zeroshot import LOCAL_TASKS_DIR; print(LOCAL_TASKS_DIR)')
  if [ ! -d "$out/lm_eval_fp32" ]; then
    lm_eval --model hf --model_args "pretrained=$folder" --include_path "$include" \
        --tasks "$(echo "$tasks" | sed 's/,/_local,/g')_local" --device "$device" --batch_size "$batch" \
        --metadata "{\"data_dir\": \"$QUANTKIT_DATA_DIR\"}" --output_path "$out/lm_eval_fp32" > "$out/lm_eval_fp32.log" 2>&1
  fi

  python - "$out" <<'PY'
import glob, json, pathlib, sys
out = pathlib.Path(sys.argv[1])
ours = json.loads((out / "eval_zeroshot_fp32.json").read_text())["tasks"]
theirs = json.loads(pathlib.Path(sorted(glob.glob(str(out / "lm_eval_fp32" / "**" / "results_*.json"),
                                                  recursive=True))[-1]).read_text())["results"]
print("| task | metric | quantkit eval | lm_eval --model hf | equal |")
print("|---|---|---|---|---|")
for task, m in ours.items():
    for metric in ("acc", "acc_norm", "perplexity"):
        if metric in m:
            a, b = m[metric], theirs[task + "_local"][metric + ",none"]
            print(f"| {task} | {metric} | {a:.6f} ± {m[metric + '_stderr']:.6f} | {b:.6f} ± "
                  f"{theirs[task + '_local'][metric + '_stderr,none']:.6f} | {'yes' if a == b else 'NO'} |")
PY
fi
quantkit report "$out"/eval_ppl_*.json "$out"/eval_zeroshot_*.json --out "$out/report.md" --plot "$out/pareto.png"
