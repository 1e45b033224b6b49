# The SSA nano of the twin pair trained again from the twin's own initial weights (the learned router
# no longer shifts the global random stream), on the pair's corpus, plan and seed; beside it the same
# run routing by the best 4-token sub-block while training. Detached, so it spans GPU calls:
#   bash benchmarks/results/twin-same-init-2026-11-24/run.sh launch    (corpus, then both trainings)
#   bash benchmarks/results/twin-same-init-2026-11-24/run.sh follow S  (progress for up to S seconds)
#   bash benchmarks/results/twin-same-init-2026-11-24/run.sh evals     (held-out at 32K, results to $OUT)
#   bash benchmarks/results/twin-same-init-2026-11-24/run.sh ruler     (RULER at 32K, 30 a task, of the
#                                                                       max4-trained model; resumes)
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
R=runs/same-init
mkdir -p $R/logs
SITE=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
MAX4=summary=max,sub_block_size=4
train() {  # OUT [args]: scripts/train_nano.sh's SSA run of the retrieval recipe, with plan.env's steps
  local out=$1; shift
  python3 -m subquad.train.cli --corpus $R/corpus --flavor nano --seed 0 --device cuda --compile \
    --tokens-per-step 131072 --micro-batch-tokens 65536 --lr 3e-3 --skills-fraction 0.5 --no-progress \
    --answer-weight 20 --attention ssa --model-override router=learned --routing-loss 1.0 --routing-loss-queries 64 \
    --steps 1600 --seq-len-schedule 0:1024,400:4096,880:16384,1360:32768 --warmup-steps 53 \
    --eval-interval 400 --eval-tokens 1048576 --checkpoint-interval 100 --log-interval 10 \
    --out $R/$out "$@" > $R/logs/train-$out.log 2>&1
}
progress() {
  python3 - $R <<'PY'
import json, sys, pathlib
twin = {m["step"]: m for m in map(json.loads, open("benchmarks/results/twin-local-rope-2026-11-24/nano-dense/metrics.jsonl"))}
old = {m["step"]: m for m in map(json.loads, open("benchmarks/results/twin-2026-11-24/nano-ssa/metrics.jsonl"))}
for name in ("nano-ssa", "nano-ssa-max4"):
    path = pathlib.Path(sys.argv[1], name, "metrics.jsonl")
    rows = [json.loads(line) for line in path.open()] if path.exists() else []
    for m in rows:
        key = "heldout_loss" if "heldout_loss" in m else "loss"
        if key == "heldout_loss" or m["step"] % 100 == 0:
            ref = lambda d: round(d.get(m["step"], {}).get(key, float("nan")), 4)
            print(f"{name} step {m['step']} {key} {m[key]:.4f} (twin {ref(twin)}, old ssa {ref(old)})")
PY
}
case "${1:?launch, follow or evals}" in
  launch)
    setsid nohup bash -c "
      [ -f $R/corpus/skills.bin ] || python3 -m subquad.cli corpus --source '$SITE' --out $R/corpus \
        --tokenizer-from src/subquad/assets/subquad-nano --skills-kinds facts=4,recall=1,copy=1,lookup=1 \
        --skills-doc-tokens 128,32768 --skills-prose 0.5 --skills-seed 6 --max-mb 250 --skills-tokens 80000000 \
        > $R/logs/corpus.log 2>&1
      $(declare -f train); R=$R
      train nano-ssa & train nano-ssa-max4 --ssa $MAX4 & wait" > $R/logs/launch.log 2>&1 &
    echo launched ;;
  follow)
    end=$((SECONDS + ${2:-60}))
    while [ $SECONDS -lt $end ] && pgrep -f "subquad.(train.cli|cli corpus)" > /dev/null; do sleep 10; done
    progress; tail -n 2 $R/logs/train-*.log ;;
  evals)
    for m in nano-ssa nano-ssa-max4; do
      [ -d $R/$m/final ] || { echo "$m: not finished"; continue; }
      for ssa in summary=mean $MAX4; do
        python3 -m subquad.train.heldout --model $R/$m/final --corpus $R/corpus --seq-len 32k --tokens 1m \
          --device cuda --ssa $ssa --out $R/results/heldout-$m-${ssa%%,*}.json 2>&1 | grep heldout_loss | sed "s/^/$m $ssa /" &
      done
    done
    wait
    progress
    # The models stay behind: two fp32 directories are 90 MB, over what $OUT returns.
    tar czf $OUT/same-init.tgz $R/results $R/logs $R/corpus/meta.json $R/*/metrics.jsonl $R/*/summary.json \
      $R/*/train_config.json ;;
  ruler)  # ~1.8 s a prompt alone on the H200: two calls (timeout 520, then the rest)
    timeout ${EVAL_TIMEOUT:-520} python3 -m subquad.cli eval --model $R/nano-ssa-max4/final --device cuda \
      --no-progress --suite ruler --lengths 32k --samples 30 --max-new-tokens 32 --batch-size 16 --ssa $MAX4 \
      --out $R/results/ruler-max4 >> $R/logs/ruler-max4.log 2>&1
    wc -l $R/results/ruler-max4/results.jsonl
    tar czf $OUT/ruler-max4.tgz $R/results/ruler-max4 $R/logs/ruler-max4.log ;;
esac
