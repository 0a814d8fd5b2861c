"""Host-side cost of one decode layer step: TurboQuant's dispatch against fp16's.

Batch-1 decode on a GPU is bound by what the host does per layer (building the graph,
launching kernels). This times the Python + graph-building part alone, on any machine: the
GPU kernels are replaced by a stub that returns arrays of the right shapes and nothing is
evaluated, so what is timed is `update_and_fetch` + attention dispatch per layer, TurboQuant
(K4/V4, smoothed keys, fused decode path) against mlx-lm's `KVCache` + mx.fast SDPA.
The C++ side of a real kernel call (MLX builds the kernel's source string per call) is not
included, nor are the launches themselves.

    python benchmarks/dispatch_overhead.py [--steps 2000] [--repeats 5]
"""

import argparse
import statistics
import time

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from mlx_tq import kernels, patch
from mlx_tq.cache import TurboQuantKVCache
from mlx_tq.patch import _attention


class StubKernel:
    """Stands in for a built kernel: outputs of the requested shapes, no work."""

    def __call__(self, inputs, template, grid, threadgroup, output_shapes, output_dtypes, **_):
        return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes, strict=True)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--context", type=int, default=8192)
    args = parser.parse_args()
    patch()
    B, Hq, Hkv, D, S = 1, 32, 8, 128, args.context  # Llama-3.1-8B's attention shape
    k = mx.random.normal((B, Hkv, S, D)).astype(mx.float16)
    tq, fp = TurboQuantKVCache(4, 4, smooth_keys=0.5), KVCache()
    tq.update_and_fetch(k, k)  # on the CPU path: real packed rows
    mx.eval(tq.keys, tq.values, tq.key_offset, tq.key_scale)
    fp.update_and_fetch(k, k)
    mx.eval(fp.keys, fp.values)
    kernels.backend = lambda: "cuda"
    kernels.kernel = lambda *a, **kw: StubKernel()
    q = mx.random.normal((B, Hq, 1, D)).astype(mx.float16)
    new = mx.random.normal((B, Hkv, 1, D)).astype(mx.float16)

    def step():
        keys, values = tq.update_and_fetch(new, new)
        return _attention(q, keys, values, tq, D**-0.5, None)

    def step_fp16():
        keys, values = fp.update_and_fetch(new, new)
        return mx.fast.scaled_dot_product_attention(q, keys, values, scale=D**-0.5)

    steps = {"turboquant": step, "fp16": step_fp16}
    times = {name: [] for name in steps}
    for _ in range(args.repeats):  # interleaved, so drift hits all
        for name, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            times[name].append((time.perf_counter() - t0) / args.steps * 1e6)
    tq_us, fp_us = (statistics.median(times[n]) for n in steps)
    print(f"host time per layer step, median of {args.repeats} x {args.steps} steps:")
    print(f"  TurboQuant K4/V4 (smoothed, fused path): {tq_us:.1f} us")
    print(f"  fp16 KVCache + mx.fast SDPA:              {fp_us:.1f} us ({tq_us / fp_us:.2f}x)")
    print(f"  difference x 32 layers: {(tq_us - fp_us) * 32 / 1e3:.2f} ms per token")


if __name__ == "__main__":
    main()
