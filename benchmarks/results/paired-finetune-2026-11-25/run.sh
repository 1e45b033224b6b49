# A paired fine-tune of the twin pair (item 68 of benchmarks/NOTES.md): the `local_rope` twin and the SSA
# nano with the coarse context term (span 256, ../coarse-term-2026-11-24/) trained on alike, 600 steps at 32K
# on the pair's corpus and recipe, same seed, the SSA model with the router loss and the recall loss at 0.3.
# Then the twin targets for both: held-out at 32K by position, RULER at 32K with 30 prompts a task (the twin
# pair's prompts), and the SSA model's attention recall at 32K before and after.
# Stage `long` runs apart: the shipped model's `niah_single_1` at 128K and 1M from 20 to 50 samples, resuming
# the committed results (its shards must be in the tree, so it comes in a later call than `launch`).
# One detached pipeline, so it spans GPU calls on a machine kept warm:
#   bash benchmarks/results/paired-finetune-2026-11-25/run.sh launch     (carry TWIN_INIT and SSA_INIT)
#   bash benchmarks/results/paired-finetune-2026-11-25/run.sh long       (detached)
#   bash benchmarks/results/paired-finetune-2026-11-25/run.sh follow S   (progress for up to S seconds, then
#       what exists to $OUT: results, logs, the bf16 models once trained)
#   bash benchmarks/results/paired-finetune-2026-11-25/run.sh before     (the twin as it was, RULER again)
# SEED=2 R=runs/paired-seed2 runs the replicate. DEVICE, COMPILE, STEPS, TOKENS_PER_STEP, MICRO_TOKENS,
# TRAIN_LEN, CORPUS_MB, SKILLS_TOKENS, EVAL_TOKENS, HELDOUT_LEN, EDGES, RECALL_LEN, RULER_LEN, SAMPLES,
# LONG_CELLS and LONG_TIMEOUT shrink it for a CPU dry run.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
HERE=benchmarks/results/paired-finetune-2026-11-25
R=${R:-runs/paired}
OUT=${OUT:-$R/out}
DEVICE=${DEVICE:-cuda}
SEED=${SEED:-1}  # the fine-tunes' data order; seed 2 is the replicate (R=runs/paired-seed2)
TWIN_INIT=${TWIN_INIT:-runs/twinlr/nano-dense}
SSA_INIT=${SSA_INIT:-runs/coarse/ship/nano-ssa-coarse256}
mkdir -p $R/logs $R/results $OUT
SITE=${SITE:-$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")}
SHIPPED=src/subquad/assets/subquad-nano
MAX4=summary=max,sub_block_size=4
RULER_LEN=${RULER_LEN:-32k}
# RULER's 13 tasks as two processes of about equal time
TASKS_A=niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3,niah_multivalue
TASKS_B=niah_multiquery,vt,cwe,fwe,qa_1,qa_2

corpus() {  # the pair's corpus command (meta.json is compared with the pair's below)
  [ -f $R/corpus/skills.bin ] || python3 -m subquad.cli corpus --source "$SITE" --out $R/corpus \
    --tokenizer-from $SHIPPED --skills-kinds facts=4,recall=1,copy=1,lookup=1 --skills-doc-tokens 128,32768 \
    --skills-prose 0.5 --skills-seed 6 --max-mb ${CORPUS_MB:-250} --skills-tokens ${SKILLS_TOKENS:-80000000} \
    > $R/logs/corpus.log 2>&1
}
train() {  # NAME INIT [flags]: the pair's recipe continued at 32K from INIT
  local name=$1 init=$2; shift 2
  [ -d $R/$name/final ] && return 0
  python3 -m subquad.train.cli --corpus $R/corpus --init-from $init --seed $SEED --device $DEVICE \
    ${COMPILE---compile} --tokens-per-step ${TOKENS_PER_STEP:-131072} --micro-batch-tokens ${MICRO_TOKENS:-65536} \
    --lr 3e-4 --skills-fraction 0.5 --answer-weight 20 --steps ${STEPS:-600} \
    --seq-len-schedule 0:${TRAIN_LEN:-32768} --warmup-steps 31 --eval-interval 300 \
    --eval-tokens ${EVAL_TOKENS:-1048576} --checkpoint-interval 100 --log-interval 10 --no-progress "$@" \
    --out $R/$name > $R/logs/train-$name.log 2>&1
}
heldout() {  # NAME MODEL [--ssa ...]: 1M held-out tokens at 32K, by position
  local name=$1 model=$2; shift 2
  python3 -m subquad.train.heldout --model $model --corpus $R/corpus --seq-len ${HELDOUT_LEN:-32k} \
    --tokens ${EVAL_TOKENS:-1048576} --device $DEVICE --by-position ${EDGES:-1k,4k,16k} "$@" \
    --out $R/results/heldout-$name.json > $R/logs/heldout-$name.log 2>&1
}
recall() {  # NAME MODEL: attention recall and the oracle's at 32K, best sub-block, 4 windows x 1,024 rows
  python3 -m subquad.eval.recall --model $2 --corpus $R/corpus --length ${RECALL_LEN:-32k} \
    --windows 4 --max-queries 1024 --device $DEVICE --ssa $MAX4 --no-progress \
    --out $R/results/recall-$1.json > $R/logs/recall-$1.log 2>&1
}
ruler() {  # NAME MODEL TASKS [eval args]: RULER at RULER_LEN
  local name=$1 model=$2 tasks=$3; shift 3
  mkdir -p $R/results/$name
  python3 -m subquad.cli eval --model $model --device $DEVICE --no-progress --suite ruler --lengths $RULER_LEN \
    --samples ${SAMPLES:-30} --max-new-tokens 32 --batch-size 16 --tasks $tasks "$@" --out $R/results/$name \
    >> $R/logs/ruler-$name.log 2>&1
}
pipeline() {
  corpus || { echo "corpus failed"; return 1; }
  cmp -s <(python3 -c "import json, sys; d = json.load(open(sys.argv[1])); d.pop('source', None); print(sorted(d.items()))" \
      $R/corpus/meta.json) <(python3 -c "import json, sys; d = json.load(open(sys.argv[1])); d.pop('source', None); print(sorted(d.items()))" \
      benchmarks/results/twin-2026-11-24/corpus-meta.json) && echo "corpus: meta.json as the pair's" \
    || echo "corpus: meta.json differs from the pair's"
  recall ssa-before $SSA_INIT &
  # the twin as it was trained (no --attention: that would also switch it to rotary everywhere)
  train twin $TWIN_INIT &
  train ssa $SSA_INIT --routing-loss 1.0 --routing-loss-queries 64 --recall-loss 0.3 --recall-loss-queries 64 &
  wait
  [ -d $R/twin/final ] && [ -d $R/ssa/final ] || { echo "training failed"; return 1; }
  echo "training done"
  ruler twin-a $R/twin/final $TASKS_A & ruler twin-b $R/twin/final $TASKS_B &
  ruler ssa-a $R/ssa/final $TASKS_A --ssa $MAX4 & ruler ssa-b $R/ssa/final $TASKS_B --ssa $MAX4 &
  heldout twin $R/twin/final & heldout ssa-max4 $R/ssa/final --ssa $MAX4 &
  heldout ssa-mean $R/ssa/final --ssa summary=mean & recall ssa-after $R/ssa/final &
  wait
  for m in twin ssa; do cat $R/results/$m-[ab]/results.jsonl > $R/results/ruler-$m.jsonl; done
  echo "pipeline done"
}
long() {  # the shipped model's niah_single_1 at 128K and 1M, resuming the committed samples
  local cell task=niah_single_1 prev=benchmarks/results/recall-loss-2026-11-24/eval
  for cell in ${LONG_CELLS:-128k:50 1m:50}; do
    local dir=$R/results/long-shipped-$task-${cell%:*}
    mkdir -p $dir
    [ -f $dir/results.jsonl ] || cp $prev/long-nano-recall-0.3-$task-${cell%:*}/results.jsonl $dir/
    timeout ${LONG_TIMEOUT:-1500} python3 -m subquad.cli eval --model $SHIPPED --device $DEVICE --no-progress \
      --suite ruler --tasks $task --lengths ${cell%:*} --samples ${cell#*:} --max-new-tokens 32 --batch-size 1 \
      --ssa $MAX4 --out $dir >> $R/logs/long-shipped.log 2>&1 &
  done
  wait
  echo "long done" >> $R/logs/long-shipped.log
}
progress() {  # training and held-out loss of the two fine-tunes, step by step
  python3 - $R <<'PY'
import json, pathlib, sys
for name in ("twin", "ssa"):
    path = pathlib.Path(sys.argv[1], name, "metrics.jsonl")
    rows = [json.loads(line) for line in path.open()] if path.exists() else []
    train = [m for m in rows if "loss" in m]
    if train:
        m = train[-1]
        extra = "".join(f", {k} {m[k]:.4f}" for k in ("routing_loss", "recall_loss") if m.get(k) is not None)
        print(f"{name}: step {m['step']}, loss {m['loss']:.4f}{extra}, {m['tokens_per_s']:,.0f} tok/s")
    for m in rows:
        if "heldout_loss" in m:
            print(f"{name}: step {m['step']} held-out {m['heldout_loss']:.4f}")
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
for p in sorted(res.glob("*/results.jsonl")):
    rows = [json.loads(line) for line in p.open()]
    hits = sum(float(r["score"]) for r in rows)
    secs = sum(r["seconds"] for r in rows) / max(1, len(rows))
    print(f"{p.parent.name}: {len(rows)} prompts, score sum {hits:.1f}, {secs:.1f} s a prompt")
PY
  if [ -f $R/results/ruler-ssa.jsonl ] && [ -f $R/results/ruler-twin.jsonl ]; then
    python3 -m subquad.eval.compare $R/results/ruler-ssa.jsonl $R/results/ruler-twin.jsonl \
      --out $R/results/compare-ssa-twin.json | tail -n 3
  fi
}
case "${1:?launch, long, before or follow S}" in
  launch)
    setsid nohup bash -c "$(declare -f corpus train heldout recall ruler pipeline)
      R=$R DEVICE=$DEVICE SEED=$SEED SITE='$SITE' SHIPPED=$SHIPPED MAX4=$MAX4 RULER_LEN=$RULER_LEN TWIN_INIT=$TWIN_INIT
      SSA_INIT=$SSA_INIT TASKS_A=$TASKS_A TASKS_B=$TASKS_B
      pipeline" > $R/logs/pipeline.log 2>&1 &
    echo launched ;;
  long)
    [ -f $SHIPPED/model.safetensors.index.json ] || { echo "the shipped model's weights are not in the tree"; exit 1; }
    setsid nohup bash -c "$(declare -f long); R=$R DEVICE=$DEVICE SHIPPED=$SHIPPED MAX4=$MAX4; long" \
      > /dev/null 2>&1 &
    echo "long launched" ;;
  before)  # the twin before its fine-tune, on the same prompts (its committed 17.82 again, or not)
    ruler twin-before-a $TWIN_INIT $TASKS_A & ruler twin-before-b $TWIN_INIT $TASKS_B & wait
    cat $R/results/twin-before-[ab]/results.jsonl > $R/results/ruler-twin-before.jsonl
    tar czf $OUT/before.tgz $R/results/twin-before-* $R/results/ruler-twin-before.jsonl $R/logs/ruler-twin-before-* ;;
  follow)
    # a machine that went back between calls holds no log: say so at once rather than wait
    [ -f $R/logs/pipeline.log ] || { echo "no pipeline here (a fresh machine?): launch again"; exit 1; }
    end=$((SECONDS + ${2:-60}))
    while [ $SECONDS -lt $end ] && ! grep -q "pipeline done\|failed" $R/logs/pipeline.log 2>/dev/null; do sleep 10; done
    progress; summary; cat $R/logs/pipeline.log; tail -n 2 $R/logs/train-*.log
    for name in twin ssa; do  # the bf16 copies (23 MB each) travel split, within $OUT's files of 16 MiB
      src=$R/$name/final dst=$R/ship/$name
      [ -d $src ] && [ ! -f $dst/config.json ] && python3 - $src $dst <<'PY'
import shutil, sys, torch
from pathlib import Path
from subquad.models import SubquadForCausalLM
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
SubquadForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(dst)
for f in src.iterdir():
    if f.is_file() and not f.name.startswith("model") and not (dst / f.name).exists():
        shutil.copy2(f, dst / f.name)
PY
    done
    if [ -d $R/ship ] && [ ! -f $R/ship.sent ] && [ -f $R/ship/twin/config.json ] && [ -f $R/ship/ssa/config.json ]; then
      tar cf - -C $R/ship . | split -b 15M - $OUT/ship.tar.part- && touch $R/ship.sent
    fi
    tar czf $OUT/paired.tgz $R/results $R/logs $R/corpus/meta.json $R/*/metrics.jsonl $R/*/summary.json \
      $R/*/train_config.json 2>/dev/null
    ls -la $OUT ;;
  *) echo "expected launch, long, before or follow S" >&2; exit 2 ;;
esac
