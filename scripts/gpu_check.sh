#!/usr/bin/env bash
# One script for a CUDA machine: build the extension, run every GPU test, time the ops
# against stock PyTorch, print a short table last. Meant to finish in under 8 minutes.
#
#   bash scripts/gpu_check.sh            # results to benchmarks/results/gpu_check-<date>/
#   OUT=/some/dir bash scripts/gpu_check.sh
#
# Each timing script scripts/gpu_time_*.py takes --out DIR and writes DIR/<name>.md
# (a short table) and DIR/<name>.csv; this script prints the tables last.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUTDIR=${OUT:-benchmarks/results/gpu_check-$(date +%F)}
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PYTHONUNBUFFERED=1

echo "== environment"; $PY -m gankernels.env 2>&1 | tee "$OUTDIR/env.txt"

echo "== build gankernels._C"
start=$(date +%s)
if timeout 240 $PY setup.py build_ext --inplace >"$OUTDIR/build.log" 2>&1; then
  echo "built in $(( $(date +%s) - start )) s"
else
  echo "BUILD FAILED (tail of $OUTDIR/build.log):"; tail -20 "$OUTDIR/build.log"
fi

echo "== GPU tests"
timeout 240 $PY -m pytest -q -m gpu tests -x -p no:cacheprovider 2>&1 | tee "$OUTDIR/gpu_tests.log" | tail -15

for script in scripts/gpu_time_*.py; do
  [ -e "$script" ] || continue
  echo "== $script"
  timeout 180 $PY "$script" --out "$OUTDIR" 2>&1 | tee "$OUTDIR/$(basename "$script" .py).log" | tail -3
done

echo; echo "== summary ($OUTDIR)"
grep -E "passed|failed|error" "$OUTDIR/gpu_tests.log" | tail -1
for table in "$OUTDIR"/gpu_time_*.md; do
  [ -e "$table" ] && cat "$table"
done
