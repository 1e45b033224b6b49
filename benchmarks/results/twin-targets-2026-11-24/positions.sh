# Where in the 32K window the SSA model loses to its twin: held-out loss by position for the twin, the
# SSA model under block-mean and best-sub-block routing, and the SSA model's weights with every block
# selected (dense attention with its positions). One call; carry runs/twinlr/nano-dense and
# runs/twin/nano-ssa/final (with the shipped model's shards moved out of the tree for the call).
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
R=runs/targets
SSA=runs/twin/nano-ssa/final
mkdir -p $R/positions $R/logs
SITE=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
[ -f $R/corpus/heldout.bin ] || python3 -m subquad.cli corpus --source "$SITE" --out $R/corpus \
  --tokenizer-from src/subquad/assets/subquad-nano --skills-kinds facts=4,recall=1,copy=1,lookup=1 \
  --skills-doc-tokens 128,32768 --skills-prose 0.5 --skills-seed 6 --max-mb 250 --skills-tokens 80000000 \
  > $R/logs/corpus-positions.log 2>&1
ho() {  # NAME MODEL [heldout args]
  local name=$1 model=$2; shift 2
  python3 -m subquad.train.heldout --model "$model" --corpus $R/corpus --seq-len 32k --tokens 1m --device cuda \
    --by-position 1k,4k,16k "$@" --out $R/positions/$name.json > $R/logs/positions-$name.log 2>&1
}
ho twin runs/twinlr/nano-dense &
ho ssa-mean $SSA &
ho ssa-max4 $SSA --ssa summary=max,sub_block_size=4 &
ho ssa-full $SSA --full-budget &
wait
python3 - $R/positions <<'PY'
import json, pathlib, sys
rows = {p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))}
spans = next(iter(rows.values()))["by_position"]
print("| model | " + " | ".join(f"{s['from']}-{s['to']}" for s in spans) + " | all |")
for name, r in rows.items():
    print(f"| {name} | " + " | ".join(f"{s['loss']:.4f}" for s in r["by_position"]) + f" | {r['heldout_loss']:.4f} |")
PY
tar czf $OUT/positions.tgz $R/positions $R/logs/positions-*.log
