# The shipped model's UUID needle (RULER `niah_single_3`) with the task's own answer cap (128 tokens), and
# at 1M with other routed budgets (issue 5; item 86 of benchmarks/NOTES.md).
#   bash benchmarks/results/uuid-budget-2026-11-25/run.sh recap
#       re-runs the four answers the 32-token cap cut off (4K #8 and 32K #47 of nano-p5's cells, 1M #40,
#       2M #12 of the needle grid); every other row is copied, so each folder is its cell at cap 128
#       (greedy decoding: a longer cap only extends an answer that was cut)
#   bash benchmarks/results/uuid-budget-2026-11-25/run.sh cell TASK LEN SECONDS SSA
#       a fresh cell of 50 prompts under `--ssa SSA` (e.g. top_k=8), stopped after SECONDS (resumable from
#       this folder); the task's own answer cap, or CAP=n tokens (the grid's essay cells used 32)
# Everything is packed into $OUT/cells.tar.gz; unpack it into this folder after every call. HERE=folder
# resumes cells from another results folder (a later study's, e.g. route-margin-2026-11-25/).
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
OUT=${OUT:?set OUT to the return folder}
SHIPPED=src/subquad/assets/subquad-nano
HERE=${HERE:-benchmarks/results/uuid-budget-2026-11-25}
work=runs/uuid-budget
mkdir -p $work

found() {  # found N of M in a results file
  python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; \
print(f'  found {sum(x[\"score\"] == 1.0 for x in r)} of {len(r)}')" $1
}

evaluate() {  # folder lengths samples seconds [extra eval args...]
  local dir=$1 lengths=$2 samples=$3 secs=$4
  shift 4
  local t0=$(date +%s)
  timeout $secs python3 -m subquad.cli eval --model $SHIPPED --device ${DEVICE:-cuda} --suite ruler \
    --tasks ${TASK:-niah_single_3} --lengths $lengths --samples $samples --batch-size 1 --no-progress \
    --out $dir "$@" > $dir/eval.log 2>&1
  echo "$dir: exit $? (124: stopped at $secs s), $(( $(date +%s) - t0 )) s"
  found $dir/results.jsonl
}

case $1 in
  recap)
    # folder  source cell  length  index of the cut answer
    while read -r name src len index; do
      mkdir -p $work/$name
      [ -f $work/$name/results.jsonl ] || python3 - $src $len $index > $work/$name/results.jsonl <<'PY'
import json, sys
src, length, index = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for line in open(src):
    row = json.loads(line)
    if row["task"] == "niah_single_3" and row["length"] == length and row["index"] != index:
        print(line, end="")
PY
      evaluate $work/$name $len 50 300
    done <<'LIST'
cap128-4k benchmarks/results/recall-loss-2026-11-24/eval/niah-nano-recall-0.3/results.jsonl 4096 8
cap128-32k benchmarks/results/recall-loss-2026-11-24/eval/niah-nano-recall-0.3/results.jsonl 32768 47
cap128-1m benchmarks/results/needle-grid-2026-11-25/niah_single_3-1m/results.jsonl 1048576 40
cap128-2m benchmarks/results/needle-grid-2026-11-25/niah_single_3-2m/results.jsonl 2097152 12
LIST
    ;;
  cell)
    task=$2 len=$3 secs=$4 ssa=$5
    name=$task-$len-${ssa//[=,]/-}${CAP:+-cap$CAP}
    dir=$work/$name
    mkdir -p $dir
    [ -f $dir/results.jsonl ] || { [ -f $HERE/$name/results.jsonl ] && cp $HERE/$name/results.jsonl $dir/; }
    TASK=$task evaluate $dir $len 50 $secs --ssa $ssa ${CAP:+--max-new-tokens $CAP} ;;
  *) echo "usage: run.sh recap | cell TASK LEN SECONDS SSA" >&2; exit 2 ;;
esac
tar -czf $OUT/cells.tar.gz -C $work .
