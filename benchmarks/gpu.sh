#!/usr/bin/env bash
# The numerical tests and the benchmarks on a GPU, in one pass of about six
# minutes: each stage has its own time limit, so one that fails or overruns does not
# stop the others. Run from the repository root with the packages installed (or the
# source tree on PYTHONPATH); logs go to $OUT (default: gpu-logs/).
#
#     bash benchmarks/gpu.sh
set -u
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Several processes share the card in the tests: none takes most of its memory.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}

stage() {  # stage NAME SECONDS COMMAND...: run, log to $OUT/NAME.txt, go on
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  echo "== $name: exit $? after $((SECONDS - start))s"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
  "$PY" -c 'import jax, equinox, optax, flax; print("jax", jax.__version__,
    "equinox", equinox.__version__, "optax", optax.__version__, "flax",
    flax.__version__, jax.devices())'
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# The numerical tests on the GPU (the multi-device tests need eight devices: CPU
# only). pytest-benchmark, where installed, warns under xdist, which the suite's
# warnings-as-errors would turn into a failure: it is left out.
stage tests "${TESTS_S:-200}" "$PY" -m pytest -o addopts="" -p no:cacheprovider \
  -p no:benchmark -n 8 -q tests/nn/test_batch_norm.py tests/nn/test_approaches.py \
  tests/nn/test_gradients.py tests/nn/test_batch_norm_options.py tests/tools/test_fold.py \
  tests/sam/test_sam.py tests/sam/test_looksam.py tests/sam/test_micro_batches.py \
  tests/tools/test_tools.py tests/io/test_checkpoint.py tests/test_data.py \
  tests/test_package.py tests/nn/test_properties.py tests/io/test_fuzz.py

# The layer: the benchmark shapes and one that fills the card (a ResNet-50 stem
# batch); ten calls per sample so that the device time, not one call's dispatch and
# wait, is measured.
stage layer "${LAYER_S:-150}" bash -c "cd benchmarks && $PY bench_batch_norm.py \
  --rounds 30 --calls 10 --shapes 64,512 64,64,32,32 128,256,8,8 256,64,56,56"
# Where the layers spend their launches.
mkdir -p "$OUT/hlo"
stage kernels "${KERNELS_S:-60}" bash -c "cd benchmarks && \
  $PY list_kernels.py --shape 64,512 --hlo $OUT/hlo && \
  $PY list_kernels.py --shape 64,64,32,32 --hlo $OUT/hlo"
# Whole training steps at the benchmark's batch sizes, then the residual CNN at a
# batch that keeps the card busy.
stage models "${MODELS_S:-150}" bash -c "cd benchmarks && $PY bench_models.py \
  --rounds 30 --calls 5 --compiles 2"
stage models-large "${LARGE_S:-60}" bash -c "cd benchmarks && $PY bench_models.py \
  --rounds 20 --calls 5 --compiles 1 --models resnet --batch 512"
# What a mask, ghost batches and the channels-last layout cost over plain training.
stage options "${OPTIONS_S:-60}" bash -c "cd benchmarks && $PY bench_batch_norm.py \
  --options --rounds 20 --calls 10 --shapes 64,512 64,64,32,32 128,256,8,8"
# The compiled programs, as one archive.
tar czf "$OUT/hlo.tgz" -C "$OUT" hlo && rm -r "$OUT/hlo"

for name in layer models models-large options; do
  echo
  echo "## $name"
  grep -v "^(" "$OUT/$name.txt" | grep -v "^$" | tail -n 40
done
echo
echo "## tests"
grep -E "^FAILED|^ERROR|passed|failed" "$OUT/tests.txt" | tail -n 30
