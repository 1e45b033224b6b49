# Call 5: the layer-8b sweep on the final kernels (as gpu_check.sh full's first line), for the committed
# benchmarks/results/attention-layer-8b.{json,md,png}.
export OUT PYTHONPATH=src PYTHONUNBUFFERED=1
timeout 560 python3 benchmarks/attention.py --shape layer-8b --top-k 16 --time-budget 300 \
  --tag attention-layer-8b --out $OUT > $OUT/call5-sweep.log 2>&1
tail -12 $OUT/call5-sweep.log
