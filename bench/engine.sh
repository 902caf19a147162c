#!/usr/bin/env bash
# Engine latency: MiniLM b1 s16, b1 s128, b32 s128 (ONNX through tract, and the native
# encoder from safetensors as minilm_native_*, the int8 artifact `mote quantize` makes from it
# as minilm_int8_*) and MobileNetV2 b1, b16 at 1 and 2 threads,
# for mote and (when bench/.venv exists, see bench/setup.sh) onnxruntime and OpenVINO on the
# same inputs in the same run. Prints p50/p95 per engine (medians over interleaved rounds)
# and the ratios to mote.
# Run nothing else meanwhile: the machine has 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
shared="${MOTE_SHARED_MODELS:-$(cd .. && pwd)/shared/models}"
out=$(mktemp -d)
cargo build --release --locked -p mote-engine --example bench_engine
models="${MOTE_MODELS_DIR:-$HOME/.cache/mote/models}"
# The machine drifts within minutes: engines run in alternating rounds (BENCH_ROUNDS,
# default 3; each case 10+ runs and 1+ s per round) and the table takes medians over rounds.
rounds="${BENCH_ROUNDS:-3}"
export BENCH_MIN_RUNS="${BENCH_MIN_RUNS:-10}" BENCH_BUDGET_S="${BENCH_BUDGET_S:-1}"
[ -x bench/.venv/bin/python ] ||
  echo "bench/.venv not found: run bench/setup.sh to compare with onnxruntime and OpenVINO" >&2
for round in $(seq "$rounds"); do
  echo "round $round of $rounds" >&2
  target/release/examples/bench_engine "$shared" "$models/all-MiniLM-L6-v2" | tee -a "$out/results.jsonl"
  if [ -x bench/.venv/bin/python ]; then
    bench/.venv/bin/python bench/engine_anchors.py "$shared" | tee -a "$out/results.jsonl"
  fi
done
python3 bench/table.py "$out/results.jsonl"
