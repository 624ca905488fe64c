#!/usr/bin/env bash
# Batched decoding (one run; compare figures of the same run only, on a quiet machine): kvc-bench
# batch (B sequences stepped together, each on its own copy of a 2048-token context's cache,
# uncompressed and KVCompose 0.5) against llama.cpp's own llama-batched-bench on the same GGUF
# (prompt prefilled once and shared by the B sequences in one unified KV cache: -pps -kvu), 2 threads.
#   LLAMA_BIN=/path/to/llama.cpp/build/bin bash tools/bench_batch.sh [GGUF...]
# (default: the default model's GGUF in $KVC_CACHE, fetched by `kvc inspect` first)
# KVC_FLAGS=--int8-activations: kvc's rows with int8 activations; BATCHES, STEPS, CTX as below.
# llama.cpp's tools: the sources inside the llama-cpp-python 0.3.36 sdist, built with cmake from PyPI:
#   pip download --no-deps --no-binary :all: --no-build-isolation llama-cpp-python==0.3.36
#   (needs `pip install cmake scikit-build-core`); tar xzf ...; cd vendor/llama.cpp;
#   cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build build -j 2 --target llama-batched-bench
set -euo pipefail
cd "$(dirname "$0")/.."
TEXT=assets/pride_and_prejudice_ch1-2.txt
BATCHES=${BATCHES:-1,2,4,8,16,32}
STEPS=${STEPS:-32}
CTX=${CTX:-2048}
lscpu | grep -E "Model name|^CPU\(s\)|^Flags" | sed 's/^Flags:.*\(avx512f\).*/Flags: ... avx512f .../'
cargo build --release -p kvc-bench -p kvc-cli -q
B=./target/release/kvc-bench
./target/release/kvc inspect > /dev/null
for gguf in "${@:-${KVC_CACHE:-$HOME/.cache/kvc}/SmolLM2-135M-Instruct.Q4_1.gguf}"; do
  model=$gguf
  echo "== $model: kvc, uncompressed ${KVC_FLAGS:-}"
  $B batch --model "$model" --text $TEXT --tokens "$CTX" --batches "$BATCHES" --steps "$STEPS" ${KVC_FLAGS:-}
  echo "== $model: kvc, KVCompose 0.5"
  $B batch --model "$model" --text $TEXT --tokens "$CTX" --batches "$BATCHES" --steps "$STEPS" --press kvcompose --ratio 0.5 ${KVC_FLAGS:-}
  if [ -x "${LLAMA_BIN:-}/llama-batched-bench" ]; then
    echo "== $model: llama.cpp llama-batched-bench (-pps -kvu, f16 KV cache)"
    "$LLAMA_BIN/llama-batched-bench" -m "$gguf" -c $((CTX + 32 * STEPS + 64)) -b 2048 -ub 512 -npp "$CTX" -ntg "$STEPS" -npl "$BATCHES" -pps -kvu -t 2 2>&1 | grep "^|"
  else
    echo "llama.cpp rows skipped: set LLAMA_BIN to the folder of llama-batched-bench"
  fi
done
