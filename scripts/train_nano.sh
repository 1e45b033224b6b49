#!/usr/bin/env bash
# Issue 5 on one GPU: corpus -> SSA nano + dense twin (trained side by side) -> converted twin -> evals.
#
#   bash scripts/train_nano.sh launch STAGE   run STAGE detached (setsid), log in $RUNS/logs/STAGE.log
#   bash scripts/train_nano.sh follow SECONDS print progress until the detached stage ends or SECONDS pass,
#                                             then copy results (and the bf16 models, split) to $OUT
#   bash scripts/train_nano.sh STAGE          run STAGE in the foreground
#
# Stages: main (corpus, probe, train, convert, short evals; RECIPE picks the data and losses), long
# (needle retrieval up to 12M for LONG_MODELS), tests,
# retrieval (BASE_MODEL, by default the shipped nano, + a learned router, fine-tuned on a facts-heavy
# skill mix, and its evals; FT_NAME names the run; MODEL=retrieval for `long` runs the long needles on it).
# Every step skips work that is already done (models saved, eval results resume), so rerunning a
# stage after a crash or on a fresh machine continues from what exists under $RUNS.
# Settings come from the environment; defaults are the ones used for the shipped model.
# A GPU machine that may go back between calls: run a short stage whole in one call, e.g.
#   timeout 560 bash scripts/train_nano.sh retrieval; bash scripts/train_nano.sh follow 0
# (FT_MINUTES small, FT_EVALS a few; chain fine-tunes through the bf16 model each call returns).
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
RUNS=${RUNS:-runs}
OUT=${OUT:-$RUNS/out}
SITE=${SITE:-$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")}
CORPUS_MB=${CORPUS_MB:-250}
SKILLS_TOKENS=${SKILLS_TOKENS:-40000000}
TRAIN_MINUTES=${TRAIN_MINUTES:-13}      # wall-clock budget for the two trainings running together
TOKENS_PER_STEP=${TOKENS_PER_STEP:-131072}
SKILLS_FRACTION=${SKILLS_FRACTION:-0.25}
LR=${LR:-3e-3}
LENGTHS=${LENGTHS:-"1024 4096 16384 32768"}  # curriculum: 25% / 30% / 30% / 15% of the steps
TRAIN_LEN=${LENGTHS##* }                     # the longest training length
FLAVOR=${FLAVOR:-nano}
DEVICE=${DEVICE:-cuda}
COMPILE=${COMPILE:---compile}
EVAL_SAMPLES=${EVAL_SAMPLES:-10}
# main's recipe: "first" is the 2026-11-22 run (its own BPE, 25% skill windows of every kind, plain loss);
# "retrieval" trains the pair from step 0 on what the shipped model's fine-tunes ended with: its tokenizer,
# facts-heavy skill documents (composed statements, half on prose haystacks, 128-32K tokens), answer
# tokens weighted, and for the SSA models a learned router trained by the router loss (the dense twin has
# no router: its LM loss and data are the same); SKILLS_TOKENS_MAIN and SKILLS_FRACTION_MAIN change its
# 80M skill tokens and 50% skill windows. EVAL_SSA: SSA settings for the SSA models' task evals.
RECIPE=${RECIPE:-first}
# The dense twin's positions: rope (rotary on every key) or local_rope (rotary in the SSA model's local
# window, every earlier key scored without position: the SSA model's own scheme, so the pair differs in
# the attention alone). PAIR: the models main trains and evaluates; "dense" with the pair's plan.env
# copied into $RUNS retrains the twin alone on the pair's steps and schedule.
TWIN_POSITIONS=${TWIN_POSITIONS:-rope}
PAIR=${PAIR:-"ssa dense"}
# PAIR_SSA: SSA settings for both models of the pair, e.g. local_blocks=8,top_k=10 (the same 1,216 keys a
# query, more of them local). The twin's local_rope window follows local_blocks and block_size.
PAIR_SSA=${PAIR_SSA:-}
PAIR_SSA_ARGS=(); [ -n "$PAIR_SSA" ] && PAIR_SSA_ARGS=(--ssa "$PAIR_SSA")
SHIPPED_MODEL=src/subquad/assets/subquad-nano
case "$RECIPE" in
  first) CORPUS_ARGS=(--vocab-size 8192); TRAIN_ARGS=(); SSA_ARGS=(); EVAL_SSA=${EVAL_SSA:-} ;;
  retrieval)
    SKILLS_TOKENS=${SKILLS_TOKENS_MAIN:-80000000}; SKILLS_FRACTION=${SKILLS_FRACTION_MAIN:-0.5}
    CORPUS_ARGS=(--tokenizer-from "$SHIPPED_MODEL" --skills-kinds facts=4,recall=1,copy=1,lookup=1
      --skills-doc-tokens 128,32768 --skills-prose 0.5 --skills-seed 6)
    TRAIN_ARGS=(--answer-weight 20)
    SSA_ARGS=(--model-override router=learned --routing-loss 1.0 --routing-loss-queries 64)
    EVAL_SSA=${EVAL_SSA-summary=max,sub_block_size=4} ;;
  *) echo "RECIPE=$RECIPE: expected first or retrieval"; exit 2 ;;
