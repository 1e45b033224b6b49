# The shipped model's essay and UUID needles (RULER `niah_single_2` / `_3`) at 128K, 1M and 2M, 50 samples a
# cell, every row with float64 rotary angles (issue 5; item 83 of benchmarks/NOTES.md).
#   bash benchmarks/results/needle-grid-2026-11-25/run.sh TASK:LEN:SECONDS ...
# runs the cells one after another, each resumed from this folder's TASK-LEN/ (a new cell starts empty: no
# rows of older runs or float32 angles) and stopped after SECONDS (finished prompts are kept). The cells are
# packed into $OUT/cells.tar.gz (a call returns at most 8 files); unpack it here after every call.
set -u
HERE=benchmarks/results/needle-grid-2026-11-25
OUT=${OUT:?set OUT to the return folder}
work=runs/needle-grid
for spec in "$@"; do
  IFS=: read -r task len secs <<<"$spec"
  cell=$work/$task-$len
  mkdir -p $cell
  [ -f $cell/results.jsonl ] || { [ -f $HERE/$task-$len/results.jsonl ] && cp $HERE/$task-$len/results.jsonl $cell/; }
  [ -f $cell/results.jsonl ] || : >$cell/results.jsonl
  OUT=$work bash benchmarks/results/long-needles-2026-11-25/run.sh eval $task $len $secs
done
tar -czf $OUT/cells.tar.gz -C $work .
