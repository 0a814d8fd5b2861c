"""Host time of one attention layer's decode step, in pieces, with the real kernels: mlx-lm's
`KVCache` (fp16) against `TurboQuantKVCache` (4 bits, exact window): as it runs, with the
token quantised in the merge launch (+fold: attention.FOLD) and with the launch that also
merges (+merge: attention.MMA_MERGE); `update_and_fetch`, then the (patched)
`scaled_dot_product_attention`, built only (evaluated every 100 steps, untimed); then single
calls: the quantise launch of a step, the attention launch alone, fp16 SDPA, a slice update.
us per call, median of 5 interleaved rounds of 500 steps (B = 1, 32/8 heads, D 128, 8,192
tokens held).
Run from the repository root on a GPU:

    python3 benchmarks/probes/host_pieces.py [--context 8192]
"""

import json
import statistics
import sys
import time

sys.path.insert(0, "benchmarks")
import mlx.core as mx
import mlx_lm.models.base as base
from decode_step import filled
from mlx_lm.models.cache import KVCache
from profile_step import per_call_us

import mlx_tq
from mlx_tq import attention, quant

context = int(sys.argv[sys.argv.index("--context") + 1]) if "--context" in sys.argv else 8192
dtype = mx.float16
mlx_tq.patch()
q = mx.random.normal((1, 32, 1, 128)).astype(dtype)
x = mx.random.normal((1, 8, 1, 128)).astype(dtype)
mx.eval(q, x)
caches = {}
# (attention.MMA_MERGE, attention.FOLD) of each
for name, switches in (
    ("fp16", (False, True)),
    ("tq4", (False, False)),
    ("tq4+fold", (False, True)),
    ("tq4+merge", (True, False)),
):
    attention.MMA_MERGE, attention.FOLD = switches
    c = KVCache() if name == "fp16" else mlx_tq.TurboQuantKVCache(4, 4, smooth_keys=0.5)
    filled([c], context, dtype)
    for _ in range(3):  # the cache's step launch and attention built
        k, v = c.update_and_fetch(x, x)
        mx.eval(base.scaled_dot_product_attention(q, k, v, c, scale=0.088, mask=None))
    caches[name] = (c, switches)

row = {"context": context}
times = {name: ([], []) for name in caches}
for _ in range(5):  # rounds, the configs interleaved in each (so that drift hits all)
    for name, (c, switches) in caches.items():
        attention.MMA_MERGE, attention.FOLD = switches
        tu = ta = 0.0
        for i in range(500):
            t0 = time.perf_counter()
            k, v = c.update_and_fetch(x, x)
            t1 = time.perf_counter()
            out = base.scaled_dot_product_attention(q, k, v, c, scale=0.088, mask=None)
            ta += time.perf_counter() - t1
            tu += t1 - t0
            if i % 100 == 99:
                mx.eval(out, c.state)
        times[name][0].append(tu / 500 * 1e6)
        times[name][1].append(ta / 500 * 1e6)
for name, (upd, att) in times.items():
    row[f"{name}_update_us"] = round(statistics.median(upd), 2)
    row[f"{name}_attention_us"] = round(statistics.median(att), 2)
    row[f"{name}_layer_us"] = round(
        statistics.median(u + a for u, a in zip(upd, att, strict=True)), 2
    )


c, _ = caches["tq4"]
if c._step_launch is None:
    sys.exit(print(json.dumps(row), "(no GPU kernels: single calls timed on a GPU only)"))
launch = c._step_launch[0]
k, v = c.update_and_fetch(x, x)
attend = c._step_attention
kf, vf = caches["fp16"][0].keys[:, :, :context], caches["fp16"][0].values[:, :, :context]
buf = mx.zeros((1, 8, 4 * context, 128), dtype)
mx.eval(buf)


def slice_update():
    buf[:, :, 5:6] = x
    return buf


# The kernel calls alone, their inputs listed beforehand.
attention.MMA_MERGE, attention.FOLD = False, True
p = attention._plan_for(q, k, v, 0.088, False)
S = k.data.shape[2] - k.window
a_in = [q, k.data, v.data, *p.constants, k.channel_scale, p.no_starts]
a_args = p.attend_args(p.groups(S))
o, ml = p.attend(inputs=a_in, **a_args)
m_in = [o, ml, p.rt_t, q, k.recent, v.recent, k.offset, p.constants[1]]
q_kernel, q_consts, q_call = quant._quantize_call(dtype, x.shape, 4, 4, 0, True, c._window[0].shape)
q_in = [x, x, *q_consts, *c._rows, *c._window]

pieces = {
    "quantise kernel alone": lambda: q_kernel(inputs=q_in, **q_call)[0],
    "attend kernel alone": lambda: p.attend(inputs=a_in, **a_args)[0],
    "merge kernel alone": lambda: p.merge(inputs=m_in, **p.merge_args)[0],
    "quantise step launch": lambda: launch(x, x, c._window)[0],
    "attention launch (step)": lambda: attend(q, k, v, 0.088),
    "fp16 mx.fast sdpa": lambda: mx.fast.scaled_dot_product_attention(q, kf, vf, scale=0.088),
    "slice update": slice_update,
    "slice": lambda: kf[:, :, :100],
}
if getattr(p, "fold", None) is not None:  # the merge launch that also quantises the token
    offset, qs = c.step_stats()
    qs = p.ones.reshape(1, -1) if qs is None else qs
    f_in = [o, ml, q, *c._window, offset, x, x, p.fold.qc, qs]
    pieces["merge_quantize kernel alone"] = lambda: p.fold.kernel(inputs=f_in, **p.fold.args)[0]
row.update({name: per_call_us(fn, n=1000) for name, fn in pieces.items()})
print(json.dumps(row))