esac
mkdir -p "$RUNS/logs" "$OUT"

log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$RUNS/logs/progress.log"; }
train() { python3 -m subquad.train.cli --corpus "$RUNS/corpus" --flavor "$FLAVOR" --seed 0 --device "$DEVICE" $COMPILE \
  --tokens-per-step "$TOKENS_PER_STEP" --micro-batch-tokens 65536 --lr "$LR" --skills-fraction "$SKILLS_FRACTION" \
  --no-progress "${TRAIN_ARGS[@]}" "$@"; }

corpus() {
  [ -f "$RUNS/corpus/skills.bin" ] && return 0
  log "corpus: $CORPUS_MB MB of $SITE + $SKILLS_TOKENS skill tokens ($RECIPE recipe)"
  python3 -m subquad.cli corpus --source "$SITE" --out "$RUNS/corpus" "${CORPUS_ARGS[@]}" \
    --max-mb "$CORPUS_MB" --skills-tokens "$SKILLS_TOKENS" > "$RUNS/logs/corpus.log" 2>&1 || return 1
  tail -5 "$RUNS/logs/corpus.log"
}

# Steps for the main run: time a few steps of both models at each curriculum length, side by side
# (as they will train), and fit the SSA model's (the slower) schedule into TRAIN_MINUTES.
probe() {
  [ -f "$RUNS/plan.env" ] && return 0
  log "probe: step times at $LENGTHS, SSA and dense side by side"
  local sched i=0 n
  sched=$(for n in $LENGTHS; do printf "%s%d:%d" "${sched:+,}" $((i * 6)) "$n"; sched=1; i=$((i + 1)); done)
  local extra
  for attn in ssa dense; do
    extra=(--position-scheme "$TWIN_POSITIONS"); [ "$attn" = ssa ] && extra=("${SSA_ARGS[@]}")
    train --attention "$attn" "${extra[@]}" "${PAIR_SSA_ARGS[@]}" --out "$RUNS/probe-$attn" --steps 24 \
      --seq-len-schedule "$sched" \
      --warmup-steps 2 --eval-interval 0 --eval-tokens 32768 --checkpoint-interval 1000 --log-interval 1 \
      > "$RUNS/logs/probe-$attn.log" 2>&1 &
  done
  wait
  python3 - "$RUNS" "$TRAIN_MINUTES" "$TOKENS_PER_STEP" $LENGTHS <<'EOF' || return 1
import json, sys
runs, minutes, tokens_per_step = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
lengths = [int(n) for n in sys.argv[4:]]
def step_times(attn):
    rows = [json.loads(l) for l in open(f"{runs}/probe-{attn}/metrics.jsonl") if '"loss"' in l]
    by_len = {}
    for r in rows:
        by_len.setdefault(r["seq_len"], []).append(tokens_per_step / r["tokens_per_s"])
    return {n: sorted(t[-3:])[1] for n, t in by_len.items()}  # median of the last 3 (compiled) steps
ssa, dense = step_times("ssa"), step_times("dense")
shares = dict(zip(lengths, (0.25, 0.30, 0.30, 0.15)))
per_step = sum(shares[n] * max(ssa[n], dense[n]) for n in shares)
steps = max(50, int(minutes * 60 / per_step / 50) * 50)
marks = [0, int(0.25 * steps), int(0.55 * steps), int(0.85 * steps)]
schedule = ",".join(f"{m}:{n}" for m, n in zip(marks, shares))
print("step seconds ssa", ssa, "dense", dense, "->", steps, "steps", schedule)
open(f"{runs}/plan.env", "w").write(f"STEPS={steps}\nSCHEDULE={schedule}\n")
EOF
  cat "$RUNS/plan.env"
}

