"""Times a bundle's model through onnxruntime's Python API, the reference for bench/sdk_inference.sh.

    python3 bench/sdk_inference.py BUNDLE [THREADS] [SIZE] [BATCHES]

Mirrors sdk/examples/infer_bench.rs exactly: the same model file, session settings (THREADS
intra-op threads, default 2; one inter-op thread; sequential execution; all graph optimisations),
input pattern, warm-up (3 calls) and timing rule (at least 10 calls and 3 s; median and minimum).
Prints one
JSON line per batch size. Needs `python3 -m pip install onnxruntime==1.31.1 numpy`.
"""

import json
import sys
import time

import numpy as np
import onnxruntime as ort


def pattern(n):
    i = np.arange(n, dtype=np.uint64)
    return ((i * np.uint64(2654435761)) % np.uint64(1000)).astype(np.float32) / np.float32(1000.0)


def main():
    args = sys.argv[1:]
    if not args:
        sys.exit(__doc__)
    bundle = args[0]
    threads = int(args[1]) if len(args) > 1 else 2
    size = int(args[2]) if len(args) > 2 else 256
    batches = [int(b) for b in (args[3] if len(args) > 3 else "1,16").split(",")]

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with open(f"{bundle}/manifest.json") as f:
        manifest = json.load(f)
    sess = ort.InferenceSession(f"{bundle}/model.onnx", opts, providers=["CPUExecutionProvider"])
    inp, out = manifest["input"]["name"], manifest["output"]["name"]

    for batch in batches:
        x = pattern(batch * size * size).reshape(batch, 1, size, size)
        checksum = float(sess.run([out], {inp: x})[0].astype(np.float64).sum())
        for _ in range(3):
            sess.run([out], {inp: x})
        times = []
        start = time.perf_counter()
        while len(times) < 10 or time.perf_counter() - start < 3.0:
            t = time.perf_counter()
            sess.run([out], {inp: x})
            times.append((time.perf_counter() - t) * 1e3)
        times.sort()
        print(json.dumps({
            "runtime": "python", "what": "run", "batch": batch, "size": size, "threads": threads,
            "median_ms": round(times[len(times) // 2], 3), "min_ms": round(times[0], 3), "calls": len(times),
            "checksum": round(checksum, 6), "onnxruntime": ort.__version__,
        }), flush=True)


if __name__ == "__main__":
    main()
