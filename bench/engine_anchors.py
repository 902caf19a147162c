"""onnxruntime and OpenVINO on the engine benchmark cases (same files, same inputs as
crates/mote-engine/examples/bench_engine.rs). Prints one JSON line per case."""
import json
import os
import sys
import time

import numpy as np

shared = sys.argv[1]
ref = os.path.join(shared, "ref")
MIN_RUNS = int(os.environ.get("BENCH_MIN_RUNS", "20"))
BUDGET_S = float(os.environ.get("BENCH_BUDGET_S", "3"))


def minilm_case(b, s):
    names = ["input_ids", "attention_mask", "token_type_ids"]
    return {n: np.load(os.path.join(ref, f"bench_minilm_b{b}_s{s}_{n}.npy")) for n in names}


images = np.load(os.path.join(ref, "bench_mobilenet_b16.npy"))
cases = [
    ("minilm_b1_s16", "minilm-l6.onnx", minilm_case(1, 16)),
    ("minilm_b1_s128", "minilm-l6.onnx", minilm_case(1, 128)),
    ("minilm_b32_s128", "minilm-l6.onnx", minilm_case(32, 128)),
    ("mobilenet_b1", "mobilenetv2.onnx", {"input": images[:1]}),
    ("mobilenet_b16", "mobilenetv2.onnx", {"input": images}),
]
# Same filters as bench_engine: BENCH_ONLY=substring of the case, BENCH_THREADS=count.
# ("minilm_native_b1_s128" selects the anchors' "minilm_b1_s128": they run the ONNX export.)
only = os.environ.get("BENCH_ONLY", "").replace("native_", "")
cases = [c for c in cases if only in c[0]]
THREADS = (int(os.environ["BENCH_THREADS"]),) if os.environ.get("BENCH_THREADS") else (1, 2)


def measure(fn):
    # Warm up for 3 runs and at least a second, as bench_engine does.
    start, i = time.perf_counter(), 0
    while i < 3 or time.perf_counter() - start < 1.0:
        fn()
        i += 1
    times = []
    start = time.perf_counter()
    while len(times) < MIN_RUNS or time.perf_counter() - start < BUDGET_S:
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
        if len(times) >= 2000:
            break
    times.sort()
    return times[len(times) // 2], times[min(len(times) - 1, int(len(times) * 0.95))], len(times)


def emit(engine, case, threads, p50, p95, n):
    print(json.dumps({"engine": engine, "case": case, "threads": threads, "p50_ms": p50, "p95_ms": p95, "runs": n}), flush=True)


import onnxruntime as ort  # noqa: E402

for threads in THREADS:
    for case, file, feeds in cases:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(os.path.join(shared, file), so, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        feed = {n: feeds[n] if n in feeds else list(feeds.values())[0] for n in names}
        emit("onnxruntime", case, threads, *measure(lambda: sess.run(None, feed)))

import openvino as ov  # noqa: E402

core = ov.Core()
for threads in THREADS:
    for case, file, feeds in cases:
        model = core.read_model(os.path.join(shared, file))
        compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
        req = compiled.create_infer_request()
        names = [i.get_any_name() for i in compiled.inputs]
        feed = {n: feeds[n] if n in feeds else list(feeds.values())[0] for n in names}
        emit("openvino", case, threads, *measure(lambda: req.infer(feed)))
