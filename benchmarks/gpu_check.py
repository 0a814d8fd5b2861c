"""Checks every GPU kernel against its reference, then times them (issue 4).

Run on a CUDA or Metal machine:
    MLX_ENABLE_TF32=0 python benchmarks/gpu_check.py [--quick] [--out DIR] [--parts ...]
(MLX runs float32 matmuls as TF32 on CUDA and M5 by default; the references and the query
rotation go through mx.matmul, so pin full float32 as MLX's own test harness does.)

1. quantize_rows vs quantize(...).data: indices equal except at level midpoints (to float
   rounding), scales within 1e-6 of float64.
2. Fused decode attention vs float64 NumPy on the same packed data: max |error| / max |ref|
   <= 1e-3 over head dims, GQA, keys up to 131,072, bits, masks, fp16/bf16, cache views,
   smoothed keys, values with and without offset; the decoded (mx.fast SDPA) prefill path on
   the same inputs within 6 roundings of the query dtype.
3. The dequantise kernel (prefill's decoded keys/values) vs its ops reference.
4. Prefill over a long compressed cache: peak memory against the fp16 K+V bytes of the layer.
5. Timings (median after warm-up), only for kernels that passed: TQ4/TQ3 decode vs fp16
   mx.fast.scaled_dot_product_attention vs mlx-lm's quantized SDPA; the quantise step.
"""

import argparse
import json
import math
import os
import platform
import time
from dataclasses import replace
from datetime import datetime, timezone
from functools import partial

import mlx.core as mx
import numpy as np
from mlx_lm.models.base import quantized_scaled_dot_product_attention

from mlx_tq import kernels, quantize, scaled_dot_product_attention
from mlx_tq.attention import (
    FUSED_MAX_ROWS,
    _decoded_attention,
    _fused_attention,
    decode_rotated,
    decode_rotated_ops,
)
from mlx_tq.codebook import codebook
from mlx_tq.quant import quantize_rows, unpack
from mlx_tq.rotation import rotation_matrix

TOL_ATTENTION = 1e-3
LAYERS = 32  # Llama-3.1-8B, for the prefill memory check
TOL_SCALE = 1e-6
TIE = 1e-5  # |z - midpoint| below which float rounding may pick either level


def f64(a):
    return np.array(a.astype(mx.float32), np.float64)


def median_ms(fn, warmup=5, runs=50, batch=1):
    """Median milliseconds per call; with batch > 1 a run evaluates `batch` calls at once,
    as a model's layers are, so the per-call launch and synchronisation costs overlap."""
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


def channel_scale(rng, lead, D):
    """A positive per-channel divisor (key smoothing), (..., 1, D) float32."""
    return mx.array(np.exp(0.5 * rng.standard_normal((*lead, 1, D))).astype(np.float32))


def check_quantize(rng, shape, bits, dtype, offset, strided, scaled=False):
    D = shape[-1]
    x = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)
    if strided:  # mlx-lm's keys are (B, L, H, D) transposed to (B, H, L, D)
        x = x.swapaxes(1, 2)
    off = (
        mx.array(rng.standard_normal((*x.shape[:-2], 1, D)).astype(np.float32)) if offset else None
    )
    cs = channel_scale(rng, x.shape[:-2], D) if scaled else None
    ref = quantize(x, bits, offset=off, channel_scale=cs, check_finite=False).data
    got = quantize_rows(x, bits, offset=off, channel_scale=cs)
    ri, gi = (np.array(unpack(a[..., :-1], bits, D)).astype(int) for a in (ref, got))
    # Coordinates in float64, to tell a tie from an error.
    x64 = (f64(x) - (f64(off) if offset else 0)) / (f64(cs) if scaled else 1)
    n = np.linalg.norm(x64, axis=-1, keepdims=True)
    z = (x64 / np.where(n > 0, n, 1)) @ f64(rotation_matrix(D)) * math.sqrt(D)
    levels, bounds = (f64(a) for a in codebook(bits, D))
    diff = ri != gi
    lo = np.minimum(ri, gi)[diff]
    ties = (np.abs(ri - gi)[diff] == 1) & (
        np.abs(z[diff] - bounds[np.minimum(lo, len(bounds) - 1)]) < TIE
    )
    scale64 = n[..., 0] / np.linalg.norm(levels[gi], axis=-1)
    scale = np.array(got[..., -1:].view(mx.float32))[..., 0]
    err = float(np.max(np.abs(scale - scale64) / np.maximum(scale64, 1e-30)))
    ok = bool(ties.all()) and err <= TOL_SCALE and got.shape == ref.shape
    return ok, {"mismatches": int(diff.sum()), "ties": int(ties.sum()), "scale_err": err}


