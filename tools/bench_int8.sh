#!/usr/bin/env bash
# One benchmark run of decode with int8 activations (`--int8-activations`) against kvc's default
# f32 activations and llama.cpp's own llama-bench, on Qwen2.5-Coder-1.5B Q4_K_M and SmolLM2-135M
# Q4_1 (the known models' files in kvc's cache folder): `kvc-bench speed --int8-activations` decodes
# the same 32 steps after the same prefill both ways (decode_tok_s, decode_tok_s_int8_activations,
# int8_tokens_as_f32), then `llama-bench -p 0 -n 32 -d N` on the same GGUF (docs/quantized-weights.md).
# Machines are noisy: compare figures of one run only, on a quiet machine.
#
#   LLAMA_BIN=.../llama.cpp/build/bin bash tools/bench_int8.sh
#
# Without LLAMA_BIN llama.cpp's rows are skipped; how to build llama-bench: tools/bench_weights.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${KVC_CACHE:-$HOME/.cache/kvc}
QWEN=$CACHE/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
SMOL=$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf
TEXT=assets/pride_and_prejudice_ch1-2.txt
date
lscpu | grep -E "Model name|^CPU\(s\)|^Model:"
echo "int8 dot-product and AMX flags: $(grep -o -w 'avx512_vnni\|avx512vbmi\|avx_vnni\|amx_int8' /proc/cpuinfo | sort -u | tr '\n' ' ')"
cargo build --release -q -p kvc-bench
B=./target/release/kvc-bench
for spec in "qwen2.5-coder-1.5b-instruct:$QWEN:1024,4096" "smollm2-135m-instruct:$SMOL:1024,4096,8000"; do
  IFS=: read -r name gguf lens <<< "$spec"
  echo "== $name: kvc (f32 activations, then --int8-activations)"
  $B speed --model "$name" --text $TEXT --tokens "$lens" --decode 32 --backends flex --int8-activations
  if [ -n "${LLAMA_BIN:-}" ]; then
    echo "== $name: llama.cpp llama-bench (same GGUF, 2 threads), decode -n 32 after depth N"
    for n in ${lens//,/ }; do
      LD_LIBRARY_PATH=$LLAMA_BIN "$LLAMA_BIN/llama-bench" -m "$gguf" -p 0 -n 32 -d "$n" -t 2 -r 2 2>/dev/null | grep -E "tg32"
    done
  fi
done
date
