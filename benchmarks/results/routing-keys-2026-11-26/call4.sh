# Call 4: the rows of 1M whose picks differ from 9d4ba6f (ab_base/src), with how far apart the two
# picks' scores are; the GPU tests of the kernels the router feeds, on the final code: all of
# tests/ops/test_triton_attention.py, then the CUDA-graph and model-level Triton tests.
export OUT PYTHONUNBUFFERED=1 PYTHONPATH=src
R=benchmarks/results/routing-keys-2026-11-26
PYTHONPATH=ab_base/src timeout 100 python3 $R/differing_rows.py --save /tmp/picks-base.pt
timeout 100 python3 $R/differing_rows.py --against /tmp/picks-base.pt > $OUT/call4-differing.jsonl 2>&1
head -5 $OUT/call4-differing.jsonl
timeout 280 python3 -m pytest -q -p no:cacheprovider tests/ops/test_triton_attention.py > $OUT/call4-tests.txt 2>&1
tail -3 $OUT/call4-tests.txt
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/ops/test_cuda_graph.py tests/models/test_sparse_triton.py \
  tests/models/test_graphed.py > $OUT/call4-model-tests.txt 2>&1
tail -3 $OUT/call4-model-tests.txt
