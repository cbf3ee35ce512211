#!/usr/bin/env bash
# The one command for a CUDA machine: build gankernels._C in place, run every GPU test,
# run benchmark selections (python -m gankernels.bench --select NAME), print a summary
# last. All timing lives in gankernels.bench; this only sequences it under a budget.
#
#   bash scripts/gpu_check.sh                      # build tests targets cuda train, as far as the budget goes
#   bash scripts/gpu_check.sh build host memops    # a second call: the host cost with CUDA tensors, the memory-bound ops
#   bash scripts/gpu_check.sh build memops conv-bwd   # a second call for what the first did not fit
#   bash scripts/gpu_check.sh --dry-run            # print each stage's command and cap, run nothing
#   OUT=/some/dir bash scripts/gpu_check.sh        # results there (default benchmarks/results/gpu_check-<date>)
#   PYTHON=/path/to/python bash scripts/gpu_check.sh
#
# Stages: build, tests (pytest -m gpu), host (the eager path's host cost, stock vs
# gankernels: python -m gankernels.bench host-cost), and any selection of the benchmark: targets
# conv-fwd conv-bwd memops cuda quick train (`python -m gankernels.bench --help` says
# what each holds). GPU_CHECK_BUDGET_S (default 540) is the deadline for the whole run:
# each stage gets min(its cap, what is left - 20 s for the summary) and is skipped
# (listed, with the command that runs it) under 30 s; a selection skips torch.compile
# after 45 % of its time and starts no case after 75 %, so its results are written
# before its cap. Each selection writes OUT/<name>/results.{json,csv,md}; every stage's
# output goes to OUT/<stage>.log; OUT/stages.tsv lists what ran.
# GPU_CHECK_CAP_<STAGE>=S overrides a stage's cap (GPU_CHECK_CAP_BUILD=900 on a slow machine).
# GPU_CHECK_PACK=1 leaves only OUT/gpu_check.tar.gz (all of the above) and OUT/summary.md
# (for a machine that returns few files).
#
# Without a CUDA GPU this is the smoke path (what CI runs through tests/test_bench.py):
# the build skips the extension (GANKERNELS_BUILD_CUDA=0 unless set), the GPU tests
# skip, each selection runs on CPU at tiny shapes (--quick); it proves the driver
# starts, builds and reaches its summary, and measures nothing.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
STAGES=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) STAGES+=("$arg") ;;
  esac
done
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build tests targets cuda train)

SELECTIONS=" targets conv-fwd conv-bwd memops cuda quick train "
declare -A CAP=([build]=150 [tests]=180 [host]=45 [targets]=300 [conv-fwd]=200 [conv-bwd]=200 [memops]=120 [cuda]=120
                [quick]=150 [train]=150)
