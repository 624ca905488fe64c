#!/usr/bin/env bash
# One benchmark run (machines are noisy: compare figures from the same run only, on a quiet machine).
# kvc prefill/decode speed vs transformers (torch CPU, 2 threads) at 1k-8k tokens; KVCompose
# compression time vs plain prefill, kvc and kvpress; peak RSS of plain prefill vs KVCompose at 2k
# and 4k tokens; time against context length (kvc-bench scaling: table + docs/scaling.{svg,png});
# bf16 rows (kvc --dtype bf16 vs transformers / kvpress with the model in torch.bfloat16).
# Needs: cargo, python3 with tools/requirements.txt and kvpress==0.5.5 (only for the Python rows).
# llama.cpp's own rows: LLAMA_BIN=.../llama.cpp/build/bin (llama-bench built from the
# llama-cpp-python 0.3.36 sdist's sources: tools/bench_weights.sh's header says how); without it
# they are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
TEXT=assets/pride_and_prejudice_ch1-2.txt
export OMP_WAIT_POLICY=PASSIVE
lscpu | grep -E "Model name|^CPU\(s\)"
cargo build --release -p kvc-bench -q
B=./target/release/kvc-bench
echo "== prefill/decode speed (tokens/s)"
$B speed --text $TEXT --tokens 1024,2048,4096,8000 --decode 32 --backends flex
$B speed --text $TEXT --tokens 1024,2048 --decode 32 --backends ndarray
python3 tools/bench_transformers.py --text $TEXT --tokens 1024,2048,4096,8000 --decode 32 --threads 2
python3 tools/bench_llamacpp.py --text $TEXT --tokens 1024,2048,4096,8000 --decode 32 --threads 2 \
  || echo "llama.cpp row skipped (pip install llama-cpp-python: builds llama.cpp, ~10 min)"
GGUF=${KVC_CACHE:-$HOME/.cache/kvc}/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -x "${LLAMA_BIN:-}/llama-bench" ]; then
  echo "== llama.cpp llama-bench on the same GGUF (prefill -p N; decode -n 32 after a context of depth -d N)"
  "$LLAMA_BIN/llama-bench" -m "$GGUF" -p 1024,2048,4096,8000 -n 0 -t 2 -r 1 | grep -E "^\|" || echo "llama-bench prefill rows failed"
  "$LLAMA_BIN/llama-bench" -m "$GGUF" -p 0 -n 32 -d 1024,2048,4096,8000 -t 2 -r 1 | grep -E "tg32" || echo "llama-bench decode rows failed"
else
  echo "llama-bench rows skipped: set LLAMA_BIN to the folder of llama.cpp's llama-bench"
fi
echo "== half precision (bf16 weights, activations and KV cache; transformers in bf16 too)"
$B speed --text $TEXT --tokens 1024,2048,4096 --decode 32 --backends flex --dtype bf16
python3 tools/bench_transformers.py --text $TEXT --tokens 1024,2048,4096 --decode 32 --threads 2 --dtype bf16
echo "== KVCompose compression time vs plain prefill (ratio 0.5)"
for n in 1024 2048; do $B compress --text $TEXT --tokens $n --backend flex; done
python3 tools/make_kvcompose_fixtures.py --timing-only
echo "== the same in bf16 (kvc bf16 vs kvpress with the model in torch.bfloat16)"
for n in 1024 2048; do $B compress --text $TEXT --tokens $n --backend flex --dtype bf16; done
python3 tools/make_kvcompose_fixtures.py --timing-only --timing-dtype bf16
echo "== peak RSS: plain prefill vs prefill + KVCompose (flex, separate processes)"
for n in 2048 4096; do
  $B compress --text $TEXT --tokens $n --press none --repeat 1
  $B compress --text $TEXT --tokens $n --repeat 1
done
echo "== time against context length (KVCompose 0.75)"
$B scaling --text $TEXT --out docs
