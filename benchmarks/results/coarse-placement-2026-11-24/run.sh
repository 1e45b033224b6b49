# Where the coarse context term (span 256) goes, items 63-64 of benchmarks/NOTES.md. Item 62's span-256
# model (`../coarse-term-2026-11-24/run.sh`) has it in every layer, head and training sequence; here
#   lower: layers 0-3 only            upper: layers 4-7 only            (`SubquadConfig.coarse_layers`)
#   heads: query heads 0-2 of 5 only  (`coarse_heads`)
#   drop:  every layer, but half the training sequences run without it  (`coarse_dropout=0.5`)
# Otherwise the pair's recipe, corpus, plan and seed, 16 routed blocks. Detached, so it spans GPU calls:
#   bash benchmarks/results/coarse-placement-2026-11-24/run.sh launch     (corpus, then the trainings)
#   bash benchmarks/results/coarse-placement-2026-11-24/run.sh follow S   (progress for up to S seconds)
#   bash benchmarks/results/coarse-placement-2026-11-24/run.sh evals      (held-out by position at 32K,
#       the bf16 models to $OUT, then RULER at 32K, 30 a task, of each variant in turn, detached)
#   bash benchmarks/results/coarse-placement-2026-11-24/run.sh ruler [S]  (the RULER runs' progress for
#       up to S seconds, their results to $OUT; `ruler-start` resumes them on a fresh machine)
# VARIANTS picks the runs (`lower upper` for item 63, `drop heads` for item 64). DEVICE, FLAVOR, STEPS,
# SCHEDULE, CORPUS_MB, SKILLS_TOKENS, EVAL_TOKENS, LENGTH, EDGES, HO_TOKENS, SAMPLES, LAYERS_LOWER,
# LAYERS_UPPER, HEADS and SPAN shrink it for a CPU dry run.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
R=${R:-runs/coarse-placement}
OUT=${OUT:-$R/out}
DEVICE=${DEVICE:-cuda}
mkdir -p $R/logs $R/results $OUT
SITE=${SITE:-$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")}
MAX4=summary=max,sub_block_size=4
VARIANTS=${VARIANTS:?lower upper, drop heads, or any of them}
term() {  # variant -> its coarse-term settings beyond the span
  case $1 in
    lower) echo "coarse_layers=${LAYERS_LOWER:-[0,1,2,3]}" ;;
    upper) echo "coarse_layers=${LAYERS_UPPER:-[4,5,6,7]}" ;;
    heads) echo "coarse_heads=${HEADS:-[0,1,2]}" ;;
    drop) echo "coarse_dropout=0.5" ;;
  esac
}
model() {  # variant -> its model directory (trained here, or carried in under ship/)
  local m=$R/nano-ssa-$1/final; [ -d $m ] || m=$R/ship/nano-ssa-$1; echo $m
}
train() {  # variant: the pair's SSA run (scripts/train_nano.sh, RECIPE=retrieval) with the term
  local name=$1
  python3 -m subquad.train.cli --corpus $R/corpus --flavor ${FLAVOR:-nano} --seed 0 --device $DEVICE \
    ${COMPILE---compile} --tokens-per-step ${TOKENS_PER_STEP:-131072} --micro-batch-tokens 65536 --lr 3e-3 \
    --skills-fraction 0.5 --no-progress --answer-weight 20 --attention ssa \
    --model-override "router=learned,coarse_span=${SPAN:-256},$(term $name)" \
    --routing-loss 1.0 --routing-loss-queries 64 --steps ${STEPS:-1600} --warmup-steps 53 \
    --seq-len-schedule ${SCHEDULE:-0:1024,400:4096,880:16384,1360:32768} --eval-interval 400 \
    --eval-tokens ${EVAL_TOKENS:-1048576} --checkpoint-interval 100 --log-interval 10 \
    --out $R/nano-ssa-$name > $R/logs/train-$name.log 2>&1
}
ruler() {  # variant: RULER at 32K, 30 a task, on the twin's prompts (resumes from results.jsonl)
  python3 -m subquad.cli eval --model $(model $1) --device $DEVICE --no-progress --suite ruler \
    --lengths ${LENGTH:-32k} --samples ${SAMPLES:-30} --max-new-tokens 32 --batch-size 16 --ssa $MAX4 \
    --out $R/results/ruler-$1 >> $R/logs/ruler-$1.log 2>&1
}
progress() {  # held-out at each eval step against the twin's, the plain SSA model's and the all-layer term's
  python3 - $R $VARIANTS <<'PY'
import json, pathlib, sys
base = pathlib.Path("benchmarks/results")
def heldout(path):
    return {m["step"]: m["heldout_loss"] for m in map(json.loads, open(path)) if "heldout_loss" in m}
twin = heldout(base / "twin-local-rope-2026-11-24/nano-dense/metrics.jsonl")
plain = heldout(base / "twin-2026-11-24/nano-ssa/metrics.jsonl")
every = heldout(base / "coarse-term-2026-11-24/nano-ssa-coarse256/metrics.jsonl")
for name in sys.argv[2:]:
    path = pathlib.Path(sys.argv[1], f"nano-ssa-{name}", "metrics.jsonl")
    rows = [json.loads(line) for line in path.open()] if path.exists() else []
    for step, loss in heldout(path).items() if rows else ():
        print(f"{name} step {step} held-out {loss:.4f} (twin {twin.get(step, float('nan')):.4f}, plain SSA "
              f"{plain.get(step, float('nan')):.4f}, term in every layer {every.get(step, float('nan')):.4f})")
    train = [m for m in rows if "loss" in m]
    if train:
        print(f"{name}: last step {train[-1]['step']}, train loss {train[-1]['loss']:.4f}")
PY
}
ruler_start() {
  setsid nohup bash -c "$(declare -f model ruler); R=$R DEVICE=$DEVICE MAX4=$MAX4
    for name in $VARIANTS; do ruler \$name; done" > $R/logs/ruler-launch.log 2>&1 &
}
case "${1:?launch, follow S, evals, ruler [S] or ruler-start}" in
  launch)
    setsid nohup bash -c "
      [ -f $R/corpus/skills.bin ] || python3 -m subquad.cli corpus --source '$SITE' --out $R/corpus \
        --tokenizer-from src/subquad/assets/subquad-nano --skills-kinds facts=4,recall=1,copy=1,lookup=1 \
        --skills-doc-tokens 128,32768 --skills-prose 0.5 --skills-seed 6 --max-mb ${CORPUS_MB:-250} \
        --skills-tokens ${SKILLS_TOKENS:-80000000} > $R/logs/corpus.log 2>&1
      $(declare -f term train); R=$R DEVICE=$DEVICE
      for name in $VARIANTS; do train \$name & done; wait" > $R/logs/launch.log 2>&1 &
    echo launched ;;
  follow)
    end=$((SECONDS + ${2:-60}))
    while [ $SECONDS -lt $end ] && pgrep -f "[s]ubquad.(train.cli|cli corpus)" > /dev/null; do sleep 10; done
    progress; tail -n 2 $R/logs/train-*.log ;;
  evals)
    for name in $VARIANTS; do
      m=$R/nano-ssa-$name/final
      [ -d $m ] || { echo "$name: not finished"; continue; }
      python3 -m subquad.train.heldout --model $m --corpus $R/corpus --seq-len ${LENGTH:-32k} \
        --tokens ${HO_TOKENS:-1m} --device $DEVICE --ssa $MAX4 --by-position ${EDGES:-1k,4k,16k} \
        --out $R/results/heldout-$name-route-max.json > $R/logs/heldout-$name.log 2>&1 &
    done
    wait
    ruler_start
    python3 - $R/results <<'PY'
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("heldout-*.json")):
    r = json.loads(p.read_text())
    spans = " / ".join(f"{s['loss']:.4f}" for s in r["by_position"])
    print(f"{p.stem}: {r['heldout_loss']:.4f} (by position {spans})")
