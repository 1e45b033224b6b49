# Call 1: the routed kernels with gathers a step ahead (this tree, src/) against the previous code
# (ab_base/src: `git archive c7b3375 src`), alternating processes; then the routed-kernel GPU tests.
export OUT PYTHONUNBUFFERED=1
P=scripts/profile_attention.py
for rep in 1 2; do
  for side in base new; do
    src=src; [ $side = base ] && src=ab_base/src
    PYTHONPATH=$src timeout 120 python3 $P --length 1m --top 6 > $OUT/call1-fwd1m-$side-$rep.log 2>&1
    echo "fwd 1M $side $rep"; head -4 $OUT/call1-fwd1m-$side-$rep.log
  done
done
for side in base new; do
  src=src; [ $side = base ] && src=ab_base/src
  PYTHONPATH=$src timeout 120 python3 $P --length 128k --backward --top 8 > $OUT/call1-fwdbwd128k-$side.log 2>&1
  echo "fwd+bwd 128K $side"; head -5 $OUT/call1-fwdbwd128k-$side.log
done
PYTHONPATH=src timeout 120 python3 $P --length 1m --top 6 --set triton_routed._ROUTED_ROWS=128 \
  --set triton_routed._ROUTED_NUM_WARPS=8 > $OUT/call1-fwd1m-new-rows128.log 2>&1
echo "fwd 1M new, 128 rows 8 warps"; head -4 $OUT/call1-fwd1m-new-rows128.log
PYTHONPATH=src timeout 180 python3 -m pytest -q tests/ops/test_triton_routed.py > $OUT/call1-tests.txt 2>&1
tail -3 $OUT/call1-tests.txt
