"""Times the GPU kernels: decode attention, the quantise step, prefill memory (Metal or CUDA).

    MLX_ENABLE_TF32=0 python benchmarks/gpu_timings.py [--quick] [--out DIR]

Their correctness is checked by `pytest -m gpu tests/test_gpu.py`; run it first.
1. Decode (B = 1, 32 query / 8 KV heads, D = 128, L = 1) at 4,096, 32,768 and 131,072 keys:
   fp16 `mx.fast.scaled_dot_product_attention`, mlx-lm's quantized SDPA at 4 and 8 bits, and
   TurboQuant at 4 and 3 bits on views of a larger buffer (as a cache hands them over); median
   ms per call alone (eval + synchronize after each) and pipelined (10 calls per eval, as a
   model's layers are), and the K+V bytes read per pipelined call as GB/s.
2. The quantise step: one token's keys (offset and key scale) and values, 8 KV heads, in one
   `quantize_kv_rows` launch as the cache makes it.
3. Prefill: 2,048 causal queries over 32,768 TQ4 keys: time and peak memory above the inputs of
   the public call (decoded path), of the fused kernel alone, and fp16 SDPA's time; the decoded
   path's pieces (decoding K and V, SDPA on them) and the chunk's quantise launch.
Writes gpu_timings.json to --out.
"""

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from functools import partial

import mlx.core as mx
import numpy as np
from mlx_lm.models.base import quantized_scaled_dot_product_attention

from mlx_tq import attention, kernels, quantize, scaled_dot_product_attention
from mlx_tq.attention import _fused_attention
from mlx_tq.quant import decode_rotated, quantize_kv_rows

DEFAULT_KEYS = (4096, 32768, 131072)
HQ, HKV, D = 32, 8, 128  # Llama-3.1-8B's attention
MB = 2**20


def median_ms(fn, warmup=5, runs=50, batch=1):
    """Median milliseconds per call; with batch > 1 a run evaluates `batch` calls at once,
    so the per-call launch and synchronisation costs overlap."""
    for _ in range(warmup):
        mx.eval([fn() for _ in range(batch)])
    mx.synchronize()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        mx.eval([fn() for _ in range(batch)])
        mx.synchronize()
        times.append((time.perf_counter() - t0) / batch)
    return 1e3 * float(np.median(times))


def probe_rows(argv):
    """For the probes (benchmarks/probes/): per key count S of argv[1] (comma-separated;
    default 8,192, 32,768, 131,072), yields the row {"keys": S, "fp16": ms of fp16 SDPA} (B 1,
    HQ/HKV heads, D; pipelined, 10 calls per eval, median of 30) and `tq(bits)`: the fused
    TurboQuant call over packed keys and values of that width, for the probe to time into
    the row; prints the row after the probe's turn."""
    sizes = [int(s) for s in argv[1].split(",")] if len(argv) > 1 else [8192, 32768, 131072]
    q = normal((1, HQ, 1, D))
    for S in sizes:
        k, v = normal((1, HKV, S, D)), normal((1, HKV, S, D))
        sdpa = partial(mx.fast.scaled_dot_product_attention, q, k, v, scale=D**-0.5)
        row = {"keys": S, "fp16": round(median_ms(sdpa, runs=30, batch=10), 4)}

        def tq(bits, S=S):
            tk, tv = packed(S, bits, 0), packed(S, bits, 1, keys=False)
            return partial(scaled_dot_product_attention, q, tk, tv, D**-0.5)

        yield row, tq
        print(json.dumps(row), flush=True)


def normal(shape, dtype=mx.float16):
    return mx.random.normal(shape).astype(dtype)


def packed(S, bits, seed, pad=256, keys=True):
    """TurboQuant keys (with an offset) or values (B=1, HKV, S, D), a view of S + pad rows."""
    offset = normal((1, HKV, 1, D), mx.float32) if keys else None
    t = quantize(normal((1, HKV, S + pad, D)), bits, seed, offset=offset, check_finite=False)
    mx.eval(t.data)
    return t.tokens(0, S)