for s in "${STAGES[@]}"; do
  if [ -z "${CAP[$s]:-}" ]; then
    echo "gpu_check: unknown stage '$s'; expected build, tests, host or one of:$SELECTIONS" >&2
    exit 2
  fi
  override="GPU_CHECK_CAP_$(echo "${s//-/_}" | tr '[:lower:]' '[:upper:]')"  # e.g. GPU_CHECK_CAP_CONV_FWD=400
  [ -n "${!override:-}" ] && CAP[$s]=${!override}
done

PY=${PYTHON:-python3}
OUTDIR=${OUT:-benchmarks/results/gpu_check-$(date +%F)}
PACK_INTO=""
if [ "${GPU_CHECK_PACK:-0}" = 1 ] && (( ! DRY_RUN )); then
  PACK_INTO=$OUTDIR
  mkdir -p "$PACK_INTO"
  OUTDIR=$(mktemp -d /tmp/gpu_check.XXXXXX)
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1

BUDGET=${GPU_CHECK_BUDGET_S:-540}
START=$(date +%s)
PLANNED=0  # --dry-run: the seconds the stages planned so far would take at their caps
left() { echo $(( BUDGET - ($(date +%s) - START) - PLANNED )); }
cap() { local l; l=$(( $(left) - 20 )); (( l < $1 )) && echo "$l" || echo "$1"; }

if (( DRY_RUN )); then
  GPU=1  # plan as on the GPU machine
else
  mkdir -p "$OUTDIR"
  : > "$OUTDIR/stages.tsv"
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then GPU=1; else GPU=0; fi
fi
if (( GPU )); then
  export GANKERNELS_BUILD_CUDA=${GANKERNELS_BUILD_CUDA:-1}
  BENCH_EXTRA=()
else
  echo "gpu_check: no CUDA GPU visible to $PY: smoke path (CPU, tiny shapes; nothing here is a GPU number)"
  export GANKERNELS_BUILD_CUDA=${GANKERNELS_BUILD_CUDA:-0}
  BENCH_EXTRA=(--quick --no-plots)
fi

# In place with setup.py; if that cannot run (setuptools < 77 rejects pyproject's SPDX
# license, say) and the extension is wanted, gankernels' own JIT build of csrc/.
build_extension() {
  "$PY" setup.py build_ext --inplace && return 0
  [ "$GANKERNELS_BUILD_CUDA" = 0 ] && return 1
  echo "gpu_check: setup.py build_ext failed; building with gankernels.cuda.loader.load(build=True) instead"
  "$PY" -c "import sys; from gankernels.cuda import loader; sys.exit(loader.load(build=True))"
}
export -f build_extension
export PY

# stage NAME LIMIT CMD...: run CMD for at most LIMIT s, log to OUT/NAME.log, record the outcome.
stage() {
  local name=$1 limit=$2 t0 rc status; shift 2
  if (( limit < 30 )); then
    echo "== $name: skipped ($(left) s of the ${BUDGET} s budget left)"
    (( DRY_RUN )) || printf '%s\tskipped: out of budget\t0\t\n' "$name" >> "$OUTDIR/stages.tsv"
    return
  fi
  if (( DRY_RUN )); then echo "== $name ($limit s at most): $*"; PLANNED=$(( PLANNED + limit )); return; fi
  echo "== $name ($limit s at most): $*"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timeout after $limit s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  tail -n 4 "$OUTDIR/$name.log" | sed 's/^/   /'
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$name.log" >> "$OUTDIR/stages.tsv"
}

if (( ! DRY_RUN )); then
  echo "== environment ($OUTDIR)"
  { timeout 60 "$PY" -m gankernels.env; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu \
      --format=csv 2>/dev/null; } > "$OUTDIR/env.txt" 2>&1
  head -n 8 "$OUTDIR/env.txt" | sed 's/^/   /'
fi

for s in "${STAGES[@]}"; do
  limit=$(cap "${CAP[$s]}")
  case "$s" in
    build) stage build "$limit" bash -c build_extension ;;
    tests) stage tests "$limit" "$PY" -m pytest -q -m gpu tests -p no:cacheprovider -o addopts= -rfEs ;;
    host) stage host "$limit" "$PY" -m gankernels.bench host-cost --device "$( (( GPU )) && echo cuda || echo cpu)" \
            --rounds 7 --out "$OUTDIR/host" ;;
    *)
      stage "$s" "$limit" "$PY" -m gankernels.bench --select "$s" --out "$OUTDIR/$s" --no-progress \
        --budget-s $(( limit * 45 / 100 )) --stop-s $(( limit * 75 / 100 )) "${BENCH_EXTRA[@]}" ;;
  esac
done
(( DRY_RUN )) && exit 0

echo
"$PY" -m gankernels.bench.summary "$OUTDIR" > "$OUTDIR/summary.md" 2>&1 || { echo "(the summary failed; stages:)"; cat "$OUTDIR/stages.tsv"; }
cat "$OUTDIR/summary.md"
# Exit 1 when a stage failed or ran out of its cap (skipped ones are listed, not failures).
FAILED=$(cut -f2 "$OUTDIR/stages.tsv" | grep -cE '^(failed|timeout)')
if [ -n "$PACK_INTO" ]; then
  tar -C "$OUTDIR" -czf "$PACK_INTO/gpu_check.tar.gz" . && cp "$OUTDIR/summary.md" "$PACK_INTO/summary.md" && rm -rf "$OUTDIR"
  echo "packed into $PACK_INTO/gpu_check.tar.gz"
fi
(( FAILED == 0 ))
