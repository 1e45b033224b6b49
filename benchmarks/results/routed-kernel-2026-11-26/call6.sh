# Call 6: the GPU tests of the routed and query-major kernels on the committed code (2e18706), with
# room to finish (call 4's stopped at its 280 s limit).
export OUT PYTHONPATH=src PYTHONUNBUFFERED=1
timeout 540 python3 -m pytest -q -p no:cacheprovider tests/ops/test_triton_routed.py tests/ops/test_triton_attention.py \
  > $OUT/call6-tests.txt 2>&1
tail -3 $OUT/call6-tests.txt
