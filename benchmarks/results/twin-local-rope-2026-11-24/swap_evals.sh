# GPU call 4 (2026-11-24): the swapped local_rope twin's RULER at 16K/32K and needles at 128K/1M.
export PYTHONPATH=src
R=runs/twinlr
python -c "from subquad.train.trainer import convert_dense_to_ssa as c; c('$R/nano-dense', '$R/swap')" 2>&1 | tail -1
ev() { timeout 520 python -m subquad.cli eval --model $R/swap --device cuda --no-progress --ssa summary=max,sub_block_size=4 --max-new-tokens 32 "$@"; }
ev --suite ruler --lengths 16k --samples 10 --batch-size 16 --out $R/results/swap/ruler > $R/ruler16.log 2>&1 &
ev --suite ruler --lengths 32k --samples 10 --batch-size 16 --out $R/results/swap/ruler32 > $R/ruler32.log 2>&1 &
ev --suite ruler --tasks niah_single_1,niah_single_2 --lengths 128k --samples 10 --out $R/results/swap/niah-long > $R/n128.log 2>&1 &
ev --suite ruler --tasks niah_single_1,niah_single_2 --lengths 1m --samples 3 --out $R/results/swap/niah-1m > $R/n1m.log 2>&1 &
wait
tail -n 3 $R/*.log
tar czf $OUT/swap-results.tgz $R/results $R/*.log
