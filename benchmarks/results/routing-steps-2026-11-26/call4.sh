# Call 4: `long` with the beam index, one call (routing included), partial buffers of 8 (default), 16
# and 32 GiB at 12M and 8 / 16 at 1M; then all of tests/ops/test_triton_attention.py on the GPU.
export OUT PYTHONUNBUFFERED=1 PYTHONPATH=src
R=benchmarks/results/routing-steps-2026-11-26
ab() { timeout 120 python3 $R/long_ab.py "$@" 2>&1 | tail -1 | tee -a $OUT/call4.jsonl; }
ab --length 1m
ab --length 1m --set triton_routed._PARTIAL_BYTES=17179869184
ab --length 12m
ab --length 12m --set triton_routed._PARTIAL_BYTES=17179869184
ab --length 12m --set triton_routed._PARTIAL_BYTES=34359738368
ab --length 1m
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/ops/test_triton_attention.py > $OUT/call4-tests.txt 2>&1
tail -1 $OUT/call4-tests.txt