train_pair() {
  # shellcheck disable=SC1091
  source "$RUNS/plan.env"
  log "train: $PAIR ($RECIPE recipe, twin positions $TWIN_POSITIONS${PAIR_SSA:+, SSA settings $PAIR_SSA}), $STEPS steps, $SCHEDULE"
  local common=("${PAIR_SSA_ARGS[@]}" --steps "$STEPS" --seq-len-schedule "$SCHEDULE" --warmup-steps $((STEPS / 30))
    --eval-interval $((STEPS / 4)) --eval-tokens 1048576
    --checkpoint-interval 100 --log-interval 10)
  in_pair ssa && [ ! -d "$RUNS/nano-ssa/final" ] && train --attention ssa "${SSA_ARGS[@]}" --out "$RUNS/nano-ssa" \
    "${common[@]}" > "$RUNS/logs/train-ssa.log" 2>&1 &
  in_pair dense && [ ! -d "$RUNS/nano-dense/final" ] && train --attention dense --position-scheme "$TWIN_POSITIONS" \
    --out "$RUNS/nano-dense" "${common[@]}" > "$RUNS/logs/train-dense.log" 2>&1 &
  wait
  local name
  for name in $PAIR; do [ -d "$RUNS/nano-$name/final" ] || { log "train: nano-$name did not finish"; return 1; }; done
}
in_pair() { [[ " $PAIR " == *" $1 "* ]]; }

convert() {  # the converted twin keeps the twin's positions, and the shared router (a learned one needs local_rope)
  in_pair dense || return 0
  [ -d "$RUNS/nano-converted/final" ] && return 0
  # shellcheck disable=SC1091
  source "$RUNS/plan.env"
  local steps=$((STEPS * 4 / 100))   # 4% of the twin's training tokens (the issue allows 5%)
  log "convert: dense twin -> SSA, fine-tune $steps steps at $TRAIN_LEN"
  train --convert-from "$RUNS/nano-dense/final" --out "$RUNS/nano-converted" --steps "$steps" --lr 3e-4 \
    --warmup-steps $((steps / 10 + 1)) --seq-len-schedule "0:$TRAIN_LEN" \
    --eval-interval 0 --eval-tokens 1048576 --checkpoint-interval 1000 --log-interval 5 \
    > "$RUNS/logs/convert.log" 2>&1
}

# Retrieval fine-tune: start from BASE_MODEL (same tokenizer), add a learned router trained by the
# router loss, shift the skill mix towards English facts documents ending in a quiz, and weigh the
# answer tokens up (benchmarks/results/retrieval-2026-11-22/ has the runs these defaults come from).
BASE_MODEL=${BASE_MODEL:-$SHIPPED_MODEL}
FT_MINUTES=${FT_MINUTES:-9}
FT_LR=${FT_LR:-1e-3}
FT_SKILLS_FRACTION=${FT_SKILLS_FRACTION:-0.5}
FT_SKILLS_KINDS=${FT_SKILLS_KINDS:-facts=4,recall=1,copy=1,lookup=1}
FT_DOC_TOKENS=${FT_DOC_TOKENS:-256,32768}  # skill document lengths (log-uniform), LOW,HIGH tokens
ROUTING_LOSS=${ROUTING_LOSS:-1.0}
FT_ROUTER=${FT_ROUTER:-learned}         # learned, or gated (routing keys weighed by a per-token gate)
ROUTING_TEMPERATURE=${ROUTING_TEMPERATURE:-1.0}  # < 1 sharpens the router loss's target
FT_SSA=${FT_SSA:-}                      # SSA settings to change, e.g. summary=mean (the shipped model
                                        # routes by summary=max; its fine-tunes p3a-c ran with mean)
