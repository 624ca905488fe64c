#!/usr/bin/env bash
# One benchmark run of the quantized KV cache (docs/kv-quantization.md): kvc's decode tokens/s and KV
# bytes after a context of each length with the cache in float, bf16, f16, int8 and int4 (`kvc-bench
# speed --kv-dtype`; bf16 / f16: 16-bit copies of the f32 cache), and llama.cpp's own llama-bench on the same GGUF with its cache in f16, q8_0 and q4_0
# (`-ctk/-ctv`, flash attention on: llama.cpp quantizes the V cache only with it). Machines are noisy:
# compare figures of one run only, on a quiet machine.
#
#   LLAMA_BIN=.../llama.cpp/build/bin bash tools/bench_kv.sh [MODEL] [TOKENS] [DECODE]
#
# MODEL: a .gguf (default: SmolLM2-135M-Instruct in kvc's cache folder); TOKENS: context lengths
# (default 4096,8000); DECODE: tokens decoded after each (default 128). Without LLAMA_BIN llama.cpp's
# rows are skipped; tools/bench_weights.sh's header says how to build llama-bench.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-$HOME/.cache/kvc/SmolLM2-135M-Instruct.Q4_1.gguf}
TOKENS=${2:-4096,8000}
DECODE=${3:-128}
TEXT=assets/pride_and_prejudice_ch1-2.txt
lscpu | grep -E "Model name|^CPU\(s\)|^Model:"
cargo build --release -q -p kvc-bench
for kv in float bf16 f16 int8 int4; do
  echo "== kvc, KV cache $kv"
  ./target/release/kvc-bench speed --model "$MODEL" --text $TEXT --tokens "$TOKENS" --decode "$DECODE" --backends flex --kv-dtype $kv
done
if [ -n "${LLAMA_BIN:-}" ] && [ ! -x "$LLAMA_BIN/llama-bench" ]; then
  echo "LLAMA_BIN=$LLAMA_BIN has no llama-bench: llama.cpp's rows skipped" >&2
elif [ -n "${LLAMA_BIN:-}" ]; then
  for t in f16 q8_0 q4_0; do
    echo "== llama.cpp llama-bench, KV cache $t (-ctk $t -ctv $t -fa 1), decode -n $DECODE after depth N"
    "$LLAMA_BIN/llama-bench" -m "$MODEL" -p 0 -n "$DECODE" -d "$TOKENS" -ctk $t -ctv $t -fa 1 -t 2 -r 1 2>/dev/null | grep -E "tg$DECODE"
  done
fi
