# GPU call 7 (2026-11-24): the local_rope twin's swap at other budgets (held-out), and the converted
# (64-step) model's RULER at 32K, converted again from the twin's bf16 copy.
export PYTHONPATH=src PYTHONUNBUFFERED=1
R=runs/twinlr
SITE=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
python3 -m subquad.cli corpus --source "$SITE" --out $R/corpus --tokenizer-from src/subquad/assets/subquad-nano \
  --skills-kinds facts=4,recall=1,copy=1,lookup=1 --skills-doc-tokens 128,32768 --skills-prose 0.5 --skills-seed 6 \
  --max-mb 250 --skills-tokens 80000000 > $R/corpus.log 2>&1
python3 -c "import json; m = json.load(open('$R/corpus/meta.json')); print({k: m[k] for k in ('tokens', 'files') if k in m})"
sweep() {
  for spec in "top_k=16" "top_k=16,summary=max,sub_block_size=4" "top_k=64" "top_k=240"; do
    python3 - "$R" "$spec" <<'PY'
import sys
from subquad.train.trainer import convert_dense_to_ssa
runs, spec = sys.argv[1], sys.argv[2]
ssa = {k: (v if v in ("max", "mean") else int(v)) for k, v in (kv.split("=") for kv in spec.split(","))}
convert_dense_to_ssa(f"{runs}/nano-dense", f"{runs}/budget/{spec}", ssa=ssa)
PY
    python3 -m subquad.train.heldout --model "$R/budget/$spec" --corpus $R/corpus --seq-len 32k --tokens 1m \
      --device cuda --out "$R/results/heldout-$spec.json" 2>&1 | tail -1
  done
}
finetune() {
  python3 -m subquad.train.cli --corpus $R/corpus --flavor nano --seed 0 --device cuda --compile \
    --tokens-per-step 131072 --micro-batch-tokens 65536 --skills-fraction 0.5 --no-progress --answer-weight 20 \
    --convert-from $R/nano-dense --out $R/nano-converted --steps 64 --lr 3e-4 --warmup-steps 7 \
    --seq-len-schedule 0:32768 --eval-interval 0 --eval-tokens 1048576 --checkpoint-interval 1000 --log-interval 5 \
    > $R/convert.log 2>&1
  tail -4 $R/convert.log
  timeout 330 python3 -m subquad.cli eval --model $R/nano-converted/final --device cuda --no-progress \
    --ssa summary=max,sub_block_size=4 --suite ruler --lengths 32k --samples 10 --max-new-tokens 32 --batch-size 16 \
    --out $R/results/converted-ruler32 > $R/ruler32.log 2>&1
  tail -3 $R/ruler32.log
}
mkdir -p $R/results
sweep > $R/sweep.log 2>&1 &
finetune
wait
cat $R/sweep.log
tar czf $OUT/budget.tgz $R/results $R/*.log $R/corpus/meta.json
