# Call 2: overlap.py with 128K chunks (the script fixed); routing queries summed into bf16 against aeacb74
# (ab_base/src), the select phase at 1M twice each; the routed kernel with 2 pipeline stages against 1,
# the attention phase at 1M twice each (--set in one tree).
export OUT PYTHONUNBUFFERED=1
D=benchmarks/results/routed-step-2026-11-26
P=scripts/profile_attention.py
PYTHONPATH=src timeout 200 python3 $D/overlap.py --length 1m --chunk 128k > $OUT/call2-chunk128k.log 2>&1
echo "chunk 128k"; tail -7 $OUT/call2-chunk128k.log
run() {  # name src args...
  name=$1; src=$2; shift 2
  PYTHONPATH=$src timeout 150 python3 $P --top 10 "$@" > $OUT/call2-$name.log 2>&1
  echo "$name: $(grep -E 'per call' $OUT/call2-$name.log)"; grep -E "_routed_partial|reduce_kernel|copy_kernel|_threshold" $OUT/call2-$name.log
}
run select1m-base ab_base/src --length 1m --phase select
run select1m-new src --length 1m --phase select
run select1m-base-2 ab_base/src --length 1m --phase select
run select1m-new-2 src --length 1m --phase select
run attn1m-stages1 src --length 1m --phase attention
run attn1m-stages2 src --length 1m --phase attention --set triton_routed._ROUTED_NUM_STAGES=2
run attn1m-stages1-2 src --length 1m --phase attention
run attn1m-stages2-2 src --length 1m --phase attention --set triton_routed._ROUTED_NUM_STAGES=2
PYTHONPATH=src timeout 120 python3 $D/rq_dtype_check.py --length 1m > $OUT/call2-rq-check.log 2>&1; cat $OUT/call2-rq-check.log | tail -3
