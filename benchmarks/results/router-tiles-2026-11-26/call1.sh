# Call 1 (NOTES item 104): the threshold router's tile (tokens a program, warps, stages, register cap)
# timed alone on random inputs with routing-pass2's ab.py, each variant its own process; picks compared
# with the current launch's (64 tokens, 4 warps, 3 stages, cap 168).
export OUT PYTHONUNBUFFERED=1
AB=benchmarks/results/routing-pass2-2026-11-26/ab.py
run() {  # name length extra-args... (then --set pairs)
  name=$1; shift
  PYTHONPATH=src timeout 120 python3 $AB --name $name "$@" 2>&1 | tail -1 | tee -a $OUT/call1.jsonl
}
S=triton_select
v() { echo "--set $S._THRESHOLD_BLOCK_M=$1 --set $S._THRESHOLD_NUM_WARPS=$2 --set $S._THRESHOLD_NUM_STAGES=$3 --set $S._THRESHOLD_MAX_REGISTERS=$4"; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
for len in 1m; do
  run base-$len --length $len --ref /tmp/ref-$len.pt
  run m128w8s3r128 --length $len --ref /tmp/ref-$len.pt $(v 128 8 3 128)
  run m128w8s2r128 --length $len --ref /tmp/ref-$len.pt $(v 128 8 2 128)
  run m128w8s3r168 --length $len --ref /tmp/ref-$len.pt $(v 128 8 3 168)
  run m256w16s2r128 --length $len --ref /tmp/ref-$len.pt $(v 256 16 2 128)
  run m256w16s3r128 --length $len --ref /tmp/ref-$len.pt $(v 256 16 3 128)
  run base-$len-2 --length $len --ref /tmp/ref-$len.pt
  run m128w8s3r128-2 --length $len --ref /tmp/ref-$len.pt $(v 128 8 3 128)
  run m256w16s2r128-2 --length $len --ref /tmp/ref-$len.pt $(v 256 16 2 128)
done
run base-128k --length 128k --ref /tmp/ref-128k.pt
run m128w8s3r128-128k --length 128k --ref /tmp/ref-128k.pt $(v 128 8 3 128)
run m256w16s2r128-128k --length 128k --ref /tmp/ref-128k.pt $(v 256 16 2 128)
Q="--shape small --length 12m --queries 64k --ref /tmp/ref-small.pt"
run base-small12m $Q
run m128w8s3r128-small12m $Q $(v 128 8 3 128)
run m256w16s2r128-small12m $Q $(v 256 16 2 128)