def decode(S, runs, batch=10):
    q = normal((1, HQ, 1, D))
    k, v = normal((1, HKV, S, D)), normal((1, HKV, S, D))
    calls = {"fp16": partial(mx.fast.scaled_dot_product_attention, q, k, v, scale=D**-0.5)}
    nbytes = {"fp16": k.nbytes + v.nbytes}
    for bits in (4, 8):
        qk, qv = (mx.quantize(a, group_size=64, bits=bits) for a in (k, v))
        # mlx-lm scales its queries in place: give it its own copy.
        calls[f"mlxlm{bits}"] = partial(
            quantized_scaled_dot_product_attention, q + 0, qk, qv, D**-0.5, None, bits=bits
        )
        nbytes[f"mlxlm{bits}"] = sum(a.nbytes for a in (*qk, *qv))
    for bits in (4, 3):
        tk, tv = packed(S, bits, 0), packed(S, bits, 1, keys=False)
        calls[f"tq{bits}"] = partial(scaled_dot_product_attention, q, tk, tv, D**-0.5)
        nbytes[f"tq{bits}"] = 2 * HKV * S * tk.data.shape[-1] * 4
    row = {"keys": S}
    for name, fn in calls.items():
        row[f"{name}_ms"] = median_ms(fn, runs=runs)
        row[f"{name}_pipe_ms"] = median_ms(fn, runs=max(runs // 2, 1), batch=batch)
        row[f"{name}_GBs"] = nbytes[name] / row[f"{name}_pipe_ms"] / 1e6
    return row


def split_sweep(targets, runs):
    """TQ4 decode ms (alone, pipelined) per key count for each threadgroup target."""
    rows = []
    q = normal((1, HQ, 1, D))
    for S in DEFAULT_KEYS:
        tk, tv = packed(S, 4, 0), packed(S, 4, 1, keys=False)
        for target in targets:
            attention.TARGET_GROUPS = target
            fn = partial(scaled_dot_product_attention, q, tk, tv, D**-0.5)
            row = {"keys": S, "target_groups": target, "ms": median_ms(fn, runs=runs)}
            row["pipe_ms"] = median_ms(fn, runs=max(runs // 2, 1), batch=10)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def quantize_step(runs):
    k, v = normal((1, HKV, 1, D)), normal((1, HKV, 1, D))
    offset = normal((HKV, D), mx.float32)
    scale = mx.exp(0.5 * normal((HKV, D), mx.float32))
    step = partial(quantize_kv_rows, k, v, 4, 4, 0, offset, scale)
    return {"ms": median_ms(step, runs=runs), "pipe_ms": median_ms(step, runs=runs // 2, batch=10)}


def peak_above_inputs(fn):
    """(result, bytes that evaluating fn() peaks above what is held before)."""
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    out = fn()
    mx.eval(out)
    return out, mx.get_peak_memory() - base


def prefill(runs, S=32768, L=2048):
    keys, values = packed(S, 4, 0, pad=0), packed(S, 4, 1, pad=0, keys=False)
    q = normal((1, HQ, L, D))
    mx.eval(q, keys.data, values.data)
    public = partial(scaled_dot_product_attention, q, keys, values, D**-0.5, "causal")
    fused = partial(_fused_attention, q, keys, values, D**-0.5, True)
    _, peak = peak_above_inputs(public)
    _, peak_fused = peak_above_inputs(fused)
    k, v = normal((1, HKV, S, D)), normal((1, HKV, S, D))
    fp16 = partial(mx.fast.scaled_dot_product_attention, q, k, v, scale=D**-0.5, mask="causal")

    # The decoded path's pieces: decoding the packed keys and values, SDPA on them, and the
    # chunk's own quantise launch (as a cache makes it for L new rows).
    def decode_kv():
        return [decode_rotated(t, mx.float16, 4) for t in (keys, values)]

    dk, dv = decode_kv()
    on_decoded = partial(mx.fast.scaled_dot_product_attention, q, dk, dv, scale=1.0, mask="causal")
    offset, chunk = normal((HKV, D), mx.float32), normal((1, HKV, L, D))
    quantize_chunk = partial(quantize_kv_rows, chunk, chunk, 4, 4, 0, offset, None)
    return {
        "decode_kv_ms": median_ms(decode_kv, 1, runs),
        "sdpa_on_decoded_ms": median_ms(on_decoded, 1, runs),
        "quantize_chunk_ms": median_ms(quantize_chunk, 1, runs),
        "keys": S,
        "queries": L,
        "ms": median_ms(public, 1, runs),
        "peak_extra_MB": peak / MB,
        "fused_kernel_ms": median_ms(fused, 1, runs),
        "fused_kernel_peak_extra_MB": peak_fused / MB,
        "fp16_sdpa_ms": median_ms(fp16, 1, runs),
        "packed_MB": (keys.data.nbytes + values.data.nbytes) / MB,
        "fp16_kv_MB": (k.nbytes + v.nbytes) / MB,
        "scores_fp16_MB": HQ * L * S * 2 / MB,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed runs (20, not 50)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON")
    parser.add_argument(
        "--split-sweep",
        type=int,
        nargs="+",
        help="only time TQ4 decode with each of these attention.TARGET_GROUPS",
    )
    parser.add_argument("--prefill", action="store_true", help="only the prefill timings")
    args = parser.parse_args()
    if kernels.backend() is None:
        raise SystemExit("no GPU that runs mlx_tq's kernels (Metal or CUDA): nothing to time")
    mx.random.seed(0)
    runs = 20 if args.quick else 50
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mlx": mx.__version__,
        "backend": kernels.backend(),
        "machine": platform.node(),
        "device": str(mx.device_info() if hasattr(mx, "device_info") else mx.default_device()),
        "MLX_ENABLE_TF32": os.environ.get("MLX_ENABLE_TF32"),
        "runs": runs,
        "decode": [],
    }
    print(json.dumps({k: v for k, v in report.items() if k != "decode"}), flush=True)
    if args.split_sweep:
        report["split_sweep"] = split_sweep(args.split_sweep, runs)
        with open(os.path.join(args.out, "gpu_split_sweep.json"), "w") as f:
            json.dump(report, f, indent=1)
        return
    for S in () if args.prefill else DEFAULT_KEYS:
        report["decode"].append(decode(S, runs))
        print(json.dumps(report["decode"][-1]), flush=True)
    if not args.prefill:
        report["quantize_step"] = quantize_step(runs)
        print("quantize step", json.dumps(report["quantize_step"]), flush=True)
    report["prefill"] = prefill(5 if args.quick else 10)
    print("prefill", json.dumps(report["prefill"]), flush=True)
    with open(os.path.join(args.out, "gpu_timings.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
