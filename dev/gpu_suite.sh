#!/usr/bin/env bash
# One pass over everything that needs a GPU: build the extension, the GPU tests in groups (a crash stays in
# its group; each group has a time limit), then the headline benchmarks. Logs go to OUT (default gpu_logs/),
# one line per stage is printed, the benchmark tables last.
#
#   dev/gpu_suite.sh [OUT]            # GPT2CU_CUDA_ARCHS=90 for an H100/H200-only build (faster)
set -u
OUT=${1:-${OUT:-gpu_logs}}
mkdir -p "$OUT"
start=$SECONDS
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $((SECONDS - start)) s"
stage() {  # stage NAME SECONDS COMMAND...: output in $OUT/NAME.log, a one-line result here
    local name=$1 limit=$2 begin=$SECONDS
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $? in $((SECONDS - begin)) s: $(grep -E '(passed|failed|error)' "$OUT/$name.log" | tail -1)"
}
gpu_tests() { python3 -m pytest -q -m gpu -p no:cacheprovider "$@"; }
stage tests_kernels 300 gpu_tests tests/test_cuda_ops.py tests/test_attention_sm90.py tests/test_cuda_llama_ops.py
stage tests_training 600 gpu_tests tests/test_gpu_training.py tests/test_llama_cuda.py
stage tests_rest 300 gpu_tests tests/test_rl.py tests/test_gpu_sample.py tests/test_sample_plot_export.py tests/test_build.py
stage bench_train 400 python3 bench/bench_train.py --model d12,llama:d12 --batch-sizes 64 --recompute 0 --steps 15 --warmup 4
stage bench_rl 200 python3 bench/bench_rl.py
grep -h -E "^FAILED|^ERROR" "$OUT"/tests_*.log | head -20
tail -n 12 "$OUT/bench_train.log"
tail -n 6 "$OUT/bench_rl.log"
