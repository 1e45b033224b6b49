# Call 12: the GPU tests after the emulated tests' fix, then decode.py's 5-length run with torch's graphs
# and again with the driver's, in separate processes (a process once slow stays slow).
export OUT PYTHONPATH=src PYTHONUNBUFFERED=1
timeout 200 python3 -m pytest -q tests/ops/test_cuda_graph.py tests/models/test_graphed.py > $OUT/call12-tests.txt 2>&1; tail -3 $OUT/call12-tests.txt
for kind in torch driver; do
  mkdir -p $OUT/$kind; flag=; [ $kind = torch ] && flag=--torch-graphs
  timeout 200 python3 benchmarks/decode.py --device cuda --only decode --graph --index tree --decode-lengths 32768 131072 1048576 4194304 12582912 $flag --out $OUT/$kind > $OUT/call12-decode-$kind.log 2>&1
  grep -E "\| graph \|" $OUT/call12-decode-$kind.log
done
