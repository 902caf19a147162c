#!/usr/bin/env bash
# Tiny-LLM speed: prompt tok/s (128 prompt ids) and greedy generation tok/s (128 tokens) and
# peak RSS for SmolLM2-135M-Instruct Q4_1, at 1 and 2 threads, mote against llama.cpp
# (llama-cpp-python from bench/.venv, see bench/setup.sh) on the same ids in the same run.
# Each engine and thread count runs in its own process (so peak RSS is its own), in
# ${ROUNDS:-3} interleaved rounds; the table shows medians over rounds (the machine is noisy).
# Run nothing else meanwhile: the machine has 2 cores. GGUF=FILE benchmarks another file of
# the same model (e.g. a Q4_K_M made by bench/llm_kquant_check.py's recipe).
set -euo pipefail
cd "$(dirname "$0")/.."
shared="${MOTE_SHARED_MODELS:-$(cd .. && pwd)/shared/models}"
models="${MOTE_MODELS_DIR:-$HOME/.cache/mote/models}"
gguf="${GGUF:-$models/SmolLM2-135M-Instruct.Q4_1.gguf}"
out=$(mktemp -d)
cargo build --release --locked -p mote-engine --example bench_llm
for round in $(seq "${ROUNDS:-3}"); do
  for threads in 1 2; do
    target/release/examples/bench_llm "$shared" "$gguf" "$threads" | tee -a "$out/results.jsonl"
    if [ -x bench/.venv/bin/python ]; then
      bench/.venv/bin/python bench/llm_anchor.py "$shared" "$gguf" "$threads" | tee -a "$out/results.jsonl"
    fi
  done
done
[ -x bench/.venv/bin/python ] || echo "bench/.venv not found: run bench/setup.sh to compare with llama.cpp" >&2
python3 bench/llm_table.py "$out/results.jsonl"
