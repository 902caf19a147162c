#!/usr/bin/env bash
# Server load: embeddings throughput of `mote serve` at saturation (64 clients, one text per
# request) against the engine's offline throughput on the same 512 texts, and p99 latency
# under Poisson arrivals at 50% of that rate against the single-request latency and against
# what queueing alone allows at that rate (an ideal FIFO batching server fed the measured
# request costs) in
# crates/mote-serve/examples/serve_load.rs. MiniLM (all-MiniLM-L6-v2, the default
# embedding model), 2 engine threads, ${SECONDS_PER_RUN:-10} s per measurement.
# Run nothing else meanwhile: the machine has 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
models="${MOTE_MODELS_DIR:-$HOME/.cache/mote/models}"
cargo build --release --locked -p mote
cargo build --release --locked -p mote-serve --example serve_load
store=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; rm -rf "$store"' EXIT
target/release/mote --store "$store" import "$models/all-MiniLM-L6-v2" --name bench >/dev/null
port=$((20000 + RANDOM % 20000))
target/release/mote --store "$store" serve bench --addr "127.0.0.1:$port" --threads 2 \
  "$@" 2>"$store/serve.log" &
server=$!
for _ in $(seq 300); do
  grep -q "listening on" "$store/serve.log" 2>/dev/null && break
  sleep 0.1
done
target/release/examples/serve_load "$store" bench "http://127.0.0.1:$port" "${SECONDS_PER_RUN:-10}"
