# The twin pair's SSA nano trained with the coarse context term (`SubquadConfig.coarse_span`, item 62 of
# benchmarks/NOTES.md): every complete span before a query's local window as one learned summary entry,
# spans of 64 and of 256 tokens. The pair's recipe, corpus, plan and seed otherwise (`--ssa` default:
# 16 routed blocks), so the pair's `local_rope` dense twin (`../twin-local-rope-2026-11-24/`) and its
# 16-block SSA model (`../twin-2026-11-24/`) are the comparisons. Detached, so it spans GPU calls:
#   bash benchmarks/results/coarse-term-2026-11-24/run.sh launch     (corpus, then both trainings)
#   bash benchmarks/results/coarse-term-2026-11-24/run.sh follow S   (progress for up to S seconds)
#   bash benchmarks/results/coarse-term-2026-11-24/run.sh evals      (held-out by position at 32K;
#                                                                      results and bf16 models to $OUT)
#   bash benchmarks/results/coarse-term-2026-11-24/run.sh ruler N    (RULER at 32K, 30 a task, of the
#                                                                      coarse_span=N model; resumes)
# DEVICE, FLAVOR, STEPS, SCHEDULE, CORPUS_MB, SKILLS_TOKENS, LENGTH, EDGES, HO_TOKENS, SAMPLES and SPANS
# shrink it for a CPU dry run.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
R=${R:-runs/coarse}
OUT=${OUT:-$R/out}
DEVICE=${DEVICE:-cuda}
mkdir -p $R/logs $R/results $OUT
SITE=${SITE:-$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")}
MAX4=summary=max,sub_block_size=4
SPANS=${SPANS:-64 256}
train() {  # N: the pair's SSA run (scripts/train_nano.sh, RECIPE=retrieval) with coarse_span=N
  local n=$1
  python3 -m subquad.train.cli --corpus $R/corpus --flavor ${FLAVOR:-nano} --seed 0 --device $DEVICE \
    ${COMPILE---compile} --tokens-per-step ${TOKENS_PER_STEP:-131072} --micro-batch-tokens 65536 --lr 3e-3 \
    --skills-fraction 0.5 --no-progress --answer-weight 20 --attention ssa \
    --model-override router=learned,coarse_span=$n --routing-loss 1.0 --routing-loss-queries 64 \
    --steps ${STEPS:-1600} --warmup-steps 53 \
    --seq-len-schedule ${SCHEDULE:-0:1024,400:4096,880:16384,1360:32768} --eval-interval 400 \
    --eval-tokens 1048576 --checkpoint-interval 100 --log-interval 10 \
    --out $R/nano-ssa-coarse$n > $R/logs/train-coarse$n.log 2>&1
}
progress() {  # held-out at each eval step against the twin's and the plain 16-block SSA model's
  python3 - $R $SPANS <<'PY'
import json, pathlib, sys
base = pathlib.Path("benchmarks/results")
def heldout(path):
    return {m["step"]: m["heldout_loss"] for m in map(json.loads, open(path)) if "heldout_loss" in m}
twin = heldout(base / "twin-local-rope-2026-11-24/nano-dense/metrics.jsonl")
plain = heldout(base / "twin-2026-11-24/nano-ssa/metrics.jsonl")
for n in sys.argv[2:]:
    path = pathlib.Path(sys.argv[1], f"nano-ssa-coarse{n}", "metrics.jsonl")
    rows = [json.loads(line) for line in path.open()] if path.exists() else []
    for step, loss in heldout(path).items() if rows else ():
        print(f"coarse {n} step {step} held-out {loss:.4f} (twin {twin.get(step, float('nan')):.4f}, "
              f"plain SSA {plain.get(step, float('nan')):.4f})")
    train = [m for m in rows if "loss" in m]
    if train:
        print(f"coarse {n}: last step {train[-1]['step']}, train loss {train[-1]['loss']:.4f}")
PY
}
case "${1:?launch, follow S, evals or ruler N}" in
  launch)
    setsid nohup bash -c "
      [ -f $R/corpus/skills.bin ] || python3 -m subquad.cli corpus --source '$SITE' --out $R/corpus \
        --tokenizer-from src/subquad/assets/subquad-nano --skills-kinds facts=4,recall=1,copy=1,lookup=1 \
        --skills-doc-tokens 128,32768 --skills-prose 0.5 --skills-seed 6 --max-mb ${CORPUS_MB:-250} \
        --skills-tokens ${SKILLS_TOKENS:-80000000} > $R/logs/corpus.log 2>&1
      $(declare -f train); R=$R DEVICE=$DEVICE
      for n in $SPANS; do train \$n & done; wait" > $R/logs/launch.log 2>&1 &
    echo launched ;;
  follow)
    end=$((SECONDS + ${2:-60}))
    while [ $SECONDS -lt $end ] && pgrep -f "subquad.(train.cli|cli corpus)" > /dev/null; do sleep 10; done
    progress; tail -n 2 $R/logs/train-*.log ;;
  evals)
    for n in $SPANS; do
      m=$R/nano-ssa-coarse$n/final
      [ -d $m ] || { echo "coarse $n: not finished"; continue; }
      for ssa in summary=mean $MAX4; do
        python3 -m subquad.train.heldout --model $m --corpus $R/corpus --seq-len ${LENGTH:-32k} \
          --tokens ${HO_TOKENS:-1m} --device $DEVICE --ssa $ssa --by-position ${EDGES:-1k,4k,16k} \
          --out $R/results/heldout-coarse$n-${ssa%%,*}.json \
          > $R/logs/heldout-coarse$n-${ssa%%,*}.log 2>&1 &
      done
    done
    wait
    python3 - $R/results <<'PY'
