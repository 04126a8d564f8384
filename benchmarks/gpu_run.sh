#!/usr/bin/env bash
# The GPU benchmark as run on a lent GPU machine that has CUDA torch but none of this package's other dependencies
# and no network: diffusers and its dependencies are installed from a folder of wheels (WHEELS, made beforehand
# with `pip download diffusers safetensors --only-binary=:all: --python-version 3.X ... -d gpu_wheels`), the package
# is put on the import path without installing it, then benchmarks/gpu_bench.py runs twice: eager, K/V once and CUDA
# graphs at batch 1 and 8, then with torch.compile at batch 1 (compiling a 1.13 B UNet takes minutes; its own limit).
#     OUT=benchmarks/results/gpu bash benchmarks/gpu_run.sh
# BENCH_ARGS="--device cpu --tiny" checks the plumbing on a CPU (with WHEELS= to skip the install).
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
WHEELS=${WHEELS-gpu_wheels}
BENCH_ARGS=${BENCH_ARGS:-}
mkdir -p "$OUT"
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
    lscpu | grep 'Model name' || true
    python -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
} > "$OUT/machine.txt" 2>&1
if [ -n "$WHEELS" ]; then
    python -m pip install -q --no-index --find-links "$WHEELS" diffusers safetensors >> "$OUT/machine.txt" 2>&1
fi
# brainrecon's subpackages live in top-level folders (pyproject.toml package-dir): link them under one import root
root=$(mktemp -d)
mkdir "$root/brainrecon"
cp -r brainrecon/. "$root/brainrecon/"
for d in train export runtime serve benchmarks; do ln -s "$PWD/$d" "$root/brainrecon/$d"; done
export PYTHONPATH="$root"
# shellcheck disable=SC2086
timeout "${EAGER_LIMIT_S:-240}" python benchmarks/gpu_bench.py $BENCH_ARGS --no-compile --batches 1,8 \
    --out "$OUT/gpu_bench_eager_graphs.json" 2>&1 | tail -40
# shellcheck disable=SC2086
timeout "${COMPILE_LIMIT_S:-240}" python benchmarks/gpu_bench.py $BENCH_ARGS --only unet --batches 1 \
    --out "$OUT/gpu_bench_compile.json" 2>&1 | tail -30
rm -rf "$root"
