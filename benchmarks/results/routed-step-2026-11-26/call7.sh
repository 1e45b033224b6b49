# Call 7: launch knobs of the fixed part and the merge (NOTES item 101), the attention phase at 1M.
export OUT PYTHONUNBUFFERED=1 PYTHONPATH=src
P=scripts/profile_attention.py
run() {  # name args...
  name=$1; shift
  timeout 150 python3 $P --top 6 "$@" > $OUT/call7-$name.log 2>&1
  echo "$name: $(grep -E 'per call' $OUT/call7-$name.log)"; grep -E "_routed_|_merge|_sparse_attention_fwd" $OUT/call7-$name.log
}
run attn1m --length 1m --phase attention
run attn1m-fixed128 --length 1m --phase attention --set triton_routed._FIXED_ROWS=128
run attn1m-fixed128-w8 --length 1m --phase attention --set triton_routed._FIXED_ROWS=128 --set triton_routed._FIXED_NUM_WARPS=8
run attn1m-merge8 --length 1m --phase attention --set triton_routed._MERGE_ROWS=8
run attn1m-2 --length 1m --phase attention
