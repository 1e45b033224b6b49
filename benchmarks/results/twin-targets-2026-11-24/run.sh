# The twin targets of issue 5 measured again, closer: RULER at 32K with 30 samples a task (the earlier
# runs' 10 resumed, same prompts), and the SSA model's held-out loss under its task routing.
# One GPU call per model (both models and the tree are over the 64 MiB a call carries):
#   bash benchmarks/results/twin-targets-2026-11-24/run.sh ssa    (carry runs/twin/nano-ssa/final)
#   bash benchmarks/results/twin-targets-2026-11-24/run.sh twin   (carry runs/twinlr/nano-dense)
# The corpus (for held-out) is rebuilt by the pair's command when the machine does not hold it.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
HERE=benchmarks/results/twin-targets-2026-11-24
R=runs/targets
SSA_MODEL=runs/twin/nano-ssa/final
TWIN_MODEL=runs/twinlr/nano-dense
PREV=benchmarks/results
SAMPLES=${SAMPLES:-30}
mkdir -p $R/results $R/logs
SITE=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

corpus() {
  [ -f $R/corpus/heldout.bin ] && return 0
  python3 -m subquad.cli corpus --source "$SITE" --out $R/corpus --tokenizer-from src/subquad/assets/subquad-nano \
    --skills-kinds facts=4,recall=1,copy=1,lookup=1 --skills-doc-tokens 128,32768 --skills-prose 0.5 \
    --skills-seed 6 --max-mb 250 --skills-tokens 80000000 > $R/logs/corpus.log 2>&1
}
# RULER at 32K for MODEL into results/NAME, resuming the 32K lines of an earlier results.jsonl.
ruler32() {  # NAME MODEL PREVIOUS_RESULTS [eval args...]
  local name=$1 model=$2 previous=$3; shift 3
  mkdir -p $R/results/$name
  [ -f $R/results/$name/results.jsonl ] || grep '"length": 32768' "$previous" > $R/results/$name/results.jsonl
  timeout ${EVAL_TIMEOUT:-500} python3 -m subquad.cli eval --model "$model" --device cuda --no-progress \
    --suite ruler --lengths 32k --samples $SAMPLES --max-new-tokens 32 --batch-size 16 "$@" \
    --out $R/results/$name > $R/logs/ruler-$name.log 2>&1
  echo "$name: $(wc -l < $R/results/$name/results.jsonl) prompts"
}
heldout() {  # NAME MODEL [--ssa ...]
  local name=$1 model=$2; shift 2
  python3 -m subquad.train.heldout --model "$model" --corpus $R/corpus --seq-len 32k --tokens 1m --device cuda \
    "$@" --out $R/results/heldout-$name.json 2>&1 | grep heldout_loss | sed "s/^/$name /"
}
MAX4=(--ssa summary=max,sub_block_size=4)
case "${1:?ssa or twin}" in
  ssa)
    ruler32 ssa $SSA_MODEL $PREV/twin-2026-11-24/eval/ssa/ruler/results.jsonl "${MAX4[@]}" &
    corpus && { heldout ssa-mean $SSA_MODEL; heldout ssa-max4 $SSA_MODEL "${MAX4[@]}";
                heldout ssa-k64-max4 $SSA_MODEL --ssa top_k=64,summary=max,sub_block_size=4; }
    wait ;;
  twin)
    python3 -c "from subquad.train.trainer import convert_dense_to_ssa as c; c('$TWIN_MODEL', '$R/swap')" > /dev/null
    ruler32 twin $TWIN_MODEL $PREV/twin-local-rope-2026-11-24/eval/dense/ruler/results.jsonl &
    ruler32 swap $R/swap $PREV/twin-local-rope-2026-11-24/eval/swap/ruler/results.jsonl "${MAX4[@]}" &
    corpus && heldout twin $TWIN_MODEL
    wait ;;
  *) echo "expected ssa or twin" >&2; exit 2 ;;
esac
tail -n 2 $R/logs/ruler-*.log
tar czf $OUT/targets-$1.tgz $R/results $R/logs $R/corpus/meta.json 2>/dev/null