FT_TRAIN_ONLY=${FT_TRAIN_ONLY:-all}     # router: fine-tune only the learned router, the model frozen
ANSWER_WEIGHT=${ANSWER_WEIGHT:-20}      # skill answer tokens count 1 + this in the loss
FT_NAME=${FT_NAME:-nano-retrieval}      # run directory and results name
FT_CORPUS=${FT_CORPUS:-corpus-ft}
SKILLS_SEED=${SKILLS_SEED:-0}           # a new seed gives new skill documents over the same corpus
SKILLS_PROSE=${SKILLS_PROSE:-0}         # share of facts documents with a haystack of English prose lines
FT_EVALS=${FT_EVALS-"niah demo skills routing recall heldout ruler"}  # which evals the stage runs ("": none)
NIAH_LENGTHS=${NIAH_LENGTHS:-4k,$TRAIN_LEN}
ROUTING_LENGTHS=${ROUTING_LENGTHS:-$TRAIN_LEN,1m}  # needle_routing.py: router ranks of the needle block
SKILL_LENGTHS=${SKILL_LENGTHS:-2k,$TRAIN_LEN,128k,1m}  # skill_accuracy.py: our facts format
ft_train() {
  python3 -m subquad.train.cli --corpus "$RUNS/$FT_CORPUS" --init-from "$BASE_MODEL" --seed 0 --device "$DEVICE" \
    $COMPILE --model-override "router=$FT_ROUTER" --routing-loss "$ROUTING_LOSS" --routing-loss-queries 64 \
    --routing-loss-temperature "$ROUTING_TEMPERATURE" --train-only "$FT_TRAIN_ONLY" ${FT_SSA:+--ssa "$FT_SSA"} \
    --skills-fraction "$FT_SKILLS_FRACTION" --answer-weight "$ANSWER_WEIGHT" --tokens-per-step "$TOKENS_PER_STEP" --micro-batch-tokens 65536 \
    --lr "$FT_LR" --no-progress "$@"
}
retrieval() {
  if [ ! -f "$RUNS/$FT_CORPUS/skills.bin" ]; then
    log "$FT_CORPUS: $CORPUS_MB MB of $SITE with $BASE_MODEL's tokenizer + $SKILLS_TOKENS skill tokens ($FT_SKILLS_KINDS, $FT_DOC_TOKENS)"
    python3 -m subquad.cli corpus --source "$SITE" --out "$RUNS/$FT_CORPUS" --tokenizer-from "$BASE_MODEL" \
      --max-mb "$CORPUS_MB" --skills-tokens "$SKILLS_TOKENS" --skills-kinds "$FT_SKILLS_KINDS" --skills-doc-tokens "$FT_DOC_TOKENS" \
      --skills-seed "$SKILLS_SEED" --skills-prose "$SKILLS_PROSE" \
      > "$RUNS/logs/$FT_CORPUS.log" 2>&1 || return 1
  fi
  if [ ! -f "$RUNS/plan-$FT_NAME.env" ]; then
    ft_train --out "$RUNS/probe-$FT_NAME" --steps 12 --seq-len-schedule "0:$TRAIN_LEN" --warmup-steps 2 \
      --eval-interval 0 --eval-tokens 32768 --checkpoint-interval 1000 --log-interval 1 > "$RUNS/logs/probe-$FT_NAME.log" 2>&1
    python3 - "$RUNS" "$FT_MINUTES" "$TOKENS_PER_STEP" "$TRAIN_LEN" "$FT_NAME" <<'PY' || return 1
import json, sys
runs, minutes, tokens_per_step, length, name = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rows = [json.loads(l) for l in open(f"{runs}/probe-{name}/metrics.jsonl") if '"loss"' in l]
step = sorted(tokens_per_step / r["tokens_per_s"] for r in rows[-4:])[1]
steps = max(20, int(minutes * 60 / step / 10) * 10)
schedule = f"0:{length // 4},{int(0.3 * steps)}:{length}"
print(f"fine-tune step {step:.3f} s at {length} -> {steps} steps, {schedule}")
open(f"{runs}/plan-{name}.env", "w").write(f"FT_STEPS={steps}\nFT_SCHEDULE={schedule}\n")
PY
  fi
  # shellcheck disable=SC1091
  source "$RUNS/plan-$FT_NAME.env"
  if [ ! -d "$RUNS/$FT_NAME/final" ]; then
    log "fine-tune $FT_NAME: $BASE_MODEL + $FT_ROUTER router (train $FT_TRAIN_ONLY, target temperature $ROUTING_TEMPERATURE), answer weight $ANSWER_WEIGHT, $FT_STEPS steps, $FT_SCHEDULE, skills $FT_SKILLS_FRACTION"
    ft_train --out "$RUNS/$FT_NAME" --steps "$FT_STEPS" --seq-len-schedule "$FT_SCHEDULE" \
      --warmup-steps $((FT_STEPS / 20 + 1)) --eval-interval $((FT_STEPS / 2)) --eval-tokens 1048576 \
      --checkpoint-interval 100 --log-interval 10 > "$RUNS/logs/train-$FT_NAME.log" 2>&1 || return 1
  fi
  local model=$RUNS/$FT_NAME/final res=$RUNS/results/$FT_NAME elog=$RUNS/logs/eval-$FT_NAME.log
  log "eval retrieval: $FT_EVALS"
  ev() { python3 -m subquad.cli eval --model "$model" --device "$DEVICE" --no-progress "$@" >> "$elog" 2>&1; }
  want() { [[ " $FT_EVALS " == *" $1 "* ]]; }
  mkdir -p "$res"
  # The evaluation's needles first (RULER's, then the demo's grid), then our own skill format
  # (held-out filler): when the needles fail, does the model read back at all, and does the router
  # find the fact?
  want niah && ev --suite ruler --tasks niah_single_1,niah_single_2,niah_single_3 --lengths "$NIAH_LENGTHS" \
    --samples 50 --max-new-tokens 32 --batch-size 4 --out "$res/niah-single"
  want demo && python3 -m subquad.cli demo --model "$model" --device "$DEVICE" --lengths 4k,16k,64k \
    --depths 10,50,90 --no-progress --out "$res/demo" >> "$elog" 2>&1
  want skills && python3 scripts/skill_accuracy.py --model "$model" --corpus "$RUNS/$FT_CORPUS" --kind facts \
    --lengths "$SKILL_LENGTHS" --samples 24 --routing --device "$DEVICE" --out "$res/skill-accuracy.json" \
    >> "$elog" 2>&1
  want routing && python3 scripts/needle_routing.py --model "$model" --lengths "$ROUTING_LENGTHS" \
    --device "$DEVICE" --out "$res/needle-routing.json" >> "$elog" 2>&1
  want recall && { [ -f "$res/recall.json" ] || python3 -m subquad.eval.recall --model "$model" \
    --corpus "$RUNS/$FT_CORPUS" --length "$TRAIN_LEN" --windows 4 --device "$DEVICE" --out "$res/recall.json" \
    >> "$elog" 2>&1; }
  want heldout && python3 -m subquad.train.heldout --model "$model" --corpus "$RUNS/$FT_CORPUS" \
    --seq-len "$TRAIN_LEN" --tokens 1m --device "$DEVICE" --out "$res/heldout.json" >> "$elog" 2>&1
  want ruler && ev --suite ruler --lengths "$RULER_LENGTHS" --samples "$EVAL_SAMPLES" --max-new-tokens 32 \
    --batch-size 16 --out "$res/ruler"
  log "eval retrieval: done"
}

