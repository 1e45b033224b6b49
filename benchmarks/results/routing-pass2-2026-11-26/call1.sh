# Call 1: the threshold router's pass 2 (float count, strict floor), its middle loop's summary tiles a
# chunk ahead (PREFETCH) and register caps, each in its own process, against 77d1df3 (ab_base/src).
export OUT PYTHONUNBUFFERED=1
D=benchmarks/results/routing-pass2-2026-11-26
run() {  # name src length args...
  name=$1; src=$2; len=$3; shift 3
  PYTHONPATH=$src timeout 120 python3 $D/ab.py --name $name --length $len --ref /tmp/ref-$len.pt "$@" 2>&1 | tail -1 | tee -a $OUT/call1.jsonl
}
P0=triton_select._THRESHOLD_PREFETCH=0
CAP=triton_select._THRESHOLD_MAX_REGISTERS
run base ab_base/src 1m
run count src 1m --set $P0
run count-cap168 src 1m --set $P0 --set $CAP=168
run prefetch src 1m
run prefetch-cap168 src 1m --set $CAP=168
run count-cap128-st2 src 1m --set $P0 --set $CAP=128 --set triton_select._THRESHOLD_NUM_STAGES=2
run base-2 ab_base/src 1m
run base ab_base/src 128k
run count-cap168 src 128k --set $P0 --set $CAP=168
run prefetch src 128k
run count src 128k --set $P0
