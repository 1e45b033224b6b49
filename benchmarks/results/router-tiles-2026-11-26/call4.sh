# Call 4 (NOTES item 105): the 1M attention phase (routed, fixed and merge kernels) with the routed forward
# kernel over 8 warps at a cap of 128 registers (two programs an SM) or uncapped (136, one), and the fixed
# part's kernel over 8 warps, against the committed launch; alternating, each its own process.
export OUT PYTHONUNBUFFERED=1 PYTHONPATH=src
P=scripts/profile_attention.py
run() {  # name --set...
  name=$1; shift
  timeout 150 python3 $P --top 6 --length 1m --phase attention "$@" > $OUT/call4-$name.log 2>&1
  echo "$name: $(grep -E 'per call' $OUT/call4-$name.log)"
  grep -E "_routed_partial|_sparse_attention_fwd|_merge" $OUT/call4-$name.log
}
W8="--set triton_routed._ROUTED_NUM_WARPS=8"
run base
run w8-cap128 $W8 --set triton_routed._ROUTED_MAX_REGISTERS=128
run base-2
run w8-cap128-2 $W8 --set triton_routed._ROUTED_MAX_REGISTERS=128
run w8-uncapped $W8 --set triton_routed._ROUTED_MAX_REGISTERS=0
run fixed-w8 --set triton_routed._FIXED_NUM_WARPS=8