MODELS=(ssa:nano-ssa/final dense:nano-dense/final swap:nano-converted/converted converted:nano-converted/final)
RULER_LENGTHS=${RULER_LENGTHS:-4k,16k,32k}
MRCR_LENGTHS=${MRCR_LENGTHS:-32k,128k}
task_routing() {  # $1 model name -> the caller's `routing`: --ssa EVAL_SSA for SSA models, nothing for dense
  routing=(); [ "$1" != dense ] && [ -n "$EVAL_SSA" ] && routing=(--ssa "$EVAL_SSA")
}
eval_model() {  # $1 name, $2 model dir: every short eval of one model, one after the other
  local name=$1 dir=$2 res=$RUNS/results/$1 elog=$RUNS/logs/eval-$1.log
  log "eval $name: held-out loss, niah_single $TRAIN_LEN, RULER $RULER_LENGTHS, MRCR $MRCR_LENGTHS"
  local routing; task_routing "$name"  # held-out loss routes as trained, the task evals as EVAL_SSA says
  ev() { python3 -m subquad.cli eval --model "$dir" --device "$DEVICE" --no-progress "${routing[@]}" "$@" >> "$elog" 2>&1; }
  python3 -m subquad.train.heldout --model "$dir" --corpus "$RUNS/corpus" --seq-len "$TRAIN_LEN" --tokens 1m \
    --device "$DEVICE" --out "$res/heldout.json" >> "$elog" 2>&1
  ev --suite ruler --tasks niah_single_1,niah_single_2,niah_single_3 --lengths "$TRAIN_LEN" --samples 50 \
    --max-new-tokens 32 --batch-size 4 --out "$res/niah-single"
  ev --suite ruler --lengths "$RULER_LENGTHS" --samples "$EVAL_SAMPLES" --max-new-tokens 32 --batch-size 16 \
    --out "$res/ruler"
  ev --suite mrcr --lengths "$MRCR_LENGTHS" --samples "$EVAL_SAMPLES" --max-new-tokens 64 --out "$res/mrcr"
  log "eval $name: done"
}

