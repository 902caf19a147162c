#!/usr/bin/env bash
# Run mote's whole test suite on a fresh machine: installs what the tests need (skopeo from
# the distribution's packages), fetches the pinned test models, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v skopeo >/dev/null 2>&1; then
  echo "test.sh: installing skopeo (the OCI interoperability test copies models with it)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq skopeo >/dev/null
fi

scripts/fetch-models.sh

# Real Python clients (openai, tritonclient) for the server's end-to-end tests.
if [ ! -x target/pyenv/bin/python ] || ! target/pyenv/bin/python -c "import openai, tritonclient.http" 2>/dev/null; then
  echo "test.sh: installing the Python clients of the server tests into target/pyenv"
  python3 -m venv target/pyenv
  target/pyenv/bin/pip install --quiet --disable-pip-version-check -r tests/requirements-e2e.txt
fi
export MOTE_TEST_PYTHON="$PWD/target/pyenv/bin/python"

# Unit, property and end-to-end tests (the crates have no doc tests: examples live in
# tests/, so no separate rustdoc build of every crate).
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast "$@"
else
  cargo test --workspace --locked --all-targets --no-fail-fast "$@"
fi
