# The recall loss (`subquad train --recall-loss W`, src/subquad/models/recall_loss.py), item 65 of
# benchmarks/NOTES.md: the shipped `nano-p4` fine-tuned exactly as `nano-p4b` was (../retrieval-2026-11-24/:
# its corpus with skills seed 5, 600 steps at 32K, lr 3e-4, router loss 1.0, answer weight 20, routing by
# block means while training) plus the recall loss at weight W, one run per weight in WEIGHTS, side by side.
# p4b, the same fine-tune without the loss, is the control. Detached, so it spans GPU calls:
#   bash benchmarks/results/recall-loss-2026-11-24/run.sh launch     (corpus, then the fine-tunes)
#   bash benchmarks/results/recall-loss-2026-11-24/run.sh follow S   (progress for up to S seconds)
#   bash benchmarks/results/recall-loss-2026-11-24/run.sh evals      (attention recall at 32K of nano-p4 and
#       each run, then RULER niah_single_1/2/3 at 4K and 32K, 50 a task, detached)
#   bash benchmarks/results/recall-loss-2026-11-24/run.sh collect [S] (waits up to S seconds for the evals;
#       results, logs and the bf16 models to $OUT)
#   bash benchmarks/results/recall-loss-2026-11-24/run.sh long W S   (the bf16 model of weight W, carried in
#       under $R/ship/: niah_single_1/2 at 128K and 1M, 20 a task, and 2M, 10, as for p4, all at once for
#       up to S seconds; what finished to $OUT)
# DEVICE, COMPILE, STEPS, TRAIN_LEN, TOKENS_PER_STEP, MICRO_TOKENS, CORPUS_MB, SKILLS_TOKENS, EVAL_TOKENS, LENGTH, NIAH_LENGTHS,
# SAMPLES, WINDOWS and QUERIES shrink it for a CPU dry run.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
R=${R:-runs/recall-loss}
OUT=${OUT:-$R/out}
DEVICE=${DEVICE:-cuda}
mkdir -p $R/logs $R/results $OUT
SITE=${SITE:-$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")}
SHIPPED=src/subquad/assets/subquad-nano
MAX4=summary=max,sub_block_size=4
WEIGHTS=${WEIGHTS:-"0.3 1.0"}
name() { echo "nano-recall-$1"; }
train() {  # weight: p4b's fine-tune (its train_config.json) from the shipped weights, plus the recall loss
  python3 -m subquad.train.cli --corpus $R/corpus --init-from $SHIPPED --seed 0 --device $DEVICE \
    ${COMPILE---compile} --model-override router=learned --routing-loss 1.0 --routing-loss-queries 64 \
    --recall-loss $1 --recall-loss-queries 64 --ssa summary=mean --skills-fraction 0.7 --answer-weight 20 \
    --tokens-per-step ${TOKENS_PER_STEP:-131072} --micro-batch-tokens ${MICRO_TOKENS:-65536} --lr 3e-4 --steps ${STEPS:-600} \
    --seq-len-schedule 0:${TRAIN_LEN:-32768} --warmup-steps 31 --eval-interval 300 \
    --eval-tokens ${EVAL_TOKENS:-1048576} --checkpoint-interval 100 --log-interval 10 --no-progress \
    --out $R/$(name $1) > $R/logs/train-$(name $1).log 2>&1
}
recall() {  # model dir, label: attention recall and the oracle's at LENGTH, shipped routing
  python3 -m subquad.eval.recall --model $1 --corpus $R/corpus --length ${LENGTH:-32k} --windows ${WINDOWS:-4} \
    --max-queries ${QUERIES:-1024} --device $DEVICE --ssa $MAX4 --no-progress \
    --out $R/results/recall-$2.json > $R/logs/recall-$2.log 2>&1
}
needles() {  # model dir, label: niah_single_1/2/3 at 4K and 32K, 50 each, the prompts p4's numbers used
  python3 -m subquad.cli eval --model $1 --device $DEVICE --no-progress --suite ruler \
    --tasks niah_single_1,niah_single_2,niah_single_3 --lengths ${NIAH_LENGTHS:-4k,32k} \
    --samples ${SAMPLES:-50} --max-new-tokens 32 --batch-size 10 --ssa $MAX4 \
    --out $R/results/niah-$2 >> $R/logs/niah-$2.log 2>&1
}
progress() {  # training and held-out loss against p4b's, step by step
  python3 - $R $WEIGHTS <<'PY'
import json, pathlib, sys
def rows(path):
    return [json.loads(line) for line in open(path)] if path.exists() else []
control = rows(pathlib.Path("benchmarks/results/retrieval-2026-11-24/nano-p4b/metrics.jsonl"))
ref = {m["step"]: m for m in control if "loss" in m}
ref_ho = {m["step"]: m["heldout_loss"] for m in control if "heldout_loss" in m}
for weight in sys.argv[2:]:
    metrics = rows(pathlib.Path(sys.argv[1], f"nano-recall-{weight}", "metrics.jsonl"))
    train = [m for m in metrics if "loss" in m]
    if train:
        last = train[-1]
        p4b = ref.get(last["step"], {}).get("loss", float("nan"))
        print(f"W {weight}: step {last['step']}, loss {last['loss']:.4f} (p4b {p4b:.4f}), recall loss "
              f"{last['recall_loss']:.4f}, routing loss {last['routing_loss']:.4f}, {last['tokens_per_s']:,.0f} tok/s")
    for m in metrics:
        if "heldout_loss" in m:
            print(f"W {weight}: step {m['step']} held-out {m['heldout_loss']:.4f} "
                  f"(p4b {ref_ho.get(m['step'], float('nan')):.4f})")
PY
}
long_needles() {  # model dir, label, task, length, samples
  python3 -m subquad.cli eval --model $1 --device $DEVICE --no-progress --suite ruler --tasks $3 --lengths $4 \
    --samples $5 --max-new-tokens 32 --batch-size 1 --ssa $MAX4 --out $R/results/long-$2-$3-$4 >> $R/logs/long-$2.log 2>&1
}
case "${1:?launch, follow S, evals, collect [S] or long W S}" in
  launch)
    setsid nohup bash -c "
      [ -f $R/corpus/skills.bin ] || python3 -m subquad.cli corpus --source '$SITE' --out $R/corpus \
        --tokenizer-from $SHIPPED --max-mb ${CORPUS_MB:-250} --skills-tokens ${SKILLS_TOKENS:-60000000} \
        --skills-kinds facts=4,recall=1,copy=1,lookup=1 --skills-doc-tokens 128,8192 --skills-prose 0.5 \
        --skills-seed 5 > $R/logs/corpus.log 2>&1
      $(declare -f name train); R=$R DEVICE=$DEVICE SHIPPED=$SHIPPED
      for w in $WEIGHTS; do train \$w & done; wait" > $R/logs/launch.log 2>&1 &
    echo launched ;;
  follow)
    end=$((SECONDS + ${2:-60}))
    while [ $SECONDS -lt $end ] && pgrep -f "[s]ubquad.(train.cli|cli corpus)" > /dev/null; do sleep 10; done
    progress; tail -n 2 $R/logs/train-*.log ;;
  evals)
    setsid nohup bash -c "$(declare -f name recall needles); R=$R DEVICE=$DEVICE MAX4=$MAX4
      recall $SHIPPED nano-p4 &
      for w in $WEIGHTS; do [ -d $R/\$(name \$w)/final ] && recall $R/\$(name \$w)/final \$(name \$w) & done
      wait
      for w in $WEIGHTS; do [ -d $R/\$(name \$w)/final ] && needles $R/\$(name \$w)/final \$(name \$w) & done
      wait" > $R/logs/evals.log 2>&1 &
    echo started ;;
  collect)
    end=$((SECONDS + ${2:-0}))
    while [ $SECONDS -lt $end ] && pgrep -f "[s]ubquad.(cli eval|eval.recall)" > /dev/null; do sleep 10; done
    progress
    python3 - $R/results <<'PY'
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("recall-*.json")):
    r = json.loads(p.read_text())
    print(f"{p.stem}: recall {r['mean']:.4f}, oracle {r['oracle_recall']:.4f}, keys {r['keys_attended']:.2%}")
