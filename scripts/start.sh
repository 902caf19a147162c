#!/usr/bin/env bash
# Build mote, fetch the default models, import them into the store ($MOTE_HOME, default
# ~/.local/share/mote), verify them, then serve them on $MOTE_ADDR (default 127.0.0.1:8080):
# OpenAI endpoints (/v1/embeddings, /v1/chat/completions, ...), KServe v2 (/v2/...), /metrics.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p mote
mote=target/release/mote
scripts/fetch-models.sh
models="${MOTE_MODELS_DIR:-$HOME/.cache/mote/models}"
shared="${MOTE_SHARED_MODELS:-../shared/models}"

"$mote" import "$models/all-MiniLM-L6-v2" --name minilm
"$mote" import "$models/SmolLM2-135M-Instruct.Q4_1.gguf" --name smollm2
if [ -f "$shared/mobilenetv2.onnx" ]; then
  "$mote" import "$shared/mobilenetv2.onnx" --name mobilenetv2
fi
"$mote" verify --all
"$mote" ls
served=(minilm smollm2)
if [ -f "$shared/mobilenetv2.onnx" ]; then served+=(mobilenetv2); fi
exec "$mote" serve "${served[@]}" --addr "${MOTE_ADDR:-127.0.0.1:8080}"
