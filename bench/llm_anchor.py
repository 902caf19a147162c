"""llama.cpp (llama-cpp-python) on the LLM benchmark (same GGUF file, same prompt ids as
crates/mote-engine/examples/bench_llm.rs). Usage: llm_anchor.py SHARED MODEL.gguf THREADS.
Prints one JSON line with medians and the process's peak RSS."""
import json
import os
import sys
import time

RUNS, GENERATE = 7, 128


def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return 0


shared, path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
prompt = json.load(open(os.path.join(shared, "ref", "smollm2_tokens.json")))["prompt_ids"]
from llama_cpp import Llama  # noqa: E402

base = rss_kib("VmRSS:")
m = Llama(path, n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
m.eval(prompt)  # warm-up
prompt_tps, gen_tps = [], []
for _ in range(RUNS):
    m.reset()
    t = time.perf_counter()
    m.eval(prompt)
    prompt_tps.append(len(prompt) / (time.perf_counter() - t))
for _ in range(3):
    m.reset()
    n, t_first = 0, None
    for tok in m.generate(prompt, temp=0.0, reset=True):
        n += 1
        if n == 1:
            t_first = time.perf_counter()
        if n == GENERATE:
            break
    gen_tps.append((n - 1) / (time.perf_counter() - t_first))
med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
print(json.dumps({
    "engine": "llama.cpp", "threads": threads, "prompt_tokens": len(prompt),
    "prompt_tok_s": med(prompt_tps), "generated_tokens": GENERATE, "gen_tok_s": med(gen_tps),
    "peak_rss_mib": rss_kib("VmHWM:") / 1024, "model_rss_mib": (rss_kib("VmHWM:") - base) / 1024,
}), flush=True)