for d in sorted(pathlib.Path(sys.argv[1]).glob("niah-*")):
    rows = [json.loads(line) for line in open(d / "results.jsonl")] if (d / "results.jsonl").exists() else []
    cells = {}
    for row in rows:
        key = (row.get("task"), row.get("length"))
        hit, count = cells.get(key, (0.0, 0))
        cells[key] = (hit + float(row.get("score", 0)), count + 1)
    print(d.name, " ".join(f"{t}@{n}: {h / c:.0%} of {c}" for (t, n), (h, c) in sorted(cells.items())))
PY
    for w in $WEIGHTS; do  # the bf16 copies (23 MB each) travel split, within $OUT's 8 files of 16 MiB
      src=$R/$(name $w)/final dst=$R/ship/$(name $w)
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
    tar czf $OUT/recall-loss.tgz $R/results $R/logs $R/corpus/meta.json $R/*/metrics.jsonl $R/*/summary.json \
      $R/*/train_config.json
    [ -d $R/ship ] && tar cf - -C $R/ship . | split -b 15M - $OUT/ship.tar.part-
    ls -la $OUT ;;
  long)
    label=$(name ${2:?weight}) && model=$R/ship/$label
    for task in niah_single_1 niah_single_2; do
      for cell in ${LONG_CELLS:-128k:20 1m:20 2m:10}; do
        timeout ${3:-540} bash -c "$(declare -f long_needles); R=$R DEVICE=$DEVICE MAX4=$MAX4
          long_needles $model $label $task ${cell%:*} ${cell#*:}" &
      done
    done
    wait
    for d in $R/results/long-$label-*; do
      echo "$(basename $d): $(python3 -c "import json, sys; rows = [json.loads(l) for l in open(sys.argv[1])]
print(f'{sum(r[\"score\"] for r in rows):.0f} of {len(rows)}, {sum(r[\"seconds\"] for r in rows) / max(1, len(rows)):.1f} s a prompt')" $d/results.jsonl)"
    done
    tar czf $OUT/long-$label.tgz $R/results/long-$label-* $R/logs/long-$label.log ;;
esac