def packed_view(rng, B, H, S, D, bits, seed, offset, pad, smooth=False):
    """TurboQuantized (B, H, S, D) whose data is a view into a buffer of S + pad rows."""
    x = mx.array(rng.standard_normal((B, H, S + pad, D)).astype(np.float32))
    off = mx.array(rng.standard_normal((B, H, 1, D)).astype(np.float32)) if offset else None
    cs = channel_scale(rng, (B, H), D) if smooth else None
    q = quantize(x, bits, seed, offset=off, channel_scale=cs, check_finite=False)
    mx.eval(q.data)
    return q.tokens(0, S)


def attention_f64(queries, keys, values, scale, causal):
    """Softmax attention in float64 on the packed data, in the rotated space."""
    B, Hq, L, D = queries.shape
    Hkv, S = keys.shape[1:3]
    G = Hq // Hkv
    q = f64((queries * scale).astype(mx.float32))
    if keys.channel_scale is not None:  # <q, s * k'> = <q * s, k'>
        q = q * np.repeat(f64(keys.channel_scale), G, axis=1)
    q = (q @ f64(rotation_matrix(D, keys.seed))).reshape(B, Hkv, G * L, D)
    k, v = (
        f64(levels)[np.array(t.indices())] * f64(t.scales())[..., None]
        for t, levels in ((keys, codebook(keys.bits, D)[0]), (values, codebook(values.bits, D)[0]))
    )
    if keys.sink is not None:  # row 0 exact: the stored-space vector, rotated
        k[:, :, 0] = f64(keys.sink)[:, :, 0] @ f64(rotation_matrix(D, keys.seed))
        v[:, :, 0] = f64(values.sink)[:, :, 0] @ f64(rotation_matrix(D, values.seed))
    s = q @ k.swapaxes(-1, -2)
    if causal:
        seen = np.arange(S)[None] <= (S - L + np.arange(G * L) % L)[:, None]
        s = np.where(seen, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    out = (p / p.sum(-1, keepdims=True)) @ v @ f64(rotation_matrix(D, values.seed)).T
    out = out.reshape(B, Hq, L, D)
    if values.offset is not None:
        out = out + np.repeat(np.broadcast_to(f64(values.offset), (B, Hkv, 1, D)), G, axis=1)
    return out


def check_attention(rng, B, Hkv, G, L, S, D, kb, vb, dtype):
    causal = L > 1
    # Keys smoothed or not; values with an offset or not (the cache stores none).
    smooth, value_offset = bool(rng.integers(2)), bool(rng.integers(2))
    # Row 0 exact (the cache's exact_sink): the merge kernel adds it (needs S > 1).
    sink = bool(rng.integers(2)) and S > 1
    keys = packed_view(rng, B, Hkv, S, D, kb, 0, True, int(rng.integers(1, 300)), smooth)
    values = packed_view(rng, B, Hkv, S, D, vb, 1, value_offset, int(rng.integers(1, 300)))
    if sink:
        keys, values = (
            replace(t, sink=mx.array(rng.standard_normal((B, Hkv, 1, D)).astype(np.float32)))
            for t in (keys, values)
        )
    queries = mx.array(rng.standard_normal((B, Hkv * G, L, D)).astype(np.float32)).astype(dtype)
    scale = D**-0.5
    mask = "causal" if causal else None
    # The kernels' error on float32 queries; the public call adds only the final rounding.
    q32 = queries.astype(mx.float32)
    got = np.array(_fused_attention(q32, keys, values, scale, causal))
    public = scaled_dot_product_attention(queries, keys, values, scale, mask)
    # The prefill path (L > 8): mx.fast SDPA on keys/values decoded in the queries' dtype.
    decoded = _decoded_attention(queries, keys, values, scale, mask)
    ref = attention_f64(q32, keys, values, scale, causal)
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    err_public = float(np.abs(f64(public) - ref).max() / np.abs(ref).max())
    err_decoded = float(np.abs(f64(decoded) - ref).max() / np.abs(ref).max())
    rounding = 2.0**-8 if dtype == mx.bfloat16 else 2.0**-10
    # Decoded: keys, values and queries each rounded to the queries' dtype before SDPA.
    tol_decoded = 6 * rounding
    tol_public = tol_decoded if L > FUSED_MAX_ROWS else TOL_ATTENTION + rounding
    ok = err <= TOL_ATTENTION and err_decoded <= tol_decoded and err_public <= tol_public
    ok = ok and public.dtype == dtype and public.shape == queries.shape
    return ok, {
        "smooth": smooth,
        "value_offset": value_offset,
        "sink": sink,
        "err": err,
        "err_public": err_public,
        "err_decoded": err_decoded,
    }


def check_prefill(rng, S, L, Hkv=8, G=4, D=128, bits=4):
    """Peak memory of the L > 8 path over S compressed keys vs the fp16 K+V bytes."""
    keys = packed_view(rng, 1, Hkv, S, D, bits, 0, True, pad=0)
    values = packed_view(rng, 1, Hkv, S, D, bits, 1, False, pad=0)
    q = mx.array(rng.standard_normal((1, Hkv * G, L, D)).astype(np.float32)).astype(mx.float16)
    mx.eval(q)
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    out = scaled_dot_product_attention(q, keys, values, D**-0.5, "causal")
    mx.eval(out)
    peak = mx.get_peak_memory() - base
    fp16_bytes = 2 * Hkv * S * D * 2
    packed = keys.data.nbytes + values.data.nbytes
    ms = median_ms(partial(scaled_dot_product_attention, q, keys, values, D**-0.5, "causal"), 1, 5)
    fused = partial(_fused_attention, q, keys, values, D**-0.5, True)
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(fused())
    peak_fused = mx.get_peak_memory() - base
    k, v = (mx.array(rng.standard_normal((1, Hkv, S, D)).astype(np.float16)) for _ in range(2))
    fp16 = partial(mx.fast.scaled_dot_product_attention, q, k, v, scale=D**-0.5, mask="causal")
    # The decoded path holds this layer's keys and values decoded to float16 (what an fp16
    # cache holds for that layer) and L-sized float32 query/output temporaries, never the
    # L x S scores; in a model of LAYERS layers, with every layer's packed cache held, that
    # stays below the fp16 cache of the same tokens. The fused kernel holds O(L D) only.
    scores_bytes = Hkv * G * L * S * 2
    ok = peak < scores_bytes / 4 and peak + LAYERS * packed < LAYERS * fp16_bytes
    ok = ok and peak_fused + packed < fp16_bytes
    return ok, {
        "S": S,
        "L": L,
        "peak_extra_MB": peak / 2**20,
        "packed_MB": packed / 2**20,
        "fp16_kv_MB": fp16_bytes / 2**20,
        "scores_fp16_MB": scores_bytes / 2**20,
        "model_layers": LAYERS,
        "ms": ms,
        "fused_kernel_ms": median_ms(fused, 1, 5),
        "fused_kernel_peak_extra_MB": peak_fused / 2**20,
        "fp16_sdpa_ms": median_ms(fp16, 1, 5),
    }


def check_decode_rotated(rng, D, bits, dtype, shift, offset):
    """The dequantise kernel vs its ops reference: one rounding of dtype at most."""
    t = packed_view(rng, 2, 3, int(rng.integers(1, 3000)), D, bits, 0, True, 17)
    got = f64(decode_rotated(t, dtype, shift, offset))
    ref = f64(decode_rotated_ops(t, dtype, shift, offset))
    # Relative to the largest element: with an offset added, an element near zero may differ
    # by one rounding of its parts (the kernel may fuse the multiply-add).
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    return err <= (2.0**-8 if dtype == mx.bfloat16 else 2.0**-10), {"err": err}


def attention_configs(rng, quick):
    fixed = [  # (B, Hkv, G, L, S, D, kb, vb)
        (1, 8, 4, 1, 4096, 128, 4, 4),
        (1, 8, 4, 1, 4096, 128, 3, 3),
        (1, 2, 4, 1, 131072, 128, 4, 4),
        (1, 1, 8, 1, 131072, 256, 3, 2),
        (1, 2, 1, 1, 131071, 64, 4, 3),
        (1, 1, 8, 8, 32769, 128, 4, 4),
        (2, 2, 4, 1, 1, 128, 3, 4),
        (1, 2, 4, 300, 5000, 128, 4, 4),
    ]
    sizes = [1, 2, 31, 63, 64, 65, 127, 128, 129, 1000, 4095, 4097, 8193, 32767]
    n = 12 if quick else 40
    rand = [
        (
            int(rng.integers(1, 3)),
            int(rng.choice([1, 2, 8])),
            int(rng.choice([1, 4, 8])),
            int(rng.choice([1, 1, 2, 5, 8])),
            int(rng.choice(sizes)),
            int(rng.choice([64, 128, 256])),
            int(rng.choice([2, 3, 4])),
            int(rng.choice([2, 3, 4])),
        )
        for _ in range(n)
    ]
    # Causal rows need at least one key: L <= S.
    return fixed + [(B, H, G, min(L, S), S, *rest) for B, H, G, L, S, *rest in rand]


def decode_timings(rng, Ns, Hkv=8, G=4, D=128, batch=10):
    """Decode (L = 1) per call: "ms" alone (eval + synchronize each call), "pipe" with
    `batch` calls in one eval; GB/s of K+V read over the pipelined time."""
    rows = []
    for N in Ns:
        q = mx.array(rng.standard_normal((1, Hkv * G, 1, D)).astype(np.float16))
        k, v = (mx.array(rng.standard_normal((1, Hkv, N, D)).astype(np.float16)) for _ in range(2))
        calls = {"fp16": partial(mx.fast.scaled_dot_product_attention, q, k, v, scale=D**-0.5)}
        for bits in (4, 8):
            qk, qv = (mx.quantize(a, group_size=64, bits=bits) for a in (k, v))
            # mlx-lm scales its queries in place: give it its own copy.
            calls[f"mlxlm{bits}"] = partial(
                quantized_scaled_dot_product_attention, q + 0, qk, qv, D**-0.5, None, bits=bits
            )
        nbytes = {"fp16": k.nbytes + v.nbytes}
        for bits in (4, 3):
            # Views of a larger buffer, as a cache hands them over.
            tk = packed_view(rng, 1, Hkv, N, D, bits, 0, True, pad=256)
            tv = packed_view(rng, 1, Hkv, N, D, bits, 1, False, pad=256)
            calls[f"tq{bits}"] = partial(scaled_dot_product_attention, q, tk, tv, D**-0.5)
            nbytes[f"tq{bits}"] = 2 * Hkv * N * tk.data.shape[-1] * 4
            if bits == 4:  # with an exact sink row: the merge kernel adds it
                sk, sv = (
                    replace(t, sink=mx.array(rng.standard_normal((1, Hkv, 1, D)), mx.float32))
                    for t in (tk, tv)
                )
                calls["tq4sink"] = partial(scaled_dot_product_attention, q, sk, sv, D**-0.5)
        row = {"N": N}
        for name, fn in calls.items():
            row[f"{name}_ms"] = median_ms(fn)
            row[f"{name}_pipe"] = median_ms(fn, runs=20, batch=batch)
            if name in nbytes:
                row[f"{name}_GBs"] = nbytes[name] / row[f"{name}_pipe"] / 1e6
        rows.append(row)
    return rows


def record(report, name, results, detail):
    """Stores one check's results, marks the check failed if any case failed, and prints
    "<name>: <passed>/<cases> ok, <detail>"."""
    report[name] = results
    if not all(r["ok"] for r in results):
        report["failed"].append(name)
    print(f"{name}: {sum(r['ok'] for r in results)}/{len(results)} ok, {detail}", flush=True)


def save(report, out):
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer random shapes")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON")
    parts = ("quantize", "dequantize", "attention", "prefill", "timings")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=parts,
        default=list(parts),
        help="what to run (default: all); a device call is limited to 10 minutes",
    )
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mlx": mx.__version__,
        "backend": kernels.backend(),
        "machine": platform.node(),
        "device": str(mx.device_info() if hasattr(mx, "device_info") else mx.default_device()),
        "MLX_ENABLE_TF32": os.environ.get("MLX_ENABLE_TF32"),
        "parts": args.parts,
        "failed": [],
    }
    print(
        json.dumps({k: report[k] for k in ("date", "mlx", "backend", "device", "MLX_ENABLE_TF32")})
    )
    t0 = time.time()

    if "quantize" in args.parts:
        results = []
        for D in (64, 128, 256):
            for bits in (2, 3, 4):
                for dtype in (mx.float16, mx.bfloat16):
                    shape = (
                        int(rng.integers(1, 3)),
                        int(rng.integers(1, 9)),
                        int(rng.integers(1, 40)),
                        D,
                    )
                    for offset, strided, scaled in (
                        (False, False, False),
                        (True, True, False),
                        (True, False, True),
                    ):
                        ok, info = check_quantize(rng, shape, bits, dtype, offset, strided, scaled)
                        results.append(
                            {
                                "D": D,
                                "bits": bits,
                                "dtype": str(dtype),
                                "shape": shape,
                                "offset": offset,
                                "strided": strided,
                                "scaled": scaled,
                                "ok": ok,
                                **info,
                            }
                        )
                        if not ok:
                            print("FAIL quantize", results[-1], flush=True)
        record(
            report,
            "quantize",
            results,
            f"max scale err {max(r['scale_err'] for r in results):.2e}, "
            f"ties {sum(r['ties'] for r in results)}, {time.time() - t0:.0f} s",
        )

    if "dequantize" in args.parts:
        results = []
        for D in (64, 128, 256):
            for bits in (2, 3, 4, 8):
                for dtype, shift, offset in ((mx.float16, 4, True), (mx.bfloat16, 0, False)):
                    ok, info = check_decode_rotated(rng, D, bits, dtype, shift, offset)
                    results.append({"D": D, "bits": bits, "dtype": str(dtype), "ok": ok, **info})
                    if not ok:
                        print("FAIL dequantize", results[-1], flush=True)
        record(report, "dequantize", results, f"max rel err {max(r['err'] for r in results):.2e}")

    if "attention" in args.parts:
        results = []
        for i, (B, Hkv, G, L, S, D, kb, vb) in enumerate(attention_configs(rng, args.quick)):
            dtype = mx.float16 if i % 2 == 0 else mx.bfloat16
            ok, info = check_attention(rng, B, Hkv, G, L, S, D, kb, vb, dtype)
            results.append(
                {
                    "B": B,
                    "Hkv": Hkv,
                    "G": G,
                    "L": L,
                    "S": S,
                    "D": D,
                    "kb": kb,
                    "vb": vb,
                    "dtype": str(dtype),
                    "ok": ok,
                    **info,
                }
            )
            if not ok:
                print("FAIL attention", results[-1], flush=True)
        record(
            report,
            "attention",
            results,
            f"max err {max(r['err'] for r in results):.2e}, decoded path max err "
            f"{max(r['err_decoded'] for r in results):.2e}, {time.time() - t0:.0f} s",
        )
        save(report, args.out)

    if "prefill" in args.parts:
        ok, info = check_prefill(rng, S=32768, L=2048)
        report["prefill"] = {"ok": ok, **info}
        if not ok:
            report["failed"].append("prefill")
        print("prefill", report["prefill"], flush=True)
        save(report, args.out)

    if "timings" in args.parts:
        if "attention" not in report["failed"]:
            report["decode"] = decode_timings(rng, (4096, 32768, 131072))
            for r in report["decode"]:
                print(json.dumps(r), flush=True)
        if "quantize" not in report["failed"]:
            k, v = (
                mx.array(rng.standard_normal((1, 8, 1, 128)).astype(np.float16)) for _ in range(2)
            )
            # As the cache does with smoothed keys: key offset and channel scale in the kernel.
            off, cs = mx.zeros((1, 8, 1, 128)), mx.ones((1, 8, 1, 128))
            step = lambda: [quantize_rows(k, 4, 0, off, cs), quantize_rows(v, 4, 0)]  # noqa: E731
            report["quantize_step_ms"] = median_ms(step)
            report["quantize_step_pipe"] = median_ms(step, runs=20, batch=10)
            print(
                "quantize step (K+V, 8 heads, 1 token) ms:",
                report["quantize_step_ms"],
                "pipelined:",
                report["quantize_step_pipe"],
            )

    print(f"total {time.time() - t0:.0f} s; failed: {report['failed'] or 'none'}", flush=True)
    save(report, args.out)


if __name__ == "__main__":
    main()