evals_short() {  # the models side by side (the twin's three with it): small-batch evals leave most of the GPU idle
  local entry name
  for entry in "${MODELS[@]}"; do
    name=${entry%%:*}; [ "$name" = ssa ] || name=dense
    in_pair "$name" && eval_model "${entry%%:*}" "$RUNS/${entry#*:}" &
  done
  in_pair ssa && [ ! -f "$RUNS/results/recall.json" ] && python3 -m subquad.eval.recall --model "$RUNS/nano-ssa/final" \
    --corpus "$RUNS/corpus" --length "$TRAIN_LEN" --windows 4 --device "$DEVICE" --out "$RUNS/results/recall.json" \
    >> "$RUNS/logs/eval-recall.log" 2>&1 &
  wait
}

# Needle retrieval far past the training length. Sample counts shrink with length to fit the GPU
# session (a 12M prompt takes about a minute to prefill); the model card states them.
NEEDLE_PLAN=${NEEDLE_PLAN:-"128k:50 1m:20 2m:10 6m:4 12m:3"}
NEEDLE_TASKS=${NEEDLE_TASKS:-niah_single_1,niah_single_2,niah_single_3}
LONG_MODELS=${LONG_MODELS:-"ssa converted"}  # main's models (names as in MODELS) for the `long` stage
evals_long() {
  local model=${1:-$RUNS/nano-ssa/final} name=${2:-ssa} routing
  task_routing "$name"
  for item in $NEEDLE_PLAN; do
    log "needles $name ${item%%:*} x ${item#*:} per task"
    python3 -m subquad.cli eval --model "$model" --device "$DEVICE" --no-progress --suite ruler "${routing[@]}" \
      --tasks "$NEEDLE_TASKS" --lengths "${item%%:*}" --samples "${item#*:}" \
      --max-new-tokens 32 --out "$RUNS/results/$name/niah-single" >> "$RUNS/logs/eval-long.log" 2>&1
  done
}

