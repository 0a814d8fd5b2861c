"""Would a decode step's custom-kernel calls cost the host less replayed by `mx.compile`?
One layer's attention launch (attend + merge; 4-bit keys and values, `--context` keys and a
4-row exact window, 32/8 heads, D 128) and its quantise launch, each called eagerly and as an
`mx.compile`d function of the same fixed-shape inputs (a compiled function replays its
primitives: no Python kernel call, no kernel text built), us per call, built only
(`per_call_us`); fp16 SDPA and a slice for scale; then whether the compiled outputs equal the
eager ones. (A model's step changes the keys' length every token: a compiled step needs
the kernels to read the whole buffer and the length from an array.) Run from the repository
root on a GPU (`--stub`: stub kernels, this script's logic only):

    python3 benchmarks/probes/compiled_attention.py [--context 8192] [--stub]
"""

import json
import sys
from dataclasses import replace

sys.path.insert(0, "benchmarks")
import mlx.core as mx
import mlx_lm.models.base as base
from decode_step import filled, stub_kernels
from profile_step import per_call_us

import mlx_tq
from mlx_tq import attention

context = int(sys.argv[sys.argv.index("--context") + 1]) if "--context" in sys.argv else 8192
dtype = mx.float16
q = mx.random.normal((1, 32, 1, 128)).astype(dtype)
x = mx.random.normal((1, 8, 1, 128)).astype(dtype)
c = mlx_tq.TurboQuantKVCache(4, 4, smooth_keys=0.5)
filled([c], context, dtype)
if "--stub" in sys.argv:
    stub_kernels()
mlx_tq.patch()
for _ in range(3):  # the cache's step launch and attention built
    k, v = c.update_and_fetch(x, x)
    mx.eval(base.scaled_dot_product_attention(q, k, v, c, scale=0.088, mask=None))
if c._step_launch is None:
    sys.exit("(no GPU kernels: run on a GPU, or with --stub)")
k, v = c.update_and_fetch(x, x)
p = attention._plan_for(q, k, v, 0.088, False)
launch = c._step_launch[0]


def attend(queries, kd, vd, kr, vr, k_offset, k_scale):
    keys = replace(k, data=kd, recent=kr, offset=k_offset, channel_scale=k_scale)
    return attention._fused_launch(p, queries, keys, replace(v, data=vd, recent=vr), None)


def quantise(kx, vx, k_win, v_win):
    return launch(kx, vx, (k_win, v_win))


a_in = [q, k.data, v.data, k.recent, v.recent, k.offset, k.channel_scale]
q_in = [x, x, *c._window]
mx.eval(a_in, q_in)
compiled_attend, compiled_quantise = mx.compile(attend), mx.compile(quantise)
kf = mx.random.normal((1, 8, context, 128)).astype(dtype)
mx.eval(kf)
pieces = {
    "attention launch, eager": lambda: attend(*a_in),
    "attention launch, compiled": lambda: compiled_attend(*a_in),
    "quantise launch, eager": lambda: quantise(*q_in)[0],
    "quantise launch, compiled": lambda: compiled_quantise(*q_in)[0],
    "fp16 mx.fast sdpa": lambda: mx.fast.scaled_dot_product_attention(q, kf, kf, scale=0.088),
    "slice": lambda: kf[:, :, :100],
}
row = {"context": context, "stub": "--stub" in sys.argv}
row.update({name: per_call_us(fn, n=1000) for name, fn in pieces.items()})
row["attention equal"] = bool(mx.array_equal(compiled_attend(*a_in), attend(*a_in)))
row["quantise equal"] = all(
    bool(mx.array_equal(a, b))
    for a, b in zip(compiled_quantise(*q_in), quantise(*q_in), strict=True)
)
print(json.dumps(row))
