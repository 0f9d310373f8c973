#!/usr/bin/env bash
# GPU check (issue 16): the GPU tests, GEMM rates, the layer benchmarks and the ResNet-50-shaped
# end-to-end compress, CPU against GPU, on the device machine; every number into one JSON.
#
# Here first (the device has no network; it runs this checkout with the carried .whl/):
#   bash benchmarks/gpu_wheels.sh                                  # .whl/: onnx-graphsurgeon 0.6.1 (60 kB)
#   DRY_RUN=1 OUT=/tmp/gpu_out PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh   # ~2-3 min, CPU, small sizes
# On the device (the device tool's run, carry [".whl"], timeout_s 510):
#   bash benchmarks/gpu_check.sh
#
# Writes under $OUT (at most 8 files come back; this writes 3), each rewritten after every step, so a
# run cut short still returns what it did:
#   gpu_check.log     every step's output, with a header per step and a closing summary
#   gpu_check.json    per step: status (ok | failed | timeout | skipped), seconds, rc, reason, the
#                     step's numbers; "derived": the issue's acceptance checks (pass true/false/null)
#                     and fractions/speed-ups computed from the steps of the same run
#   logs.tar.gz       the per-step logs, the steps' JSON results, pytest's junit XML, the reports
#
# Environment: OUT (default /tmp/gpu_check_out), PYTHON (default python3), DRY_RUN (1: CPU only,
# small sizes, CUDA steps "skipped"; default: 1 unless nvidia-smi works and CuPy sees a device),
# BUDGET_S (the whole script's time, default 450 s: a step that would start with under 20 s left is
# skipped and each step's limit is cut to what is left), STEPS (comma-separated subset of the step
# names below, e.g. STEPS=tucker2_cuda,cp_cuda for a rerun), SITE (where carried wheels go, default
# /tmp/site on the device), KEEP_WORK=1 (keep the work folder, models included; default: removed).
#
# Steps, in order (most important first, so a short budget loses the least): env, install, gpu_tests,
# gemm, tucker2_cuda, cp_cuda, resnet_cuda_64, calib_cuda_ep, bench_cuda, resnet_cpu_64, tucker2_cpu,
# cp_cpu, resnet_cuda_512 (+ bench_cpu in a dry run, to exercise the bench plumbing).
#
# CuPy: the code imports `cupy`, any build (cupy-cuda12x, cupy-cuda13x, ...) that sees a CUDA device
# (onnxcomp.decompose.backend.cupy_or_none). The device image has cupy-cuda13x 14.2 (CUDA 13, driver
# 580); the `gpu` extra in pyproject.toml names cupy-cuda12x, which runs on CUDA 12 and 13 drivers.
# onnxruntime: the image's 1.30 is the CPU build. onnxruntime-gpu 1.31.1 (CUDA 13) is a 256 MB wheel
# and cannot travel (64 MiB per call): calib_cuda_ep and bench_cuda then say "skipped: no CUDA
# execution provider in this onnxruntime". Calibration in `compress` runs on the CPU provider either
# way (the Gram reduction is float64 BLAS on the host); --device cuda moves the solvers only.
set -uo pipefail   # no -e: a failing step is recorded and the next one runs

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check_out}
BUDGET_S=${BUDGET_S:-450}
STEPS=${STEPS:-}
START=$SECONDS
GC_WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
LOGS=$GC_WORK/logs
RESULTS=$GC_WORK/results
RECORDS=$GC_WORK/records
SAVED=$GC_WORK/saved   # models and images kept between steps (not packed: too large)
mkdir -p "$OUT" "$LOGS" "$RESULTS" "$RECORDS" "$SAVED"
COMBINED=$OUT/gpu_check.log
SUMMARY=$OUT/gpu_check.json
: >"$COMBINED"

if [ -z "${DRY_RUN:-}" ]; then
  DRY_RUN=1
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 &&
    "$PY" -c 'import sys, cupy; sys.exit(cupy.cuda.runtime.getDeviceCount() < 1)' >/dev/null 2>&1; then
    DRY_RUN=0
  fi
fi
if [ "$DRY_RUN" = 1 ]; then
  MODE="dry run (CPU, small sizes)"
  SITE=${SITE:-$GC_WORK/site}
  # 2 shared cores: OpenBLAS threads thrash in LAPACK calls when another process holds a core
  export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
else
  MODE="device"
  SITE=${SITE:-/tmp/site}
fi
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export PY ROOT SITE LOGS RESULTS SAVED DRY_RUN

say() { echo "$*" | tee -a "$COMBINED"; }