bf16_copy() {  # $1 model dir -> $2: bf16 safetensors in shards that fit $OUT's 16 MiB files
  [ -f "$2/config.json" ] && return 0
  python3 - "$1" "$2" <<'EOF'
import shutil, sys, torch
from pathlib import Path
from subquad.models import SubquadForCausalLM
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
model = SubquadForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
model.save_pretrained(dst, max_shard_size="12MB")
for f in src.iterdir():
    if f.is_file() and not f.name.startswith("model") and not (dst / f.name).exists():
        shutil.copy2(f, dst / f.name)
EOF
}

# Run directories whose final model collect() copies to $OUT in bf16 (23 MB each for nano; $OUT takes
# 64 MiB in all, so two). With RECIPE=retrieval the twin travels instead of the converted model (which
# its 4% fine-tune rebuilds from the twin in a minute).
if [ "$RECIPE" = retrieval ]; then SHIP=${SHIP:-"nano-ssa nano-dense"}; else SHIP=${SHIP:-"nano-ssa nano-converted $FT_NAME"}; fi
collect() {  # results, logs, metrics and the bf16 models in SHIP -> $OUT (<= 8 files of < 16 MiB)
  mkdir -p "$OUT"
  local run shipped=()
  for run in $SHIP; do
    [ -d "$RUNS/$run/final" ] && bf16_copy "$RUNS/$run/final" "$RUNS/ship/subquad-$run" && shipped+=("subquad-$run")
  done
  local small=("$RUNS/logs" "$RUNS/results")
  for f in plan.env "plan-$FT_NAME.env" corpus/meta.json corpus/skills.json "$FT_CORPUS/meta.json" "$FT_CORPUS/skills.json"; do
    [ -f "$RUNS/$f" ] && small+=("$RUNS/$f")
  done
  for run in nano-ssa nano-dense nano-converted "$FT_NAME" probe-ssa probe-dense "probe-$FT_NAME"; do
    for f in metrics.jsonl summary.json train_config.json; do [ -f "$RUNS/$run/$f" ] && small+=("$RUNS/$run/$f"); done
  done
  tar czf "$OUT/results.tgz" "${small[@]}" 2>/dev/null
  [ ${#shipped[@]} -gt 0 ] && tar cf - -C "$RUNS/ship" "${shipped[@]}" | split -b 15M - "$OUT/ship.tar.part-"
  ls -la "$OUT"
}

stage() {
  case "$1" in
    tests) python3 -m pytest -q tests/models/test_sparse_triton.py tests/models/test_subquad_model.py 2>&1 | tail -3 ;;
    main) corpus && probe && train_pair && convert && evals_short && log "main: done" ;;
    long)
      if [ "${MODEL:-}" = retrieval ]; then evals_long "$RUNS/$FT_NAME/final" "$FT_NAME"
      else
        for entry in "${MODELS[@]}"; do
          [[ " $LONG_MODELS " == *" ${entry%%:*} "* ]] && evals_long "$RUNS/${entry#*:}" "${entry%%:*}"
        done
      fi
      log "long: done" ;;
    retrieval) retrieval && log "retrieval: done" ;;
    *) echo "unknown stage $1 (tests, main, long, retrieval)"; return 2 ;;
  esac
}

case "${1:-}" in
  launch)
    setsid nohup bash "$0" "$2" > "$RUNS/logs/$2.log" 2>&1 < /dev/null &
    echo $! > "$RUNS/logs/$2.pid"; log "launched $2 (pid $!)" ;;
  follow)
    deadline=$((SECONDS + ${2:-540}))
    while [ $SECONDS -lt $deadline ]; do
      running=0
      for pid in "$RUNS"/logs/*.pid; do [ -f "$pid" ] && kill -0 "$(cat "$pid")" 2>/dev/null && running=1; done
      [ $running = 0 ] && break
      sleep 10
    done
    tail -n 30 "$RUNS/logs/progress.log"
    for f in "$RUNS"/logs/train-*.log "$RUNS"/logs/convert.log "$RUNS/logs/$FT_CORPUS.log"; do [ -f "$f" ] && { echo "== $f"; tail -c 600 "$f"; echo; }; done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    collect ;;
  "") echo "usage: $0 launch STAGE | follow SECONDS | STAGE"; exit 2 ;;
  *) stage "$1" ;;
esac