import json, pathlib, sys
for p in sorted(pathlib.Path(sys.argv[1]).glob("heldout-*.json")):
    r = json.loads(p.read_text())
    spans = " / ".join(f"{s['loss']:.4f}" for s in r["by_position"])
    print(f"{p.stem}: {r['heldout_loss']:.4f} (by position {spans})")
PY
    progress
    # The bf16 models (23 MB each) travel split, with the small files, within $OUT's 8 files of 16 MiB.
    for n in $SPANS; do
      [ -d $R/nano-ssa-coarse$n/final ] && [ ! -f $R/ship/nano-ssa-coarse$n/config.json ] && python3 - $R $n <<'PY'
import shutil, sys, torch
from pathlib import Path
from subquad.models import SubquadForCausalLM
name = f"nano-ssa-coarse{sys.argv[2]}"
src, dst = Path(sys.argv[1], name, "final"), Path(sys.argv[1], "ship", name)
SubquadForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(dst)
for f in src.iterdir():
    if f.is_file() and not f.name.startswith("model") and not (dst / f.name).exists():
        shutil.copy2(f, dst / f.name)
PY
    done
    tar czf $OUT/coarse.tgz $R/results $R/logs $R/corpus/meta.json $R/*/metrics.jsonl $R/*/summary.json \
      $R/*/train_config.json
    [ -d $R/ship ] && tar cf - -C $R/ship . | split -b 15M - $OUT/ship.tar.part-
    ls -la $OUT ;;
  ruler)  # ~1.5 s a prompt alone on the H200: two calls (timeout 520, then the rest); resumes. With
          # `off`, the same weights with the coarse value maps zeroed, so the term adds exactly 0: does
          # the term help or hurt retrieval at inference?
    n=${2:?coarse span}
    m=$R/nano-ssa-coarse$n/final; [ -d $m ] || m=$R/ship/nano-ssa-coarse$n
    name=ruler-coarse$n${3:+-$3}
    if [ "${3:-}" = off ]; then
      python3 - $m $R/ship/nano-ssa-coarse$n-off <<'PY'
import sys, torch
from subquad.models import SubquadForCausalLM
model = SubquadForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
with torch.no_grad():
    for layer in model.model.layers:
        layer.self_attn.coarse_value_map.weight.zero_()
model.save_pretrained(sys.argv[2])
PY
      cp $m/tokenizer* $R/ship/nano-ssa-coarse$n-off/
      m=$R/ship/nano-ssa-coarse$n-off
    fi
    timeout ${EVAL_TIMEOUT:-520} python3 -m subquad.cli eval --model $m --device $DEVICE --no-progress \
      --suite ruler --lengths ${LENGTH:-32k} --samples ${SAMPLES:-30} --max-new-tokens 32 --batch-size 16 \
      --ssa $MAX4 --out $R/results/$name >> $R/logs/$name.log 2>&1
    wc -l $R/results/$name/results.jsonl
    tar czf $OUT/$name.tgz $R/results/$name $R/logs/$name.log ;;
esac
