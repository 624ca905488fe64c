#!/usr/bin/env bash
# The CUDA check, for a machine with an NVIDIA GPU (driver only; burn's cuda builds offline):
# builds kvc and kvc-bench with the cuda backend, answers a question on the default model with
# KVCompose on cuda, runs the cross-backend tests (crates/kvc-models/tests/backends.rs: kernel
# cases, tiny models and SmolLM2 vs flex) on cuda, saves a compressed cache on cuda and answers
# from it on flex, and puts cuda beside flex in the backend table (speed, cache bytes, and the
# agreement with flex: KVCompose kept sets, first logits, greedy tokens). Prints everything; the
# README's Backends section takes the table. Meant to finish well under 10 minutes.
# NOT YET RUN ON A GPU: no device was available to the sessions that wrote it.
set -euo pipefail
cd "$(dirname "$0")/.."
TEXT=assets/pride_and_prejudice_ch1-2.txt
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
time cargo build --release -p kvc-cli -p kvc-bench --features cuda
./target/release/kvc inspect --model smollm2-135m-instruct > /dev/null   # fetches the model if needed
./target/release/kvc generate --backend cuda --prompt-file $TEXT --question "Who has taken Netherfield Park?" \
  --press kvcompose --ratio 0.5 --compare --max-new-tokens 24
time cargo test --release -p kvc-models --features cuda --test backends -- --nocapture
./target/release/kvc generate --backend cuda --prompt-file $TEXT --chat --question "Who has taken Netherfield Park?" \
  --press kvcompose --ratio 0.5 --max-new-tokens 12 --save-cache /tmp/kvc-gpu-check.kvc
./target/release/kvc generate --backend flex --load-cache /tmp/kvc-gpu-check.kvc --chat --question "Who has taken Netherfield Park?" \
  --max-new-tokens 12
./target/release/kvc-bench backends --text $TEXT --tokens 1024 --backends flex,cuda
./target/release/kvc-bench backends --text $TEXT --tokens 4096 --backends flex,cuda
./target/release/kvc-bench speed --text $TEXT --tokens 1024,2048,4096,8000 --decode 32 --backends cuda
