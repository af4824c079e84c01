#!/usr/bin/env bash
# One prepared GPU session: the CUDA tests, the step benchmark and the whole-training-step
# benchmark, each under its own time limit so a failure in one still leaves the others' numbers.
#
#   OUT=/tmp/gpu bash experiments/gpu_check.sh      # on a machine with an NVIDIA GPU
#
# Runs from the repository root against the checkout (PYTHONPATH=.), with the machine's own
# torch/triton (their versions are printed first). Logs and tables land in $OUT:
#   env.txt, pytest_cuda.log, bench_step_cuda.{md,csv}, bench_train_step_cuda.{md,csv},
#   profile_cuda.txt (experiments/profile_step.py), logs.txt (the benchmarks' own output)
# Limits (seconds) can be overridden: TESTS_S, STEP_S, AB_S (off by default: the kernels at
# their pre-2026-12-04 launch shape, for an A/B), TRAIN_S, PROFILE_S; set one to 0 to skip
# that part. BENCH_ONLY passes --only to bench_step, BENCH_ARGS more arguments (--repeats 20).
set -u
OUT=${OUT:-/tmp/metalr_gpu}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name(0))"
  nproc
} 2>&1 | tee "$OUT/env.txt"

echo "== CUDA tests"
[ "${TESTS_S:-240}" = 0 ] || timeout "${TESTS_S:-240}" $PY -m pytest tests/test_cuda.py -q -p no:cacheprovider -rfEs \
  --durations=8 2>&1 | tee "$OUT/pytest_cuda.log" | tail -40

echo "== bench_step (cuda)" | tee -a "$OUT/logs.txt"
[ "${STEP_S:-200}" = 0 ] || timeout "${STEP_S:-200}" $PY experiments/bench_step.py --device cuda \
  --quiet ${BENCH_ONLY:+--only $BENCH_ONLY} ${BENCH_ARGS:-} --output "$OUT/bench_step_cuda" >>"$OUT/logs.txt" 2>&1
echo "rc=$?"; tail -34 "$OUT/logs.txt"

echo "== bench_step (cuda), the Triton kernels at the old launch shape (2048 x 4 warps)" | tee -a "$OUT/logs.txt"
[ "${AB_S:-0}" = 0 ] || METALR_TRITON_BLOCK=2048 METALR_TRITON_WARPS=4 timeout "${AB_S}" $PY \
  experiments/bench_step.py --device cuda --quiet --only fused lagged ${BENCH_ARGS:-} >>"$OUT/logs.txt" 2>&1
echo "rc=$?"

echo "== bench_train_step (cuda)" | tee -a "$OUT/logs.txt"
[ "${TRAIN_S:-120}" = 0 ] || timeout "${TRAIN_S:-120}" $PY experiments/bench_train_step.py \
  --device cuda --repeats 20 --warmup 4 --output "$OUT/bench_train_step_cuda" >>"$OUT/logs.txt" 2>&1
echo "rc=$?"; tail -9 "$OUT/logs.txt"

echo "== profile_step (cuda)"
[ "${PROFILE_S:-120}" = 0 ] || timeout "${PROFILE_S:-120}" $PY experiments/profile_step.py \
  --device cuda >"$OUT/profile_cuda.txt" 2>&1
echo "rc=$?"; tail -8 "$OUT/profile_cuda.txt"
