# Call 3: on the final code (NOTES item 104), the CUDA-graph and model-level Triton tests, the
# layer-8b sweep, then `long` with the beam index at 128K, 1M and 12M (time(12M) / time(1M)).
export OUT PYTHONUNBUFFERED=1 PYTHONPATH=src
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/ops/test_cuda_graph.py tests/models/test_sparse_triton.py \
  tests/models/test_graphed.py > $OUT/call3-model-tests.txt 2>&1
tail -1 $OUT/call3-model-tests.txt
timeout 300 python3 benchmarks/attention.py --shape layer-8b --top-k 16 --time-budget 300 \
  --tag attention-layer-8b --out $OUT > $OUT/call3-sweep.log 2>&1
timeout 120 python3 benchmarks/attention.py --shape long --index beam --lengths 128k,1m,12m --reps 3 \
  --backward-max-len 0 --flex-max-len 0 --time-budget 300 --tag attention-long-beam --out $OUT \
  > $OUT/call3-long-beam.log 2>&1
grep -h "N=" $OUT/call3-*.log
