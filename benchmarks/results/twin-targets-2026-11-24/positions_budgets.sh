# Held-out loss by position at other budgets: the SSA model with 64 routed blocks, and the twin's weights
# under SSA (the swap) with 16 and 64. Same carry and shard move as positions.sh.
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
python3 -c "from subquad.train.trainer import convert_dense_to_ssa as c; c('runs/twinlr/nano-dense', '$R/swap')" > /dev/null
ho() {  # NAME MODEL [heldout args]
  local name=$1 model=$2; shift 2
  python3 -m subquad.train.heldout --model "$model" --corpus $R/corpus --seq-len 32k --tokens 1m --device cuda \
    --by-position 1k,4k,16k "$@" --out $R/positions/$name.json > $R/logs/positions-$name.log 2>&1
}
ho ssa-k64-max4 $SSA --ssa top_k=64,summary=max,sub_block_size=4 &
ho swap-max4 $R/swap --ssa summary=max,sub_block_size=4 &
ho swap-k64-max4 $R/swap --ssa top_k=64,summary=max,sub_block_size=4 &
wait
python3 - $R/positions <<'PY'
import json, pathlib, sys
rows = {p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))}
spans = next(iter(rows.values()))["by_position"]
print("| model | " + " | ".join(f"{s['from']}-{s['to']}" for s in spans) + " | all |")
for name, r in rows.items():
    print(f"| {name} | " + " | ".join(f"{s['loss']:.4f}" for s in r["by_position"]) + f" | {r['heldout_loss']:.4f} |")
PY
tar czf $OUT/positions-budgets.tgz $R/positions $R/logs/positions-*.log