PY
    progress
    # The bf16 models (23 MB each) travel split, with the small files, within $OUT's 8 files of 16 MiB.
    for name in $VARIANTS; do
      [ -d $R/nano-ssa-$name/final ] && [ ! -f $R/ship/nano-ssa-$name/config.json ] && python3 - $R $name <<'PY'
import shutil, sys, torch
from pathlib import Path
from subquad.models import SubquadForCausalLM
name = f"nano-ssa-{sys.argv[2]}"
src, dst = Path(sys.argv[1], name, "final"), Path(sys.argv[1], "ship", name)
SubquadForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(dst)
for f in src.iterdir():
    if f.is_file() and not f.name.startswith("model") and not (dst / f.name).exists():
        shutil.copy2(f, dst / f.name)
PY
    done
    tar czf $OUT/coarse-placement.tgz $R/results $R/logs $R/corpus/meta.json $R/*/metrics.jsonl \
      $R/*/summary.json $R/*/train_config.json
    [ -d $R/ship ] && tar cf - -C $R/ship . | split -b 15M - $OUT/ship.tar.part-
    ls -la $OUT ;;
  ruler-start)
    ruler_start; echo started ;;
  ruler)
    end=$((SECONDS + ${2:-0}))
    while [ $SECONDS -lt $end ] && pgrep -f "[s]ubquad.cli eval" > /dev/null; do sleep 10; done
    for name in $VARIANTS; do
      [ -f $R/results/ruler-$name/results.jsonl ] && echo "$name: $(wc -l < $R/results/ruler-$name/results.jsonl) prompts"
    done
    tar czf $OUT/ruler.tgz $R/results $R/logs ;;
esac
