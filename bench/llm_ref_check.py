"""How far llama.cpp itself is from the #8 reference logits, per evaluation setting.

The references (../shared/models/ref/smollm2_*) were made by llama-cpp-python 0.3.36 with
its defaults (f16 KV cache, no flash attention, the prompt evaluated in one batch). This
evaluates the same ids with llama.cpp (bench/.venv, see bench/setup.sh) in several settings
and prints, for each, the teacher-forced argmax agreement and the max/mean |diff| of the
last-prompt-position logits: what the issue's bars (≥ 0.98, ≤ 0.25) measure.
Usage: bench/.venv/bin/python bench/llm_ref_check.py [SHARED_MODELS_DIR] [MODEL.gguf]"""
import json
import os
import sys

import numpy as np
from llama_cpp import Llama

shared = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "../../shared/models")
gguf = sys.argv[2] if len(sys.argv) > 2 else os.path.expanduser(
    "~/.cache/mote/models/SmolLM2-135M-Instruct.Q4_1.gguf")
tf = json.load(open(os.path.join(shared, "ref", "smollm2_teacher_forced.json")))
prompt = json.load(open(os.path.join(shared, "ref", "smollm2_tokens.json")))["prompt_ids"]
last = np.load(os.path.join(shared, "ref", "smollm2_prompt_last_logits.npy"))
ids, want = tf["ids"], np.array(tf["teacher_forced_argmax"])

settings = [
    ("defaults (as the references), 2 threads", dict(n_threads=2)),
    ("defaults, 1 thread", dict(n_threads=1)),
    ("batches of 16 tokens", dict(n_threads=2, n_batch=16, n_ubatch=16)),
    ("token by token (n_batch 1)", dict(n_threads=2, n_batch=1, n_ubatch=1)),
    ("flash attention", dict(n_threads=2, flash_attn=True)),
    ("f32 KV cache", dict(n_threads=2, type_k=0, type_v=0)),
]
print(f"{'llama.cpp setting':42} {'agreement':>9} {'max|diff|':>9} {'mean|diff|':>10}")
for name, kw in settings:
    kw.setdefault("n_batch", 512)
    kw.setdefault("flash_attn", False)
    m = Llama(gguf, n_ctx=512, n_threads_batch=kw["n_threads"], logits_all=True, verbose=False, **kw)
    m.eval(ids)
    scores = np.array(m.scores[: len(ids)])
    agree = float((scores.argmax(1) == want).mean())
    d = np.abs(scores[len(prompt) - 1] - last)
    print(f"{name:42} {agree:9.4f} {d.max():9.3f} {d.mean():10.4f}", flush=True)
