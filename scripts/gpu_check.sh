#!/usr/bin/env bash
# GPU check: the kernel tests on the GPU, then the attention benchmark; a short table last.
# Usage (device machine, repo root):  bash scripts/gpu_check.sh [quick|full|long|train-free args...]
#   quick: tests + layer-8b at 16k,128k,1m; full: layer-8b sweep + budgets; long: long shape,
#   routing (flat vs tree) and decode; paths: forward/backward-path and routing-stage timings;
#   decode-attention: one decode layer, SSA vs dense flash-decoding, eager and CUDA graph;
#   decode-graph: the small model's decode step eager and through GraphedDecoder (CUDA graphs);
#   backward: tests, routed vs query-major backward (agreement, time, knob sweep) and fwd+bwd 16K-128K
#   profile: GPU time per kernel of one attention call, fwd+bwd at 128K and forward at 1M
#   max-routing: routing tests, then the Triton routers with summary="max" (best 4-token sub-block)
#   against the PyTorch router and against summary="mean", nano's routing shape at 1M
#   beam: routing tests, then `long` with index="beam" at 128k-12m (and flat at 1m, 4m beside it) and
#   the routing comparison (flat, tree, beam) at 64k-1m
#   needle-ranks: the shipped model's needle ranks per layer (RULER niah_single_1/2, $SAMPLES prompts
#   at $LENGTHS, default 5 at 1m) routed by mean and by max, and under other rules (routing_rules.py)
# Results land in $OUT (or ./gpu_out) and benchmarks/results/ of the copy.
set -uo pipefail
MODE=${1:-quick}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"

if [ "$MODE" = max-routing ]; then
  python3 -m pytest -q tests/ops/test_triton_attention.py tests/ops/test_max_summary.py > "$OUT/tests.txt" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.txt"
fi
if [ "$MODE" = beam ]; then
  python3 -m pytest -q tests/ops/test_triton_attention.py tests/ops/test_ssa_reference.py tests/models/test_decode.py \
    tests/test_hf.py -k "beam or routing" > "$OUT/tests.txt" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.txt"
fi
if [ "$MODE" = quick ] || [ "$MODE" = full ] || [ "$MODE" = backward ]; then
  python3 -m pytest -q tests/ops tests/models/test_decode.py > "$OUT/tests.txt" 2>&1; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.txt"
fi

