# Call 2: call 1's router with a chunk's keys and first step only where a step finds something (call 1
# made them in every chunk: `small` at 12M, where most chunks find nothing, went 24.7 -> 27.1 ms), against
# 9d4ba6f (ab_base/src); GPU routing tests; the 1M forward as one call; `long` + beam at 1M / 12M.
export OUT PYTHONUNBUFFERED=1
AB=benchmarks/results/routing-pass2-2026-11-26/ab.py
run() {  # name src tag args...
  name=$1; src=$2; tag=$3; shift 3
  PYTHONPATH=$src timeout 120 python3 $AB --name $name --ref /tmp/ref-$tag.pt "$@" 2>&1 | tail -1 | tee -a $OUT/call2.jsonl
}
run base ab_base/src small --shape small --length 12m --queries 64k
run new src small --shape small --length 12m --queries 64k
run base ab_base/src 1m --length 1m
run new src 1m --length 1m
run base ab_base/src 128k --length 128k
run new src 128k --length 128k
run new2 src small --shape small --length 12m --queries 64k
run base2 ab_base/src small --shape small --length 12m --queries 64k
R=benchmarks/results/routing-steps-2026-11-26
ab() { src=$1; shift; PYTHONPATH=$src timeout 150 python3 $R/long_ab.py "$@" 2>&1 | tail -1 | tee -a $OUT/call2.jsonl; }
ab ab_base/src --length 12m
ab src --length 12m
ab src --length 1m
export PYTHONPATH=src
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/ops/test_triton_attention.py -k "threshold or route or select" > $OUT/call2-tests.txt 2>&1
tail -3 $OUT/call2-tests.txt
timeout 120 python3 scripts/profile_attention.py --length 1m --top 8 > $OUT/call2-fwd1m.log 2>&1
head -12 $OUT/call2-fwd1m.log | grep -v Warn
