# Host syncs of a long prefill and its time, for a given source tree (NOTES item 72).
#   bash benchmarks/results/prefill-syncs-2026-11-25/run.sh SRC NAME [LENGTHS] [EXTRA ARGS]
# SRC: the package's source folder (`src` for this tree; for the code before item 72, on the dev machine
# `mkdir -p _old_src && git archive f19a607 src | tar -x -C _old_src` puts it at `_old_src/src`).
# Writes $OUT/phases-NAME.jsonl: per length the phases of sample 0 of `niah_single_1`, `prefill_again_s`
# (a warm prefill), and the lines of the package where one more prefill synced, with counts.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/prefill-syncs}
mkdir -p $OUT
PYTHONPATH=$1 python3 scripts/profile_needle.py --lengths ${3:-1m,2m} --new-tokens 8 --syncs 12 "${@:4}" \
  --out $OUT/phases-$2.jsonl 2>&1 | grep -v -i 'warn\|Loading'
