# The shipped model's needle cells measured again with the rotary tables' float64 angles (item 77 of
# benchmarks/NOTES.md): every row of a cell here ran with them.
#   bash benchmarks/results/float64-needles-2026-11-25/run.sh TASK LEN SECONDS
# resumes this folder's TASK-LEN/results.jsonl in $OUT (the 12M cell starts from the five samples that
# ../rotary-precision-2026-11-25/ re-ran) and stops after SECONDS; copy $OUT/TASK-LEN back here after
# every call.
set -u
HERE=benchmarks/results/float64-needles-2026-11-25
OUT=${OUT:-runs/float64-needles}
cell=$OUT/$1-$2
mkdir -p $cell
[ -f $cell/results.jsonl ] || { [ -f $HERE/$1-$2/results.jsonl ] && cp $HERE/$1-$2/results.jsonl $cell/; }
[ -f $cell/results.jsonl ] || : > $cell/results.jsonl
OUT=$OUT bash benchmarks/results/long-needles-2026-11-25/run.sh eval "$@"
