# Re-run chosen samples of the shipped model's committed needle cells with this tree (the rotary tables'
# float64 angles), keeping every other committed row, and print each re-run sample before and after.
#   bash benchmarks/results/rotary-precision-2026-11-25/rerun.sh TASK LEN SECONDS INDEX...
# Lands in $OUT/TASK-LEN/ (results.jsonl: the committed rows less INDEX..., then the re-run ones).
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
OUT=${OUT:-runs/rotary}
task=$1 len=$2 seconds=$3
shift 3
cell=$OUT/$task-$len
mkdir -p $cell
for f in benchmarks/results/long-needles-2026-11-25/$task-$len/results.jsonl \
    benchmarks/results/paired-finetune-2026-11-25/shipped-long/long-shipped-$task-$len/results.jsonl; do
  [ -f $f ] && { committed=$f; break; }
done
python3 - $committed $cell/results.jsonl "$@" <<'PY'
import json, sys
rerun = {int(i) for i in sys.argv[3:]}
rows = [json.loads(line) for line in open(sys.argv[1])]
with open(sys.argv[2], "w") as sink:
    sink.writelines(json.dumps(r) + "\n" for r in rows if r["index"] not in rerun)
PY
t0=$(date +%s)
timeout $seconds python3 -m subquad.cli eval --model src/subquad/assets/subquad-nano --device ${DEVICE:-cuda} --suite ruler \
  --tasks $task --lengths $len --samples 50 --max-new-tokens 32 --batch-size 1 --no-progress --out $cell \
  > $cell/eval.log 2>&1
echo "$task $len: exit $?, $(( $(date +%s) - t0 )) s"
python3 - $committed $cell/results.jsonl "$@" <<'PY'
import json, sys
rerun = [int(i) for i in sys.argv[3:]]
before = {r["index"]: r for r in map(json.loads, open(sys.argv[1]))}
after = {r["index"]: r for r in map(json.loads, open(sys.argv[2]))}
for i in rerun:
    b, a = before[i], after.get(i)
    now = "not run" if a is None else f"{a['score']:.0f} {a['prediction'][:28]!r} {a['seconds']:.1f} s"
    print(f"  {i:>2} answer {b['answers'][0]}: before {b['score']:.0f} {b['prediction'][:28]!r}; after {now}")
PY
