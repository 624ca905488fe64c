#!/usr/bin/env bash
# One benchmark run of a GGUF model with its weights held as codes (kvc's default) against a dense f32
# copy (--dense-weights) and llama.cpp's own llama-bench on the same file: prefill and decode tokens/s
# (decode also with int8 activations, as llama.cpp multiplies), weight bytes held, peak RSS
# (docs/quantized-weights.md). Machines are noisy: compare figures of one
# run only, on a quiet machine.
#
#   LLAMA_BIN=.../llama.cpp/build/bin [PY=python3] [DENSE=0] bash tools/bench_weights.sh [MODEL] [TOKENS]
#
# MODEL: a .gguf (default: the known qwen2.5-coder-1.5b-instruct in kvc's cache folder, fetched by
# `kvc generate --model qwen2.5-coder-1.5b-instruct ...` on first use); TOKENS: prompt lengths
# (default 1024,4096). Without LLAMA_BIN llama.cpp's rows are skipped. DENSE=0 skips the dense-copy
# rows (8-9 GB of RAM). On the default model, when $PY (default python3) has transformers and
# kvpress (`pip install -r tools/requirements.txt kvpress==0.5.5`): transformers' rows (the same
# GGUF dequantized to f32 by transformers, then cast to bf16; 2 torch threads) and KVCompose at
# ratio 0.5, kvc against kvpress, prefill + compression at the longest TOKENS length (one run
# each). llama.cpp's own tools build from the sources inside the llama-cpp-python 0.3.36 sdist, with cmake from PyPI:
#   pip install cmake scikit-build-core
#   pip download --no-deps --no-binary :all: --no-build-isolation llama-cpp-python==0.3.36
#   tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp
#   cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
#   cmake --build build -j 2 --target llama-bench llama-batched-bench llama-server
#   export LLAMA_BIN=$PWD/build/bin
# (On a VM whose AMX tiles fault, build with -DGGML_NATIVE=OFF -DGGML_AVX512=ON and AMX off.)
# Peak RSS comes from GNU time (/usr/bin/time; Debian: apt-get install time).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-$HOME/.cache/kvc/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf}
TOKENS=${2:-1024,4096}
TEXT=assets/pride_and_prejudice_ch1-2.txt
lscpu | grep -E "Model name|^CPU\(s\)|^Model:"
cargo build --release -q -p kvc-bench -p kvc-cli
B=./target/release/kvc-bench
GGUF=$MODEL
echo "== kvc, weights as codes (default); decode_tok_s_int8_activations: the same steps with --int8-activations"
$B speed --model "$GGUF" --text $TEXT --tokens "$TOKENS" --decode 32 --backends flex --int8-activations
if [ "${DENSE:-1}" != 0 ]; then
  echo "== kvc, dense f32 copy (--dense-weights)"
  $B speed --model "$GGUF" --text $TEXT --tokens "$TOKENS" --decode 32 --backends flex --dense-weights
fi
if [ -n "${LLAMA_BIN:-}" ] && [ ! -x "$LLAMA_BIN/llama-bench" ]; then
  echo "LLAMA_BIN=$LLAMA_BIN has no llama-bench: llama.cpp's rows skipped (see this script's header)" >&2
elif [ -n "${LLAMA_BIN:-}" ]; then
  echo "== llama.cpp llama-bench (same GGUF, 2 threads): prefill -p N, decode -n 32 after depth N"
  for n in ${TOKENS//,/ }; do
    /usr/bin/time -f "llama-bench -p $n: peak RSS %M KB" "$LLAMA_BIN/llama-bench" -m "$GGUF" -p "$n" -n 0 -t 2 -r 1 2>&1 | grep -E "pp$n|peak RSS"
    "$LLAMA_BIN/llama-bench" -m "$GGUF" -p 0 -n 32 -d "$n" -t 2 -r 2 2>/dev/null | grep -E "tg32"
  done
  "$LLAMA_BIN/llama-bench" -m "$GGUF" -p 0 -n 32 -t 2 -r 3 2>/dev/null | grep -E "tg32"
fi
PY=${PY:-python3}
LONGEST=$(echo "$TOKENS" | tr ',' '\n' | sort -n | tail -1)
if [ -n "${1:-}" ]; then
  echo "transformers / kvpress rows skipped: they run on the known qwen2.5-coder-1.5b-instruct only"
elif ! OMP_WAIT_POLICY=PASSIVE "$PY" -c "import transformers, kvpress" 2>/dev/null; then
  echo "transformers / kvpress rows skipped: $PY lacks transformers or kvpress (pip install -r tools/requirements.txt kvpress==0.5.5; set PY)"
else
  export OMP_WAIT_POLICY=PASSIVE TQDM_DISABLE=1
  echo "== transformers (torch CPU, 2 threads; the GGUF dequantized to f32 by transformers), f32 then bf16"
  "$PY" tools/bench_transformers.py --model qwen15 --text $TEXT --tokens "$TOKENS" --decode 32 --threads 2
  "$PY" tools/bench_transformers.py --model qwen15 --text $TEXT --tokens "$TOKENS" --decode 32 --threads 2 --dtype bf16
  echo "== KVCompose, ratio 0.5, $LONGEST tokens: kvc (prefill, then compression) vs kvpress (prefill under the press)"
  $B compress --model "$GGUF" --text $TEXT --tokens "$LONGEST" --repeat 1
  "$PY" tools/make_kvcompose_fixtures.py --timing-only --timing-model qwen15 --timing-tokens "$LONGEST" \
    --timing-text $TEXT --timing-repeat 1
fi