bench() { python3 benchmarks/attention.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/bench.log"; }
case "$MODE" in
  quick|bench-only)
    bench --shape layer-8b --lengths 16k,128k,1m --time-budget 300 --tag attention-layer-8b-quick ;;
  paths)
    python3 scripts/compare_attention_paths.py --length 1m --backward 128k 2>&1 | tee -a "$OUT/bench.log"
    python3 scripts/profile_select.py --length 1m --tune 2>&1 | tee -a "$OUT/bench.log" ;;
  backward)
    python3 scripts/compare_attention_paths.py --length '' --backward 16k,128k,1m --tune 2>&1 | tee -a "$OUT/bench.log"
    bench --shape layer-8b --lengths 16k,64k,128k --time-budget 200 --flex-max-len 0 --tag attention-layer-8b-fwd-bwd ;;
  profile)
    for run in "--length 128k --backward" "--length 1m"; do
      python3 scripts/profile_attention.py $run
    done 2>&1 | grep -v -i warn | tee -a "$OUT/bench.log" ;;
  decode-graph)
    python3 benchmarks/decode.py --device cuda --only decode --graph \
      --decode-lengths 131072 1048576 4194304 --out "$OUT" 2>&1 | tail -30 | tee -a "$OUT/bench.log" ;;
  decode-attention)
    python3 benchmarks/decode.py --device cuda --only attention \
      --decode-lengths 131072 1048576 4194304 12582912 --out "$OUT" 2>&1 | tail -40 | tee -a "$OUT/bench.log" ;;
  full)
    bench --shape layer-8b --top-k 16 --time-budget 300 --tag attention-layer-8b
    bench --shape layer-8b --lengths 64k,128k --top-k 64,240 --time-budget 120 --tag attention-layer-8b-budgets ;;
  long)
    bench --shape long --lengths 128k,1m,4m,12m --reps 2 --backward-max-len 0 --flex-max-len 0 \
      --time-budget 330 --tag attention-long ;;
  beam)
    bench --shape long --index beam --lengths 128k,1m,4m,12m --reps 2 --backward-max-len 0 --flex-max-len 0 \
      --time-budget 300 --tag attention-long-beam
    bench --shape long --lengths 1m,4m --reps 2 --dense-max-len 0 --backward-max-len 0 --flex-max-len 0 \
      --time-budget 100 --tag attention-long-flat
    python3 benchmarks/attention.py --routing --lengths 64k,256k,1m --reps 2 --out "$OUT" --tag routing-layer-8b \
      2>&1 | tee -a "$OUT/bench.log" ;;
  routing)
    python3 benchmarks/attention.py --routing --lengths 64k,256k,1m --out "$OUT" --tag routing-layer-8b 2>&1 \
      | tee -a "$OUT/bench.log" ;;
  max-routing)
    for sub in 4 ''; do
      python3 scripts/profile_select.py --shape nano --length 1m --queries 32k --torch ${sub:+--sub-block $sub}
      python3 scripts/profile_select.py --shape nano --length 1m ${sub:+--sub-block $sub}
    done 2>&1 | tee -a "$OUT/bench.log" ;;
  needle-ranks)
    for ssa in summary=mean summary=max,sub_block_size=4; do
      for task in niah_single_1 niah_single_2; do
        tag=$([ $ssa = summary=mean ] && echo mean || echo max4)-$task
        python3 scripts/needle_routing.py --task $task --lengths "${LENGTHS:-1m}" --samples "${SAMPLES:-5}" \
          --device cuda --suffix " listed as" --ssa $ssa --dump "$OUT/dumps/$tag" --out "$OUT/ranks-$tag.json"
        python3 scripts/routing_rules.py "$OUT/dumps/$tag"/*.pt --out "$OUT/rules-$tag.json"
      done
    done 2>&1 | grep -v Loading | tee -a "$OUT/bench.log"
    rm -rf "$OUT/dumps" ;;  # 32 MB a 1M prompt: the rules' ranks come back instead
  models)
    python3 scripts/profile_select.py --length 1m 2>&1 | tee -a "$OUT/bench.log"
    python3 benchmarks/decode.py --device cuda --only decode --out "$OUT" 2>&1 | tail -20 | tee -a "$OUT/bench.log"
    bench --shape layer-8b --lengths 64k,128k --top-k 64,240 --time-budget 150 --tag attention-layer-8b-budgets ;;
  prefill)
    timeout 330 python3 benchmarks/decode.py --device cuda --only prefill --index flat \
      --prefill-lengths 131072 1048576 --out "$OUT" 2>&1 | tail -12 | tee -a "$OUT/bench.log"
    bench --shape layer-8b --lengths 16k,64k --top-k 64,240 --time-budget 150 --tag attention-layer-8b-budgets ;;
  prefill-12m)
    bench --shape layer-8b --lengths 16k,64k --top-k 64,240 --flex-max-len 0 --backward-max-len 0 \
      --time-budget 100 --tag attention-layer-8b-budgets
    timeout 420 python3 benchmarks/decode.py --device cuda --only prefill --index flat --skip-dense \
      --prefill-lengths 12582912 --out "$OUT" 2>&1 | tail -12 | tee -a "$OUT/bench.log" ;;
  *)
    bench "$@" ;;
esac
echo "==== summary"
for f in "$OUT"/*.md; do [ -f "$f" ] && cut -d'|' -f1-10 "$f"; done
