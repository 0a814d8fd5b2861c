"""Could a TurboQuant decode step's cache update cost the host less as one `mx.compile`d call?
Times one layer's update three ways (B = 1, 8 KV heads, D 128, `--context` tokens held, 256 rows
of room): mlx-lm's fp16 `KVCache.update_and_fetch`; `TurboQuantKVCache.update_and_fetch` (the
quantise launch, two slice updates, two slices, the wrapping); and a compiled function of the
same quantise launch and two `mx.slice_update`s at a dynamic row (an int32 array, so the graph's
shapes do not change from step to step), its next row computed inside. Per step, us: *build*
(the calls, not evaluated; evaluated every 100 steps, untimed) and *step* (built and evaluated
one at a time). Then whether the compiled update's rows landed where the eager one puts them.
Run from the repository root on a GPU:

    python3 benchmarks/probes/compiled_update.py [--context 8192]
"""

import json
import statistics
import sys
import time

sys.path.insert(0, "benchmarks")
import mlx.core as mx
from decode_step import filled
from mlx_lm.models.cache import KVCache

import mlx_tq

context = int(sys.argv[sys.argv.index("--context") + 1]) if "--context" in sys.argv else 8192
dtype = mx.float16
mlx_tq.patch()
x = mx.random.normal((1, 8, 1, 128)).astype(dtype)
mx.eval(x)
fp16, tq = KVCache(), mlx_tq.TurboQuantKVCache(4, 4, smooth_keys=0.5)
filled([fp16], context, dtype)
filled([tq], context, dtype)
for c in (fp16, tq):
    for _ in range(2):
        mx.eval(c.update_and_fetch(x, x)[0].data if c is tq else c.update_and_fetch(x, x)[0])
launch = tq._step_launch[0]
if launch is None:
    sys.exit("(no GPU kernels)")


def update(keys, values, k_win, v_win, row, new_k, new_v):
    k, v, k_win, v_win = launch(new_k, new_v, (k_win, v_win))
    keys = mx.slice_update(keys, k, row, axes=(2,))
    values = mx.slice_update(values, v, row, axes=(2,))
    return keys, values, k_win, v_win, row + 1


compiled = mx.compile(update)
state = [tq.keys, tq.values, *tq._window, mx.array([tq.offset], mx.int32)]
mx.eval(state)


def step_compiled():
    global state
    state = list(compiled(*state, x, x))
    return state[0]


def step_eager(c):
    def step():
        out = c.update_and_fetch(x, x)[0]
        return out.data if c is tq else out

    return step


def guard(c):  # every cache keeps its room: rewind 100 steps (untimed; None: the compiled)
    if c is None:
        state[4] = state[4] - 100
    else:
        c.offset -= 100


row = {"context": context}
for name, c, fn in (
    ("fp16", fp16, step_eager(fp16)),
    ("tq4", tq, step_eager(tq)),
    ("tq4 compiled", None, step_compiled),
):
    build, step = [], []
    for _ in range(3):
        t = 0.0
        for i in range(200):
            t0 = time.perf_counter()
            out = fn()
            t += time.perf_counter() - t0
            if i % 100 == 99:
                mx.eval(out)
                guard(c)
        build.append(1e6 * t / 200)
        t0 = time.perf_counter()
        for _ in range(100):
            mx.eval(fn())
        step.append(1e6 * (time.perf_counter() - t0) / 100)
        guard(c)
    row[f"{name} build_us"] = round(statistics.median(build), 2)
    row[f"{name} step_us"] = round(statistics.median(step), 2)

# The same token through both: the rows written must agree.
r = tq.offset
eager_k = tq.update_and_fetch(x, x)[0].data[:, :, r]
state[4] = mx.array([r], mx.int32)
state = list(compiled(*state, x, x))
row["rows_agree"] = bool(mx.array_equal(state[0][:, :, r], eager_k).item())
print(json.dumps(row))
