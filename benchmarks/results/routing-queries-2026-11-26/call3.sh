# Call 3: the routed pairs grouped by block with a counting sort (atomics) against routed_work's CUB radix
# sort, one 64K-token chunk of layer-8b at 1M (counting_sort.py).
export OUT PYTHONUNBUFFERED=1 PYTHONPATH=src
timeout 300 python3 benchmarks/results/routing-queries-2026-11-26/counting_sort.py 2>&1 | tee $OUT/call3-counting-sort.log