pack() {
  tar -czf "$OUT/logs.tar.gz.part" -C "$GC_WORK" logs results records 2>/dev/null &&
    mv "$OUT/logs.tar.gz.part" "$OUT/logs.tar.gz"
}
cleanup() { pack; [ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$GC_WORK"; }
trap cleanup EXIT

record() { # name status seconds rc reason command
  "$PY" benchmarks/gpu_check.py record --dir "$RECORDS" --name "$1" --status "$2" --seconds "$3" --rc "$4" \
    --reason="$5" --command="$6" --result "$RESULTS/$1.json" --junit "$LOGS/gpu_tests.xml" \
    --summary "$SUMMARY" --mode "$MODE" || say "gpu_check: could not record step $1"
  pack
}

wanted() { [ -z "$STEPS" ] || [[ ",$STEPS," == *",$1,"* ]]; }

skip() { # name reason
  wanted "$1" || return 0
  say "=== $1: skipped: $2"
  record "$1" skipped 0 0 "$2" ""
}

step() { # name limit_s command...
  local name=$1 limit=$2
  shift 2
  wanted "$name" || return 0
  local left=$((BUDGET_S - (SECONDS - START)))
  if ((left < 20)); then
    skip "$name" "the script's time budget (BUDGET_S=$BUDGET_S s) is spent"
    return 0
  fi
  ((limit > left)) && limit=$left
  say "=== $name (limit ${limit} s, $((SECONDS - START)) s into the run): $*"
  local t0 t1 rc status reason=""
  t0=$(date +%s.%N)
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log" | tee -a "$COMBINED"
  rc=${PIPESTATUS[0]}
  t1=$(date +%s.%N)
  case $rc in
  0) status=ok ;;
  77) status=skipped reason=$(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1 | sed 's/^skipped: //') ;;
  124 | 137) status=timeout reason="killed after ${limit} s" ;;
  *) status=failed reason=$(grep -v '^\s*$' "$LOGS/$name.log" | tail -n 1) ;;
  esac
  local seconds
  seconds=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
  say "=== $name: $status in $seconds s${reason:+ ($reason)}"
  record "$name" "$status" "$seconds" "$rc" "$reason" "$*"
}

cuda_step() { # like step, but "skipped" in a dry run
  if [ "$DRY_RUN" = 1 ]; then
    skip "$1" "dry run: no CUDA device"
  else
    step "$@"
  fi
}

# ---------------------------------------------------------------- the steps' bodies (run under timeout)

step_env() {
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S') UTC; $(uname -srm); cpus $(nproc)"
  if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not on the PATH"; fi
  "$PY" benchmarks/gpu_check.py env --json "$RESULTS/env.json"
}

