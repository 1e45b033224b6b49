# Call 1: the router's extraction steps (no index tie-break, no masking of the chunk's scores) against
# d7f3519 (ab_base/src); the 1M forward and its attention phase given a selection, profiled.
export OUT PYTHONUNBUFFERED=1
AB=benchmarks/results/routing-pass2-2026-11-26/ab.py
run() {  # name src tag args...
  name=$1; src=$2; tag=$3; shift 3
  PYTHONPATH=$src timeout 120 python3 $AB --name $name --ref /tmp/ref-$tag.pt "$@" 2>&1 | tail -1 | tee -a $OUT/call1.jsonl
}
run base ab_base/src 1m --length 1m
run new src 1m --length 1m
run base ab_base/src 128k --length 128k
run new src 128k --length 128k
run base ab_base/src small --shape small --length 12m --queries 64k
run new src small --shape small --length 12m --queries 64k
run base ab_base/src nano --shape nano --length 1m --sub-block 4
run new src nano --shape nano --length 1m --sub-block 4
run new2 src 1m --length 1m
run base2 ab_base/src 1m --length 1m
export PYTHONPATH=src
timeout 120 python3 scripts/profile_attention.py --length 1m --top 12 > $OUT/call1-fwd1m.log 2>&1
timeout 120 python3 scripts/profile_attention.py --length 1m --phase attention --top 16 --gaps 6 > $OUT/call1-attn1m.log 2>&1
timeout 120 python3 scripts/profile_attention.py --length 1m --phase select --top 8 --gaps 4 > $OUT/call1-select1m.log 2>&1
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/ops/test_triton_attention.py -k "threshold or route or select" > $OUT/call1-tests.txt 2>&1
grep -h "per call\|kernel span" $OUT/call1-*.log
tail -1 $OUT/call1-tests.txt
