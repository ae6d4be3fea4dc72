#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see README, "Benchmarks"): the CUDA tests, then
# bench_diff, the live-recording and the training benchmarks on the GPU, then the study's
# quick size on the GPU. Everything it writes goes under $OUT (logs, JSON, markdown
# sections to paste into BENCHMARKS.md). Each step has its own time limit so that a slow
# or failing step does not take the others' time.
#
#   OUT=/tmp/gpu bash bench/gpu_check.sh          # wheels for missing packages in .whl/
#
# The lent machine (Python 3.12, torch with CUDA) lacks zarr, numcodecs, donfig,
# google-crc32c and duckdb, and for the study trl, datasets, dill and multiprocess. Fetch
# their wheels into .whl/ (ignored by git; carried to the machine) beforehand:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl zarr numcodecs donfig google-crc32c duckdb \
#     trl datasets dill multiprocess
set -u
OUT=${OUT:-/tmp/maskhub-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MASKHUB_HOME=/tmp/maskhub-gpu-home HF_HUB_OFFLINE=1
PY=${PY:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD/src
else
    export PYTHONPATH=$PWD/src
fi
# bench_diff spawns `maskhub` from the interpreter's bin folder
BIN=$($PY -c 'import sys, pathlib; print(pathlib.Path(sys.executable).parent)')
[ -x "$BIN/maskhub" ] || printf '#!/bin/sh\nexec %s -c "import sys; from maskhub.entry import run; sys.exit(run())" "$@"\n' \
    "$($PY -c 'import sys; print(sys.executable)')" >"$BIN/maskhub" && chmod +x "$BIN/maskhub"

# The lent machine sends back at most 8 files: every step logs into one file.
step() {  # step NAME SECONDS CMD...: run with a limit, log to $OUT/logs.txt, say how it went
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "==== $name: $*" >>"$OUT/logs.txt"
    timeout "$limit" "$@" >>"$OUT/logs.txt" 2>&1
    echo "== $name: exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  nproc; free -g | head -2
  $PY -c 'import torch, numpy; print(torch.__version__, numpy.__version__, torch.cuda.get_device_name(0))'
} >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"

step tests 150 $PY -m pytest -q -n 0 -p no:cacheprovider -rfEs tests/test_cuda.py \
    tests/test_kernel.py -k "cuda or Cuda"
step bench_diff 180 $PY bench/bench_diff.py --device cuda --size-gb 2 --repeats 2 \
    --out "$OUT/bench_diff_gpu.md"
step bench_record 60 $PY bench/bench_record.py --device cuda --json --out "$OUT/bench_record.md"
step bench_training 60 $PY bench/bench_training.py --device cuda --json
step bench_masked_optim 90 $PY bench/bench_masked_optim.py --device cuda --densities 0.2 \
    --out "$OUT/bench_masked_optim.md"
step study 120 "$BIN/maskhub" study --quick --out /tmp/study-gpu
cp /tmp/study-gpu/report.md "$OUT/study_report.md" 2>/dev/null
cat "$OUT/summary.txt"
