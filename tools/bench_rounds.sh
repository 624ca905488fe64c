#!/usr/bin/env bash
# Decode speed on a noisy machine: interleaved rounds, each round every given kvc-bench build and
# then llama.cpp's llama-bench back to back, on Qwen2.5-Coder-1.5B Q4_K_M (the known model's file in
# kvc's cache folder); compare medians over the rounds (docs/quantized-weights.md, "On AMD Zen 3").
# Each kvc line: kvc-bench speed's decode tokens/s with f32 and with --int8-activations.
#
#   LLAMA_BIN=.../llama.cpp/build/bin TOKENS=1024 DECODE=64 ROUNDS=4 \
#     bash tools/bench_rounds.sh /path/to/old/kvc-bench ./target/release/kvc-bench
#
# Without LLAMA_BIN llama.cpp's lines are skipped; how to build llama-bench: tools/bench_weights.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bash tools/bench_rounds.sh KVC_BENCH [KVC_BENCH ...]" >&2; exit 2; }
CACHE=${KVC_CACHE:-$HOME/.cache/kvc}
GGUF=$CACHE/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
TOKENS=${TOKENS:-1024} DECODE=${DECODE:-64} ROUNDS=${ROUNDS:-4}
date
lscpu | grep -E "Model name|^CPU\(s\)|^Model:"
for round in $(seq "$ROUNDS"); do
  for b in "$@"; do
    line=$("$b" speed --model qwen2.5-coder-1.5b-instruct --text assets/pride_and_prejudice_ch1-2.txt --tokens "$TOKENS" --decode "$DECODE" --backends flex --int8-activations 2>/dev/null \
      | grep -o '"decode_tok_s":[0-9.]*\|"decode_tok_s_int8_activations":[0-9.]*' | tr '\n' ' ')
    echo "round $round $b $line"
  done
  if [ -n "${LLAMA_BIN:-}" ]; then
    echo "round $round llama-bench $(LD_LIBRARY_PATH=$LLAMA_BIN "$LLAMA_BIN/llama-bench" -m "$GGUF" -p 0 -n "$DECODE" -d "$TOKENS" -t 2 -r 1 2>/dev/null | grep -E "tg$DECODE")"
  fi
done
date
