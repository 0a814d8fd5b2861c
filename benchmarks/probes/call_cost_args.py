"""Host cost of a custom kernel call against its inputs, template constants and strided
inputs (MLX CUDA): 400 chained calls, build and encode us per call (RESULTS.md, 2026-12-01).

    python3 benchmarks/probes/call_cost_args.py
"""

import json
import time

import mlx.core as mx


def make(n_in, strided, body_kb=6):
    names = [f"in{i}" for i in range(n_in)]
    idx = (lambda n: f"{n}[{n}_strides[0] * {n}_shape[1]]") if strided else (lambda n: f"{n}[0]")
    body = (
        "out[0] = "
        + " + ".join(idx(n) for n in names)
        + ";\n"
        + ("// " + "x" * 60 + "\n") * (body_kb * 16)
    )
    return names, mx.fast.cuda_kernel(
        name=f"t{n_in}", input_names=names, output_names=["out"], source=body
    )


def run(n_in, n_t, strided):
    names, k = make(n_in, strided)
    xs = [mx.zeros((1, 8, 16, 4)) for _ in names]
    templ = [("T", mx.float32)] + [(f"C{i}", i) for i in range(n_t - 1)]

    def call(y):
        return k(
            inputs=[y] + xs[1:],
            template=templ,
            grid=(32, 1, 1),
            threadgroup=(32, 1, 1),
            output_shapes=[(1, 8, 16, 4)],
            output_dtypes=[mx.float32],
        )[0]

    y = xs[0]
    for _ in range(5):
        y = call(y)
    mx.eval(y)
    N = 400
    t0 = time.perf_counter()
    y = xs[0]
    for _ in range(N):
        y = call(y)
    t1 = time.perf_counter()
    mx.async_eval(y)
    t2 = time.perf_counter()
    mx.eval(y)

    return dict(
        inputs=n_in,
        template=n_t,
        strided=strided,
        build_us=round(1e6 * (t1 - t0) / N, 2),
        encode_us=round(1e6 * (t2 - t1) / N, 2),
    )


for _rep in range(2):
    for n_in, n_t, st in (
        (1, 2, False),
        (6, 2, False),
        (11, 2, False),
        (11, 12, False),
        (1, 12, False),
        (1, 2, True),
        (11, 2, True),
        (11, 12, True),
    ):
        print(json.dumps(run(n_in, n_t, st)), flush=True)
