# The shipped model's long needles (issue 5: `niah_single_*`, 50 samples a length at 2M-12M), resuming the
# committed samples, and where a long prompt's time goes (item 70 of benchmarks/NOTES.md).
#   bash benchmarks/results/long-needles-2026-11-25/run.sh profile LENGTHS      phases of sample 0 per length
#   bash benchmarks/results/long-needles-2026-11-25/run.sh eval TASK LEN SECONDS  resume one cell, stop after
#       SECONDS (the runner keeps every finished prompt; the next call resumes)
# Everything lands in $OUT (the device's return folder); a cell's results.jsonl starts from the committed one.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
HERE=benchmarks/results/long-needles-2026-11-25
OUT=${OUT:-runs/long-needles}
DEVICE=${DEVICE:-cuda}
SHIPPED=src/subquad/assets/subquad-nano
mkdir -p $OUT
case $1 in
  profile)
    python3 scripts/profile_needle.py --device $DEVICE --lengths $2 --profile --out $OUT/phases.jsonl \
      2>&1 | grep -v -i 'warn\|Loading' ;;
  eval)
    task=$2 len=$3 cell=$OUT/$2-$3
    mkdir -p $cell
    # the committed samples of this cell, newest results folder first
    if [ ! -f $cell/results.jsonl ]; then
      for f in $HERE/$task-$len/results.jsonl \
          benchmarks/results/paired-finetune-2026-11-25/shipped-long/long-shipped-$task-$len/results.jsonl \
          benchmarks/results/recall-loss-2026-11-24/eval/long-nano-recall-0.3-$task-$len/results.jsonl; do
        [ -f $f ] && { cp $f $cell/results.jsonl; break; }
      done
    fi
    before=$(cat $cell/results.jsonl 2>/dev/null | wc -l) t0=$(date +%s)
    echo "$task $len: $before samples before"
    timeout $4 python3 -m subquad.cli eval --model $SHIPPED --device $DEVICE --suite ruler --tasks $task \
      --lengths $len --samples ${SAMPLES:-50} --max-new-tokens 32 --batch-size 1 --no-progress --out $cell \
      > $cell/eval.log 2>&1
    rc=$?
    after=$(wc -l < $cell/results.jsonl) wall=$(( $(date +%s) - t0 ))
    echo "$task $len: $after samples after (exit $rc; 124: stopped at $4 s), $wall s wall for $((after - before))"
    python3 - $cell/results.jsonl <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"  found {sum(r['score'] == 1.0 for r in rows)} of {len(rows)};",
      f"last 5 prompts {[round(r['seconds'], 1) for r in rows[-5:]]} s")
PY
    ;;
  *) echo "usage: run.sh profile LENGTHS | eval TASK LEN SECONDS" >&2; exit 2 ;;
esac
