# The recall loss (item 65 of benchmarks/NOTES.md) on the twin pair: the pair's SSA nano trained again from
# step 0 with the pair's recipe, corpus, plan and seed (as `nano-ssa` of ../twin-same-init-2026-11-24/, which
# starts from the dense twin's initial weights and is the control) plus `--recall-loss 0.3` (the shipped
# model's weight). Then the twin targets against the `local_rope` twin (../twin-targets-2026-11-24/): held-out
# at 32K by position, attention recall at 32K, RULER at 32K with 30 prompts a task on the twin's prompts.
# While the corpus builds, the shipped model's RULER at 32K gets the 3 tasks of 13 its run did not reach.
# One detached pipeline, so it spans GPU calls on a machine kept warm:
#   bash benchmarks/results/recall-loss-pair-2026-11-25/run.sh launch     (everything, detached)
#   bash benchmarks/results/recall-loss-pair-2026-11-25/run.sh follow S   (progress for up to S seconds, then
#       what exists to $OUT: results, logs, the bf16 model once trained)
# DEVICE, COMPILE, STEPS, SCHEDULE, TOKENS_PER_STEP, MICRO_TOKENS, CORPUS_MB, SKILLS_TOKENS, EVAL_TOKENS,
# HELDOUT_LEN, EDGES, RECALL_LEN, RULER_LEN, SAMPLES and SHIPPED_SAMPLES shrink it for a CPU dry run.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
HERE=benchmarks/results/recall-loss-pair-2026-11-25
R=${R:-runs/recall-pair}
OUT=${OUT:-$R/out}
DEVICE=${DEVICE:-cuda}
mkdir -p $R/logs $R/results $OUT
SITE=${SITE:-$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")}
SHIPPED=src/subquad/assets/subquad-nano
MAX4=summary=max,sub_block_size=4
MODEL=nano-ssa-recall
RULER_LEN=${RULER_LEN:-32k}

corpus() {  # the pair's corpus command (meta.json is compared with the pair's below)
  [ -f $R/corpus/skills.bin ] || python3 -m subquad.cli corpus --source "$SITE" --out $R/corpus \
    --tokenizer-from $SHIPPED --skills-kinds facts=4,recall=1,copy=1,lookup=1 --skills-doc-tokens 128,32768 \
    --skills-prose 0.5 --skills-seed 6 --max-mb ${CORPUS_MB:-250} --skills-tokens ${SKILLS_TOKENS:-80000000} \
    > $R/logs/corpus.log 2>&1
}
train() {  # ../twin-same-init-2026-11-24/run.sh's `nano-ssa` with the recall loss
  [ -d $R/$MODEL/final ] && return 0
  python3 -m subquad.train.cli --corpus $R/corpus --flavor nano --seed 0 --device $DEVICE ${COMPILE---compile} \
    --tokens-per-step ${TOKENS_PER_STEP:-131072} --micro-batch-tokens ${MICRO_TOKENS:-65536} --lr 3e-3 \
    --skills-fraction 0.5 --no-progress --answer-weight 20 --attention ssa --model-override router=learned \
    --routing-loss 1.0 --routing-loss-queries 64 --recall-loss 0.3 --recall-loss-queries 64 \
    --steps ${STEPS:-1600} --seq-len-schedule ${SCHEDULE:-0:1024,400:4096,880:16384,1360:32768} --warmup-steps 53 \
    --eval-interval 400 --eval-tokens ${EVAL_TOKENS:-1048576} --checkpoint-interval 100 --log-interval 10 \
    --out $R/$MODEL > $R/logs/train.log 2>&1
}
heldout() {  # NAME [--ssa ...]: 1M held-out tokens at 32K, by position
  local name=$1; shift
  python3 -m subquad.train.heldout --model $R/$MODEL/final --corpus $R/corpus --seq-len ${HELDOUT_LEN:-32k} \
    --tokens ${EVAL_TOKENS:-1048576} --device $DEVICE --by-position ${EDGES:-1k,4k,16k} "$@" \
    --out $R/results/heldout-$name.json > $R/logs/heldout-$name.log 2>&1
}
recall() {  # NAME SSA: attention recall and the oracle's at 32K, 4 windows x 1,024 query rows
  python3 -m subquad.eval.recall --model $R/$MODEL/final --corpus $R/corpus --length ${RECALL_LEN:-32k} \
    --windows 4 --max-queries 1024 --device $DEVICE --ssa $2 --no-progress \
    --out $R/results/recall-$1.json > $R/logs/recall-$1.log 2>&1
}
ruler() {  # NAME MODEL SAMPLES [EARLIER]: RULER at RULER_LEN (TASKS: a subset), resuming EARLIER's lines there
  mkdir -p $R/results/$1
  if [ $# -gt 3 ] && [ ! -f $R/results/$1/results.jsonl ]; then
    grep "\"length\": $(python3 -c "from subquad.eval._core import parse_length; print(parse_length('$RULER_LEN'))")," \
      "$4" > $R/results/$1/results.jsonl
  fi
  python3 -m subquad.cli eval --model $2 --device $DEVICE --no-progress --suite ruler --lengths $RULER_LEN \
    --samples $3 --max-new-tokens 32 --batch-size 16 --ssa $MAX4 ${TASKS:+--tasks $TASKS} --out $R/results/$1 \
    >> $R/logs/ruler-$1.log 2>&1
}
pipeline() {
  ruler shipped-32k $SHIPPED ${SHIPPED_SAMPLES:-10} \
    benchmarks/results/recall-loss-2026-11-24/eval/ruler-nano-recall-0.3/results.jsonl &
  corpus || { echo "corpus failed"; return 1; }
  cmp -s <(python3 -c "import json, sys; d = json.load(open(sys.argv[1])); d.pop('source', None); print(sorted(d.items()))" \
      $R/corpus/meta.json) <(python3 -c "import json, sys; d = json.load(open(sys.argv[1])); d.pop('source', None); print(sorted(d.items()))" \
      benchmarks/results/twin-2026-11-24/corpus-meta.json) && echo "corpus: meta.json as the pair's" \
    || echo "corpus: meta.json differs from the pair's"
  train || { echo "training failed"; return 1; }
  wait
  # RULER as two processes (the GPU has room: a nano prompt alone leaves it mostly idle), beside the rest
  TASKS=niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3,niah_multivalue \
    ruler ssa-recall-32k-a $R/$MODEL/final ${SAMPLES:-30} &
  TASKS=niah_multiquery,vt,cwe,fwe,qa_1,qa_2 ruler ssa-recall-32k-b $R/$MODEL/final ${SAMPLES:-30} &
  heldout mean --ssa summary=mean & heldout max4 --ssa $MAX4 &
  recall mean summary=mean & recall max4 $MAX4 &
  wait
  cat $R/results/ssa-recall-32k-[ab]/results.jsonl > $R/results/ssa-recall-32k.jsonl
  echo "pipeline done"
}
progress() {  # the run's curve against the control (same recipe and weights, no recall loss) and the twin
  python3 - $R/$MODEL/metrics.jsonl <<'PY'
import json, pathlib, sys
def rows(path):
    path = pathlib.Path(path)
    return [json.loads(line) for line in path.open()] if path.exists() else []
control = {m["step"]: m for m in rows("benchmarks/results/twin-same-init-2026-11-24/nano-ssa/metrics.jsonl")}
twin = {m["step"]: m for m in rows("benchmarks/results/twin-local-rope-2026-11-24/nano-dense/metrics.jsonl")}
for m in rows(sys.argv[1]):
    key = "heldout_loss" if "heldout_loss" in m else "loss"
    if key == "heldout_loss" or m["step"] % 100 == 0:
        ref = lambda d: d.get(m["step"], {}).get(key, float("nan"))
        extra = f", recall loss {m['recall_loss']:.4f}" if "recall_loss" in m else ""
        print(f"step {m['step']} {key} {m[key]:.4f} (control {ref(control):.4f}, twin {ref(twin):.4f}){extra}")
PY
}
summary() {
  python3 - $R/results <<'PY'
import json, pathlib, sys
res = pathlib.Path(sys.argv[1])
for p in sorted(res.glob("heldout-*.json")):
    r = json.loads(p.read_text())
    spans = " ".join(f"{s['from']}-{s['to']}: {s['loss']:.4f}" for s in r.get("by_position", []))
    print(f"{p.stem}: {r['heldout_loss']:.4f} ({spans})")
for p in sorted(res.glob("recall-*.json")):
    r = json.loads(p.read_text())
    print(f"{p.stem}: recall {r['mean']:.4f}, oracle {r['oracle_recall']:.4f}, keys {r['keys_attended']:.2%}")
for p in sorted(res.glob("*/summary.json")):
    print(p.parent.name, json.loads(p.read_text()).get("average"))
PY
  for f in $R/results/*/results.jsonl; do echo "$(basename $(dirname $f)): $(wc -l < $f) prompts"; done
  if [ -f $R/results/ssa-recall-32k.jsonl ]; then
    python3 -m subquad.eval.compare $R/results/ssa-recall-32k.jsonl $HERE/../twin-targets-2026-11-24/eval/twin \
      --out $R/results/compare-ssa-recall-twin.json | tail -n 3
  fi
}
case "${1:?launch or follow S}" in
  launch)
    setsid nohup bash -c "$(declare -f corpus train heldout recall ruler pipeline)
      R=$R DEVICE=$DEVICE SITE='$SITE' SHIPPED=$SHIPPED MAX4=$MAX4 MODEL=$MODEL RULER_LEN=$RULER_LEN
      pipeline" > $R/logs/pipeline.log 2>&1 &
    echo launched ;;
  follow)
    # a machine that went back between calls holds no log: say so at once rather than wait
    [ -f $R/logs/pipeline.log ] || { echo "no pipeline here (a fresh machine?): launch again"; exit 1; }
    end=$((SECONDS + ${2:-60}))
    while [ $SECONDS -lt $end ] && ! grep -q "pipeline done\|failed" $R/logs/pipeline.log 2>/dev/null; do sleep 10; done
    progress; summary; cat $R/logs/pipeline.log; tail -n 2 $R/logs/train.log
    src=$R/$MODEL/final dst=$R/ship/$MODEL  # the bf16 copy (23 MB) travels split, within $OUT's files of 16 MiB
    if [ -d $src ] && [ ! -f $dst/config.json ]; then
      python3 - $src $dst <<'PY'
import shutil, sys, torch
from pathlib import Path
from subquad.models import SubquadForCausalLM
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
SubquadForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(dst)
for f in src.iterdir():
    if f.is_file() and not f.name.startswith("model") and not (dst / f.name).exists():
        shutil.copy2(f, dst / f.name)
PY
      tar cf - -C $R/ship . | split -b 15M - $OUT/ship.tar.part-
    fi
    tar czf $OUT/recall-pair.tgz $R/results $R/logs $R/corpus/meta.json $R/$MODEL/metrics.jsonl \
      $R/$MODEL/summary.json $R/$MODEL/train_config.json 2>/dev/null
    ls -la $OUT ;;
  *) echo "expected launch or follow S" >&2; exit 2 ;;
esac
