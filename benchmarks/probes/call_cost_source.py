"""Host cost of a custom kernel call against the size of its source text (MLX CUDA): 400
chained calls, build and encode us per call (RESULTS.md, 2026-12-01).

    python3 benchmarks/probes/call_cost_source.py
"""

import json
import time

import mlx.core as mx


def make(n):
    body = "out[0] = inp[0] + 1.0f;\n" + ("// " + "x" * 60 + "\n") * (n // 64)
    return mx.fast.cuda_kernel(name=f"t{n}", input_names=["inp"], output_names=["out"], source=body)


def call(k, y):
    return k(
        inputs=[y],
        template=[("T", mx.float32), ("D", 128)],
        grid=(32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(1,)],
        output_dtypes=[mx.float32],
    )[0]


res = []
for _rep in range(3):
    for n in (0, 8192, 32768):
        k = make(n)
        x = mx.zeros((1,))
        y = x
        for _ in range(5):
            y = call(k, y)
        mx.eval(y)
        N = 400
        t0 = time.perf_counter()
        y = x
        for _ in range(N):
            y = call(k, y)
        t1 = time.perf_counter()
        mx.async_eval(y)
        t2 = time.perf_counter()
        mx.eval(y)
        t3 = time.perf_counter()
        res.append(
            dict(
                bytes=n,
                build_us=1e6 * (t1 - t0) / N,
                encode_us=1e6 * (t2 - t1) / N,
                total_us=1e6 * (t3 - t0) / N,
            )
        )
        print(json.dumps({k: round(v, 2) for k, v in res[-1].items()}), flush=True)
