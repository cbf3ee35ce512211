#!/usr/bin/env bash
# The one script for a CUDA machine: build the extension, run every GPU test, time the
# kernels against stock PyTorch, print a short table last.
#
#   bash scripts/gpu_check.sh                    # build + tests + timings, within GPU_CHECK_BUDGET_S
#   bash scripts/gpu_check.sh build tests        # only these stages
#   bash scripts/gpu_check.sh build time bench   # timings and the benchmark suite (incl. the training step)
#   OUT=/some/dir bash scripts/gpu_check.sh      # results there (default benchmarks/results/gpu_check-<date>/)
#
# Stages: build (gankernels._C in place), tests (pytest -m gpu), time (every
# scripts/gpu_time_*.py except bench), bench (scripts/gpu_time_bench.py: the headline
# table and the DCGAN training step). Default: build tests time, then bench if time is left.
# GPU_CHECK_BUDGET_S (default 480) is the overall deadline: each stage gets what is left,
# capped, so the whole run fits one 10-minute call; split stages across calls for more.
# Each timing script writes DIR/<name>.md (a short table) and DIR/<name>.csv.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUTDIR=${OUT:-benchmarks/results/gpu_check-$(date +%F)}
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1

BUDGET=${GPU_CHECK_BUDGET_S:-480}
START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# cap STAGE_SECONDS: the smaller of the cap and what is left (minus a margin for the summary)
cap() { local l; l=$(( $(left) - 15 )); (( l < $1 )) && echo "$l" || echo "$1"; }

STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build tests time bench-if-time)
want() { local s; for s in "${STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

echo "== environment"; $PY -m gankernels.env 2>&1 | tee "$OUTDIR/env.txt" | head -8
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv 2>/dev/null | tee -a "$OUTDIR/env.txt"

if want build; then
  echo "== build gankernels._C (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  t0=$(date +%s)
  if timeout "$(cap 200)" $PY setup.py build_ext --inplace >"$OUTDIR/build.log" 2>&1; then
    echo "built in $(( $(date +%s) - t0 )) s"
  else
    echo "BUILD FAILED (tail of $OUTDIR/build.log):"; tail -20 "$OUTDIR/build.log"
  fi
fi

if want tests; then
  echo "== GPU tests ($(cap 240) s at most)"
  timeout "$(cap 240)" $PY -m pytest -q -m gpu tests -p no:cacheprovider -o addopts="" -rfE 2>&1 \
    | tee "$OUTDIR/gpu_tests.log" | tail -25
fi

run_timing() {  # script, cap seconds, extra args...
  local script=$1 limit; limit=$(cap "$2"); shift 2
  if (( limit < 30 )); then echo "== $script: skipped (out of time budget)"; return; fi
  echo "== $script ($limit s at most)"
  timeout "$limit" $PY "$script" --out "$OUTDIR" "$@" 2>&1 | tee "$OUTDIR/$(basename "$script" .py).log" | tail -3
}

if want time; then
  run_timing scripts/gpu_time_conv_fwd.py 150 --budget 120
  run_timing scripts/gpu_time_conv_bwd.py 150 --budget 120
  run_timing scripts/gpu_time_memops.py 90
  run_timing scripts/gpu_time_cuda.py 90
fi
if want bench || { want bench-if-time && (( $(left) > 120 )); }; then
  run_timing scripts/gpu_time_bench.py 180 --stop-s 130
fi

echo; echo "== summary ($OUTDIR, $(( $(date +%s) - START )) s)"
[ -e "$OUTDIR/gpu_tests.log" ] && grep -E "passed|failed|error" "$OUTDIR/gpu_tests.log" | tail -1
for table in "$OUTDIR"/gpu_time_*.md; do
  [ -e "$table" ] && cat "$table"
done
