# Call 1: the threshold router's steps on integer keys with lists in memory (NOTES item 95) against 9d4ba6f
# (ab_base/src): the router alone at four shapes, with one launch group at 1M as well; GPU routing tests;
# a profile of the 1M forward as one call.
export OUT PYTHONUNBUFFERED=1
AB=benchmarks/results/routing-pass2-2026-11-26/ab.py
run() {  # name src tag args...
  name=$1; src=$2; tag=$3; shift 3
  PYTHONPATH=$src timeout 120 python3 $AB --name $name --ref /tmp/ref-$tag.pt "$@" 2>&1 | tail -1 | tee -a $OUT/call1.jsonl
}
run base ab_base/src 1m --length 1m
run new src 1m --length 1m
run new-one-launch src 1m --length 1m --set triton_select._THRESHOLD_LIST_BYTES=4294967296
run base ab_base/src 128k --length 128k
run new src 128k --length 128k
run base ab_base/src small --shape small --length 12m --queries 64k
run new src small --shape small --length 12m --queries 64k
run base ab_base/src nano --shape nano --length 1m --sub-block 4
run new src nano --shape nano --length 1m --sub-block 4
run new2 src 1m --length 1m
run base2 ab_base/src 1m --length 1m
export PYTHONPATH=src
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/ops/test_triton_attention.py -k "threshold or route or select" > $OUT/call1-tests.txt 2>&1
tail -3 $OUT/call1-tests.txt
timeout 120 python3 scripts/profile_attention.py --length 1m --top 12 > $OUT/call1-fwd1m.log 2>&1
grep -h "per call\|kernel span" $OUT/call1-fwd1m.log
head -30 $OUT/call1-fwd1m.log
