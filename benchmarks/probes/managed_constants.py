"""Does the fused attention wait on constants in CUDA managed memory? MLX's CUDA allocator
puts arrays made on the host (mx.array of a list: the codebook, the rotation's signs, the
scale) in managed memory, and every array of <= 8 bytes (the scale, B = 1 `starts`) in one
shared managed pool that the host writes whenever it makes a scalar. Times TQ4 attention
alone (pipelined, ms per call) with the plan's constants as built, and with copies made by a
GPU op and padded past 8 bytes; each with and without a host scalar made per call (as a
model's step makes them: `x * 2.0`). Run from the repository root on a CUDA GPU:

    python3 benchmarks/probes/managed_constants.py [8192,32768,131072]
"""

import sys

sys.path.insert(0, "benchmarks")
import gpu_timings as g
import mlx.core as mx

from mlx_tq import attention


def device_copy(x, pad=4):
    """x made by a GPU op (device memory), at least `pad` elements (past the scalar pool)."""
    if x.size < pad:
        x = mx.concatenate([x.reshape(-1), mx.zeros((pad - x.size,), x.dtype)])
    y = x + mx.zeros((), x.dtype)
    mx.eval(y)
    return y


for row, tq in g.probe_rows(sys.argv):
    call = tq(4)
    call()
    q, k, v, scale = call.args
    p = attention._plan_for(q, k, v, scale, False)
    built = dict(constants=p.constants, no_starts=p.no_starts, rt_t=p.rt_t, ones=p.ones)
    copied = dict(
        constants=[device_copy(c) for c in p.constants],
        no_starts=device_copy(p.no_starts),
        rt_t=device_copy(p.rt_t),
        ones=device_copy(p.ones),
    )
    x = mx.ones((4,))
    mx.eval(x)

    def churn(call=call, x=x):
        return call(), x * 2.0  # a host scalar (2.0) in the managed pool

    for name, consts in (("built", built), ("device", copied)):
        for key, value in consts.items():
            setattr(p, key, value)
        row[f"tq4-{name}"] = round(g.median_ms(call, runs=30, batch=10), 4)
        row[f"tq4-{name}-churn"] = round(g.median_ms(churn, runs=30, batch=10), 4)
    for key, value in built.items():
        setattr(p, key, value)
