#!/bin/bash
# A/B of Bi-WKV CUDA kernel variants on one GPU, in one device call (issue 3).
#
#   bash benchmarks/ab_bi_wkv.sh OUT_DIR [PATCH ...]
#
# Benchmarks the kernels as they are in the tree (A), then, for each patch in turn, applies it to a
# fresh copy of A's kernels/ (`patch -p1`; make one with `git diff main BRANCH -- kernels > x.patch`),
# rebuilds the extension (its cache name hashes the sources, so every variant builds once), runs the
# CUDA tests of the op (skip them with TESTS=0) and benchmarks it with the same script. A's kernels
# are restored at the end. Results: OUT_DIR/<name>.txt / .json and OUT_DIR/tests_<name>.txt; a variant
# whose build or tests fail is reported and not benchmarked.
set -u
OUT=${1:?usage: ab_bi_wkv.sh OUT_DIR [PATCH ...]}; shift
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
SAVED=$(mktemp -d); cp -r kernels "$SAVED/"
trap 'rm -rf kernels && cp -r "$SAVED/kernels" . && rm -rf "$SAVED"' EXIT
bench() {  # name
  python -c "from rwkvsam_core.ops.cuda_ext import load_extension; print(load_extension()[1])" \
    > "$OUT/build_$1.txt" 2>&1 || { echo "$1: build failed (see build_$1.txt)"; return 1; }
  if [ "${TESTS:-1}" = 1 ]; then
    python -m pytest tests/ops/test_bi_wkv_cuda.py -q -x -k "not triton" -p no:cacheprovider > "$OUT/tests_$1.txt" 2>&1 \
      || { echo "$1: tests failed (see tests_$1.txt)"; tail -n 3 "$OUT/tests_$1.txt"; return 1; }
    tail -n 1 "$OUT/tests_$1.txt"
  fi
  python benchmarks/bench_bi_wkv_gpu.py --backends cuda --json "$OUT/$1.json" > "$OUT/$1.txt" 2>&1
  echo "== $1"; grep "^| cuda" "$OUT/$1.txt"
}
bench A
for p in "$@"; do
  name=$(basename "$p" .patch)
  rm -rf kernels && cp -r "$SAVED/kernels" .
  patch -p1 --quiet < "$p" || { echo "$name: patch does not apply"; continue; }
  bench "$name"
done
