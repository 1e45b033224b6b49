# Call 4: the merge after item 99's partial layout [B, Tc, top_k, Hq]: 16 (default), 32 and 64 rows a
# merge program; and item 99 without (d) (ab_var/src: layout [B, Tc, Hq, top_k] as before, the other
# changes kept). The attention phase at 1M.
export OUT PYTHONUNBUFFERED=1
P=scripts/profile_attention.py
run() {  # name src args...
  name=$1; src=$2; shift 2
  PYTHONPATH=$src timeout 150 python3 $P --top 8 "$@" > $OUT/call4-$name.log 2>&1
  echo "$name: $(grep -E 'per call' $OUT/call4-$name.log)"; grep -E "_routed_|_merge" $OUT/call4-$name.log
}
run attn1m-new src --length 1m --phase attention
run attn1m-var ab_var/src --length 1m --phase attention
run attn1m-new-rows32 src --length 1m --phase attention --set triton_routed._MERGE_ROWS=32
run attn1m-new-rows64 src --length 1m --phase attention --set triton_routed._MERGE_ROWS=64
run attn1m-var-2 ab_var/src --length 1m --phase attention
run attn1m-new-rows32-2 src --length 1m --phase attention --set triton_routed._MERGE_ROWS=32
