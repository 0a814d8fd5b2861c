"""What one `mx.fast.cuda_kernel` / `metal_kernel` call costs the host, and what makes it
grow: a trivial kernel with more source text, more template constants, more inputs, more
strided inputs, more outputs; then mlx_tq's own calls. Per call, microseconds: *build* (the
Python call that adds it to the graph) and *encode* (`mx.eval` of many such calls, minus
nothing: the GPU work is a few threads).

    python3 benchmarks/call_cost.py [--calls 2000]
"""

import argparse
import json
import time

import mlx.core as mx

from mlx_tq import kernels


def make(source, inputs, outputs=("out",), header=""):
    build = mx.fast.metal_kernel if kernels.backend() == "metal" else mx.fast.cuda_kernel
    return build(
        name="cost", input_names=list(inputs), output_names=list(outputs), source=source,
        header=header, ensure_row_contiguous=False,
    )  # fmt: skip


def timed(call, n):
    """(build us, encode+run us) per call."""
    mx.eval(call())
    t0 = time.perf_counter()
    outs = [call() for _ in range(n)]
    t1 = time.perf_counter()
    mx.eval(outs)
    mx.synchronize()
    t2 = time.perf_counter()
    return round((t1 - t0) / n * 1e6, 2), round((t2 - t1) / n * 1e6, 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    n = parser.parse_args().calls
    if kernels.backend() is None:
        raise SystemExit("no GPU that runs custom kernels")
    x = mx.zeros((4,))
    mx.eval(x)
    base = dict(grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(4,)])
    base["output_dtypes"] = [mx.float32]
    one = "out[0] = x0[0];"
    names = [f"x{i}" for i in range(11)]
    strided = one + "".join(f"(void)x{i}_strides;" for i in range(11))
    consts = {"template": [(f"C{i}", i) for i in range(12)]}
    pad = "// " + "x" * 8000 + "\n"
    cases = {
        "bare": (make(one, ["x0"]), [x], {}),
        "+8 KB header": (make(one, ["x0"], header=pad), [x], {}),
        "+8 KB source": (make(pad + one, ["x0"]), [x], {}),
        "+12 template ints": (make(one, ["x0"]), [x], consts),
        "+10 inputs": (make(one, names), [x] * 11, {}),
        "+10 strided inputs": (make(strided, names), [x] * 11, {}),
        "+6 bool template constants": (
            make(one, ["x0"]),
            [x],
            {"template": [(f"B{i}", i % 2 == 0) for i in range(6)]},
        ),
        "+1 dtype template constant": (make(one, ["x0"]), [x], {"template": [("T", mx.float16)]}),
        "+3 outputs": (
            make(one, ["x0"], ("out", "o1", "o2", "o3")),
            [x],
            {"output_shapes": [(4,)] * 4, "output_dtypes": [mx.float32] * 4},
        ),
    }
    rows = {}
    for name, (kernel, inputs, extra) in cases.items():
        args = {**base, **extra}
        rows[name] = timed(lambda k=kernel, i=inputs, a=args: k(inputs=i, **a), n)
        print(json.dumps({name: rows[name]}), flush=True)
    rows["mx.fast sdpa (1 key)"] = timed(
        lambda: mx.fast.scaled_dot_product_attention(
            mx.zeros((1, 4, 1, 64)), mx.zeros((1, 1, 1, 64)), mx.zeros((1, 1, 1, 64)), scale=1.0
        ),
        n,
    )
    buf, start = mx.zeros((8, 4)), mx.array([3])
    mx.eval(buf, start)
    rows["slice_update"] = timed(lambda: mx.slice_update(buf, x[None], start, (0,)), n)
    rows.update(mlx_tq_calls(n))
    print(json.dumps(rows, indent=1))


def mlx_tq_calls(n):
    """A decode step's own calls (8 KV heads, D 128, a 4-row window): each Python function,
    then its kernel call alone with the arguments prebuilt."""
    from mlx_tq import TurboQuantKVCache, patch, quant
    from mlx_tq.attention import _fused_attention

    patch()  # the cache hands packed keys to a patched mlx-lm only
    x = mx.random.normal((1, 8, 1, 128)).astype(mx.float16)
    stats = mx.random.normal((8, 128))
    window = tuple(mx.zeros((1, 8, 4, 128), mx.float16) for _ in range(2))
    mx.eval(x, stats, *window)
    shapes = (x.shape, 4, 4, 0, True, window[0].shape)
    kernel, constants, call = quant._quantize_call(mx.float16, *shapes)
    inputs = [x, x, *constants, stats, stats, *window]
    cache = TurboQuantKVCache(4, 4, warmup_tokens=0, recent_tokens=4)
    cache.update_and_fetch(*(mx.random.normal((1, 8, 1024, 128)).astype(mx.float16),) * 2)
    keys, values = cache.update_and_fetch(x, x)
    q = mx.random.normal((1, 32, 1, 128)).astype(mx.float16)
    mx.eval(q, keys.data, values.data, keys.recent, values.recent)
    return {
        "quantize_kv_rows (window)": timed(
            lambda: quant.quantize_kv_rows(x, x, 4, 4, 0, stats, stats, window), n
        ),
        "its kernel call alone": timed(lambda: kernel(inputs=inputs, **call), n),
        "cache.update_and_fetch (step)": timed(
            lambda: cache.update_and_fetch(x, x)[0].data, n // 4
        ),
        "_fused_attention (attend + merge)": timed(
            lambda: _fused_attention(q, keys, values, 0.088, False), n
        ),
    }


if __name__ == "__main__":
    main()