step_install() {
  shopt -s nullglob
  local wheels=(.whl/*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    if "$PY" -c 'import onnx_graphsurgeon' 2>/dev/null; then
      echo "skipped: no wheels in .whl/ and onnx_graphsurgeon imports already"
      exit 77
    fi
    echo "no wheels in .whl/ and onnx_graphsurgeon is missing: run benchmarks/gpu_wheels.sh here and carry .whl"
    exit 1
  fi
  ls -l "${wheels[@]}"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "${wheels[@]}" || exit 1
  "$PY" -c 'import onnx_graphsurgeon as g; print("onnx_graphsurgeon", g.__version__, "from", g.__file__)'
}

step_gpu_tests() {
  # test_gpu.py whole, and the CuPy tests elsewhere (any test file naming cupy; -k matches module names too)
  local files
  files=$(grep -rlE 'cupy' tests --include='test_*.py' | sort)
  # shellcheck disable=SC2086
  "$PY" -m pytest -q -rs -p no:cacheprovider --junitxml "$LOGS/gpu_tests.xml" $files -k "test_gpu or cupy"
}

step_resnet() { # label device images image_size
  local dir=$SAVED/$1
  "$PY" benchmarks/compress_resnet50.py --device "$2" --images "$3" --image-size "$4" \
    --rule "--target-macs 0.5" --json "$RESULTS/$1.json" --save "$dir" || exit 1
  cp "$dir/report.json" "$LOGS/$1_report.json"
}

step_bench() { # provider image_size [extra bench options]
  local provider=$1 dir
  shift
  if [ "$provider" = cuda ]; then
    "$PY" benchmarks/gpu_check.py has-cuda-ep || exit $?
  fi
  for dir in "$SAVED/resnet_cuda_64" "$SAVED/resnet_cpu_64" ""; do
    [ -n "$dir" ] && [ -f "$dir/small.onnx" ] && break
  done
  if [ -z "$dir" ]; then
    echo "no compressed model: the resnet_cuda_64 and resnet_cpu_64 steps did not run or failed"
    exit 1
  fi
  echo "models from $dir"
  "$PY" -m onnxcomp.cli bench "$dir"/resnet50*.onnx "$dir/small.onnx" --data "$dir/held_out.npy" \
    --provider "$provider" --batch-sizes 1 32 --json "$RESULTS/bench_$provider.json" "$@"
}

export -f step_env step_install step_gpu_tests step_resnet step_bench

# ---------------------------------------------------------------- the run

say "gpu_check: mode $MODE; python $PY; root $ROOT; OUT $OUT; budget ${BUDGET_S} s; ${STEPS:+steps $STEPS; }work $GC_WORK"
if [ "$DRY_RUN" = 1 ]; then
  TUCKER=(--channels 32 --ranks 16 16 --repeats 2)
  CP=(--channels 16 --rank 16 --max-iter 30)
  GEMM=(--device cpu --n 256 --repeats 3)
  IMAGES=24 SIZE=64
else
  TUCKER=(--channels 512 --ranks 256 256)
  CP=(--channels 256 --rank 256)
  GEMM=(--device cuda cpu --n 8192 2048)
  IMAGES=64 SIZE=224
fi

step env 60 bash -c step_env
step install 60 bash -c step_install
step gpu_tests 180 bash -c step_gpu_tests
step gemm 90 "$PY" benchmarks/gpu_check.py gemm "${GEMM[@]}" --json "$RESULTS/gemm.json"
cuda_step tucker2_cuda 150 "$PY" benchmarks/tucker2_layer.py --device cuda "${TUCKER[@]}" \
  --json "$RESULTS/tucker2_cuda.json"
cuda_step cp_cuda 150 "$PY" benchmarks/cp_layer.py --device cuda "${CP[@]}" --baseline-sweeps 0 \
  --json "$RESULTS/cp_cuda.json"
cuda_step resnet_cuda_64 180 bash -c "step_resnet resnet_cuda_64 cuda $IMAGES $SIZE"
if [ "$DRY_RUN" = 1 ]; then
  # no CUDA EP here either: time the CPU EP alone, so that the code path runs
  step calib_cuda_ep 120 "$PY" benchmarks/gpu_check.py calib --images 16 --image-size "$SIZE" --cpu-only \
    --json "$RESULTS/calib_cuda_ep.json"
else
  step calib_cuda_ep 150 "$PY" benchmarks/gpu_check.py calib --images "$IMAGES" --image-size "$SIZE" \
    --json "$RESULTS/calib_cuda_ep.json"
fi
step bench_cuda 150 bash -c "step_bench cuda"
step resnet_cpu_64 180 bash -c "step_resnet resnet_cpu_64 cpu $IMAGES $SIZE"
if [ "$DRY_RUN" = 1 ]; then
  step bench_cpu 90 bash -c "step_bench cpu --repeats 5 --warmup 1"
  step tucker2_cpu 120 "$PY" benchmarks/tucker2_layer.py --device cpu "${TUCKER[@]}" \
    --json "$RESULTS/tucker2_cpu.json"
  step cp_cpu 120 "$PY" benchmarks/cp_layer.py --device cpu "${CP[@]}" --baseline-sweeps 5 \
    --json "$RESULTS/cp_cpu.json"
else
  # the CPU side of the comparison on the device's 16 cores: Tucker-2 to convergence, CP per sweep only
  step tucker2_cpu 150 "$PY" benchmarks/tucker2_layer.py --device cpu "${TUCKER[@]}" --no-frobenius \
    --repeats 3 --json "$RESULTS/tucker2_cpu.json"
  step cp_cpu 120 "$PY" benchmarks/cp_layer.py --device cpu "${CP[@]}" --max-iter 10 --baseline-sweeps 0 \
    --no-frobenius --json "$RESULTS/cp_cpu.json"
fi
cuda_step resnet_cuda_512 300 bash -c "step_resnet resnet_cuda_512 cuda 512 $SIZE"

say "=== summary ($((SECONDS - START)) s): $SUMMARY"
"$PY" - "$SUMMARY" <<'EOF' | tee -a "$COMBINED"
import json, sys
summary = json.load(open(sys.argv[1]))
for name, step in summary["steps"].items():
    print(f"  {name:16} {step['status']:8} {step['seconds']:7.1f} s  {step.get('reason', '')}")
print(json.dumps(summary["derived"], indent=1))
EOF
pack
ls -l "$OUT"
failed=$(grep -lE '"status": "(failed|timeout)"' "$RECORDS"/*.json 2>/dev/null | wc -l)
[ "$failed" -eq 0 ]
