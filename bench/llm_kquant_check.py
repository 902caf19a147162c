"""mote against llama.cpp on k-quant GGUFs (Q4_K_M, Q6_K) made from the SmolLM2 Q4_1 file.

llama.cpp's quantiser (llama-cpp-python in bench/.venv, see bench/setup.sh) re-quantises the
test model; rows that are not whole 256-element super-blocks fall back to Q5_0 (for Q4_K)
and Q8_0 (for Q6_K), as in published Q4_K_M files of small models. Both engines then
evaluate the reference ids (../shared/models/ref/smollm2_teacher_forced.json) and this
prints, per file, the tensor types, the teacher-forced argmax agreement of mote with
llama.cpp, and max/mean |diff| of the last-prompt-position logits; beside it, the same
figures for llama.cpp token by token against llama.cpp batched (its own spread).
mote's k-quant products use its 32-element int8 activation blocks (llama.cpp uses 256-element
Q8_K blocks), so the two are close, not bit-identical.
Usage (after `cargo build --release -p mote-engine --example llm_logits`):
  bench/.venv/bin/python bench/llm_kquant_check.py [SHARED_MODELS_DIR] [MODEL.gguf]"""
import collections
import ctypes
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import llama_cpp
from llama_cpp import Llama

here = os.path.dirname(os.path.abspath(__file__))
shared = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "../../shared/models")
src = sys.argv[2] if len(sys.argv) > 2 else os.path.expanduser(
    "~/.cache/mote/models/SmolLM2-135M-Instruct.Q4_1.gguf")
dump = os.path.join(here, "../target/release/examples/llm_logits")
tf = json.load(open(os.path.join(shared, "ref", "smollm2_teacher_forced.json")))
n_prompt = len(json.load(open(os.path.join(shared, "ref", "smollm2_tokens.json")))["prompt_ids"])
ids = tf["ids"]


def types(path):
    from gguf import GGUFReader
    c = collections.Counter(t.tensor_type.name for t in GGUFReader(path).tensors)
    return ", ".join(f"{n} {k}" for k, n in sorted(c.items()))


def llama_logits(path, **kw):
    m = Llama(path, n_ctx=512, n_threads=2, n_threads_batch=2, logits_all=True, verbose=False,
              **kw)
    m.eval(ids)
    return np.array(m.scores[: len(ids)])


def compare(a, b):
    agree = float((a.argmax(1) == b.argmax(1)).mean())
    d = np.abs(a[n_prompt - 1] - b[n_prompt - 1])
    return f"{agree:9.4f} {d.max():9.3f} {d.mean():10.4f}"


tmp = tempfile.mkdtemp()
print(f"{'file':8} {'pair':36} {'agreement':>9} {'max|diff|':>9} {'mean|diff|':>10}")
for name, ftype in [("Q4_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M),
                    ("Q6_K", llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K)]:
    out = os.path.join(tmp, f"smollm2.{name}.gguf")
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.allow_requantize = True
    p.nthread = 2
    if llama_cpp.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(p)) != 0:
        sys.exit(f"llama.cpp could not quantise {src} to {name}")
    print(f"# {name}: {types(out)}")
    batched = llama_logits(out)
    stepwise = llama_logits(out, n_batch=1, n_ubatch=1)
    npy = os.path.join(tmp, f"{name}.npy")
    subprocess.run([dump, out, npy, *map(str, ids)], check=True)
    mote = np.load(npy)
    print(f"{name:8} {'mote vs llama.cpp (batched)':36} {compare(mote, batched)}")
    print(f"{name:8} {'llama.cpp token by token vs batched':36} {compare(stepwise, batched)}")
