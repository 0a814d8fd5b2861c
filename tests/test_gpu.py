"""The GPU kernels against float64 NumPy on the same packed data (Metal or CUDA).

Run on a GPU: `MLX_ENABLE_TF32=0 python -m pytest -m gpu tests/test_gpu.py` (MLX runs float32
matmuls as TF32 on CUDA and M5 by default; the decoded path rotates its queries with one).
Skipped where `mlx_tq.kernels.backend()` is None (CPU, CI): test_kernels.py and
test_attention.py check the plain-ops references there.
"""

import functools
import math
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from mlx_tq import attention, kernels, quant, quantize, quantize_kv, scaled_dot_product_attention
from mlx_tq.attention import FUSED_MAX_ROWS, _decoded_attention, _fused_attention
from mlx_tq.codebook import codebook
from mlx_tq.quant import TurboQuantized, decode_rotated
from mlx_tq.rotation import rotation_matrix

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(kernels.backend() is None, reason="needs a GPU running mlx_tq's kernels"),
]

TOL_ATTENTION = 1e-3  # max |error| / max |ref| of the fused kernel
TOL_SCALE = 1e-6  # relative error of a stored scale
TIE = 1e-5  # |z - midpoint| below which float32 rounding may pick either level
LAYERS = 32  # Llama-3.1-8B, for the prefill memory bound
ROUNDING = {mx.float16: 2.0**-10, mx.bfloat16: 2.0**-8}


def f64(a):
    return np.array(a.astype(mx.float32), np.float64)


def normal(rng, shape, dtype=mx.float32):
    return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def indices64(data, bits, dim):
    """Codebook indices (..., D) of packed rows (..., W + 1), read from the bit stream in
    NumPy (element i in bits [i * bits, (i + 1) * bits), LSB first), not by mlx_tq."""
    words = np.ascontiguousarray(np.array(data[..., :-1]))
    stream = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
    fields = stream[..., : dim * bits].reshape(*words.shape[:-1], dim, bits)
    idx = np.zeros(fields.shape[:-1], np.int64)
    for b in range(bits):
        idx |= fields[..., b].astype(np.int64) << b
    return idx


def scales64(data):
    return np.array(data[..., -1]).view(np.float32).astype(np.float64)


def rows64(t: TurboQuantized):
    """t's vectors in the rotated space, float64 (B, H, S, D)."""
    levels = f64(codebook(t.bits, t.dim)[0])
    return levels[indices64(t.data, t.bits, t.dim)] * scales64(t.data)[..., None]


def packed_view(rng, B, H, S, D, bits, seed, pad, keys=True, smooth=False):
    """TurboQuantized (B, H, S, D) whose data is a view into a buffer of S + pad rows, as a
    cache hands it over: keys with an offset (and a channel scale if `smooth`), values plain."""
    x = normal(rng, (B, H, S + pad, D))
    offset = normal(rng, (B, H, 1, D)) if keys else None
    scale = mx.exp(0.5 * normal(rng, (B, H, 1, D))) if smooth else None
    t = quantize(x, bits, seed, offset=offset, channel_scale=scale, check_finite=False)
    mx.eval(t.data)
    return t.tokens(0, S)


def seen_matrix(mask, L, S):
    """Which keys each query sees, (L, S) bool; mask None, "causal" or a (L, S) array."""
    if mask is None:
        return np.ones((L, S), bool)
    if isinstance(mask, str):
        return np.arange(S)[None] <= np.arange(S - L, S)[:, None]
    m = np.array(mask.astype(mx.float32) if mask.dtype != mx.bool_ else mask)
    return m if m.dtype == bool else m != -np.inf


def attention_f64(queries, keys, values, scale, mask):
    """Softmax attention in float64 on the packed data, in the rotated space. A value row
    that is not finite spoils (NaN) the queries that see it and adds nothing to the others."""
    B, Hq, L, D = queries.shape
    Hkv, S = keys.shape[1:3]
    G = Hq // Hkv
    q = f64(queries) * scale
    if keys.channel_scale is not None:  # <q, s * k'> = <q * s, k'>
        q = q * np.repeat(f64(keys.channel_scale), G, axis=1)
    # Query head h * G + g, token i -> row g * L + i of KV head h.
    q = (q @ f64(rotation_matrix(D, keys.seed))).reshape(B, Hkv, G * L, D)
    k, v = rows64(keys), rows64(values)
    seen = np.tile(seen_matrix(mask, L, S), (G, 1))
    s = np.where(seen, q @ k.swapaxes(-1, -2), -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    bad = ~np.isfinite(v).all(-1)
    out = (p / p.sum(-1, keepdims=True)) @ np.where(bad[..., None], 0, v)
    out = np.where((seen & bad[:, :, None]).any(-1)[..., None], np.nan, out)
    return (out @ f64(rotation_matrix(D, values.seed)).T).reshape(B, Hq, L, D)


def tol_fused(D, key_bits, value_bits):
    """The fused kernel's tolerance: on the matrix units (attention._use_mma) its queries,
    levels and weights are fp16, three more roundings."""
    mma = attention._use_mma(D, key_bits, value_bits)
    return TOL_ATTENTION + (3 * ROUNDING[mx.float16] if mma else 0.0)


def rel_err(got, ref):
    return float(np.abs(f64(got) - ref).max() / np.abs(ref).max())


# (key bits, value bits): every width as keys and as values, one launch for both.
KV_BITS = [(2, 4), (3, 2), (4, 3), (8, 5)]
DIMS = [64, 80, 128, 256]  # 80: a partial SIMD group


def check_quantize_kv(rng, D, key_bits, value_bits, dtype, offset, scale, strided):
    B, H, L = int(rng.integers(1, 3)), int(rng.integers(1, 9)), int(rng.integers(1, 40))
    if strided:  # mlx-lm's keys are (B, L, H, D) transposed
        keys, values = (normal(rng, (B, L, H, D), dtype).swapaxes(1, 2) for _ in range(2))
    else:
        keys, values = (normal(rng, (B, H, L, D), dtype) for _ in range(2))
    offset = normal(rng, (B, H, 1, D)) if offset else None
    scale = mx.exp(0.5 * normal(rng, (B, H, 1, D))) if scale else None
    got = quantize_kv(keys, values, key_bits, value_bits, 3, offset, scale)
    k64 = f64(keys) - (0 if offset is None else f64(offset))
    k64 = k64 / (1 if scale is None else f64(scale))
    for data, x64, bits in ((got[0], k64, key_bits), (got[1], f64(values), value_bits)):
        assert data.dtype == mx.uint32 and data.shape == (B, H, L, -(-D * bits // 32) + 1)
        norms = np.linalg.norm(x64, axis=-1, keepdims=True)
        z = x64 / norms @ f64(rotation_matrix(D, 3)) * math.sqrt(D)
        levels, bounds = (f64(a) for a in codebook(bits, D))
        want = np.searchsorted(bounds, z)  # #{boundaries < z}
        idx = indices64(data, bits, D)
        diff = idx != want
        # A tie: one level apart, z within TIE of the midpoint between them.
        lo = np.minimum(np.minimum(idx, want)[diff], len(bounds) - 1)
        tie = (np.abs(idx - want)[diff] == 1) & (np.abs(z[diff] - bounds[lo]) < TIE)
        assert tie.all(), f"{int((~tie).sum())} of {idx.size} indices off, away from a midpoint"
        scale64 = norms[..., 0] / np.linalg.norm(levels[idx], axis=-1)
        err = np.abs(scales64(data) - scale64) / scale64
        assert err.max() <= TOL_SCALE, f"scale error {err.max():.2e}"


# Each case builds one kernel variant (on CUDA each costs a compile): the dtype and the key
# scale alternate across cases, so every D and every width meets both.
@pytest.mark.parametrize("key_bits, value_bits", KV_BITS)
@pytest.mark.parametrize("D", DIMS)
def test_quantize_kv_matches_float64(D, key_bits, value_bits):
    """Indices are float64's nearest levels except at a midpoint (to float32 rounding);
    scales norm / |c[idx]| within 1e-6 of float64; keys with and without their offset and
    key scale, contiguous and transposed."""
    i, j = DIMS.index(D), KV_BITS.index((key_bits, value_bits))
    dtype = mx.float16 if j % 2 == 0 else mx.bfloat16
    scaled = (i + j) % 2 == 1
    rng = np.random.default_rng([D, key_bits])
    for offset, strided in ((scaled, False), (True, True)):
        check_quantize_kv(rng, D, key_bits, value_bits, dtype, offset, scaled, strided)


@pytest.mark.parametrize("one_row", [0, 10**6], ids=["rows-per-group", "one-row"])
def test_quantize_kv_rows_per_threadgroup(one_row, monkeypatch):
    """The same float64 checks with QUANTIZE_ROWS rows per threadgroup and with one (a
    decode step's few rows), whatever the case's row count."""
    monkeypatch.setattr(quant, "QUANTIZE_ONE_ROW", one_row)
    monkeypatch.setattr(
        quant, "_quantize_call", functools.lru_cache(quant._quantize_call.__wrapped__)
    )
    rng = np.random.default_rng(11)
    check_quantize_kv(rng, 128, 4, 3, mx.float16, True, True, False)
    check_quantize_kv(rng, 80, 3, 2, mx.bfloat16, True, False, True)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_decode_step_shifts_the_window_in_the_quantise_launch(dtype):
    """A decode step's quantise launch also returns the cache's window shifted by one row:
    exactly mlx-lm's plain cache's last W keys and values, and the same packed rows as the
    launch without a window; a step in another dtype than the window's takes the ops path."""
    from mlx_lm.models.cache import KVCache

    from mlx_tq.cache import TurboQuantKVCache

    rng = np.random.default_rng(5)
    B, H, D, W = 2, 3, 64, 4
    ours, bare, plain = (
        TurboQuantKVCache(warmup_tokens=0, recent_tokens=W),
        TurboQuantKVCache(warmup_tokens=0, recent_tokens=0),
        KVCache(),
    )
    for L in (6, 1, 1, 1):
        k, v = (normal(rng, (B, H, L, D), dtype) for _ in range(2))
        ours.update_and_fetch(k, v)
        bare.update_and_fetch(k, v)
        plain.update_and_fetch(k, v)
        n = plain.offset
        assert mx.array_equal(ours.keys[..., :n, :], bare.keys[..., :n, :])
        assert mx.array_equal(ours.values[..., :n, :], bare.values[..., :n, :])
        assert all(w.dtype == dtype and w.shape == (B, H, W, D) for w in ours._window)
        assert mx.array_equal(ours._window[0], plain.keys[..., n - W : n, :])
        assert mx.array_equal(ours._window[1], plain.values[..., n - W : n, :])
    k = normal(rng, (B, H, 1, D), mx.float32)  # another dtype than the window's
    ours.update_and_fetch(k, k)
    plain.update_and_fetch(k.astype(dtype), k.astype(dtype))
    n = plain.offset
    assert mx.array_equal(ours._window[0], plain.keys[..., n - W : n, :])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("D", DIMS)
def test_decode_rotated_matches_float64(D, bits):
    """The dequantise kernel (prefill's decoded keys and values): c[idx] * scale / 2^shift,
    within one rounding of the dtype of float64 (a view of a larger buffer, read in place);
    float16 with the decoded path's shift, or bfloat16, alternating."""
    fp16 = (DIMS.index(D) + [2, 3, 4, 8].index(bits)) % 2 == 0
    dtype = mx.float16 if fp16 else mx.bfloat16
    shift = math.ceil(math.log2(D) / 2) if fp16 else 0
    rng = np.random.default_rng([D, bits])
    t = packed_view(rng, 2, 3, int(rng.integers(1, 3000)), D, bits, 0, pad=17)
    got = decode_rotated(t, dtype, shift)
    assert got.shape == t.shape and got.dtype == dtype
    ref = rows64(t) * 2.0**-shift
    err = np.abs(f64(got) - ref) / np.abs(ref)
    assert err.max() <= ROUNDING[dtype], f"relative error {err.max():.2e}"


FIXED = [  # (B, Hkv, G, L, S, D, key bits, value bits)
    (1, 8, 4, 1, 4096, 128, 4, 4),
    (1, 8, 4, 1, 4096, 128, 3, 3),
    (1, 2, 4, 1, 131072, 128, 4, 4),
    (1, 1, 8, 1, 131072, 256, 3, 2),
    (1, 2, 1, 1, 131071, 64, 4, 3),
    (1, 1, 8, 8, 32769, 128, 4, 4),
    (2, 2, 4, 1, 1, 128, 3, 4),
    (1, 2, 4, 300, 5000, 128, 4, 4),
    (1, 2, 4, 3, 4097, 80, 4, 4),
    (2, 1, 2, 1, 1000, 192, 3, 4),
    (1, 1, 4, 1, 4097, 256, 5, 4),  # Gemma-3's sliding layers under kv_bits=4 (K5 V4)
]


def random_configs(n=12, seed=0):
    """A seeded sample of shapes, key counts straddling the SIMD width and the tiles."""
    rng = np.random.default_rng(seed)
    sizes = [1, 2, 31, 63, 64, 65, 127, 128, 129, 1000, 4095, 4097, 8193, 32767]
    configs = []
    for _ in range(n):
        B, Hkv, G = int(rng.integers(1, 3)), int(rng.choice([1, 2, 8])), int(rng.choice([1, 4, 8]))
        L, S = int(rng.choice([1, 1, 2, 5, 8])), int(rng.choice(sizes))
        D, kb, vb = int(rng.choice([64, 128, 256])), *(int(b) for b in rng.choice([2, 3, 4], 2))
        configs.append((B, Hkv, G, min(L, S), S, D, kb, vb))  # causal rows need a key: L <= S
    return configs


CONFIGS = [
    (*c, mx.float16 if i % 2 == 0 else mx.bfloat16, (i // 2) % 2 == 1)
    for i, c in enumerate(FIXED + random_configs())
]


def config_id(c):
    B, Hkv, G, L, S, D, kb, vb, dtype, smooth = c
    kind = "fp16" if dtype == mx.float16 else "bf16"
    return f"B{B}-H{Hkv}-G{G}-L{L}-S{S}-D{D}-k{kb}v{vb}-{kind}" + ("-smooth" if smooth else "")


@pytest.mark.parametrize("config", CONFIGS, ids=[config_id(c) for c in CONFIGS])
def test_attention_matches_float64(config):
    """The fused kernel (split-K + merge) on float32 queries within 1e-3 of float64; the
    decoded path (mx.fast SDPA) within 6 roundings of the query dtype (queries, keys and values
    each rounded to it, as in an fp16 cache); the public call within the path it takes."""
    B, Hkv, G, L, S, D, kb, vb, dtype, smooth = config
    rng = np.random.default_rng([B, Hkv, G, L, S, D, kb, vb])
    keys = packed_view(rng, B, Hkv, S, D, kb, 0, int(rng.integers(1, 300)), smooth=smooth)
    values = packed_view(rng, B, Hkv, S, D, vb, 1, int(rng.integers(1, 300)), keys=False)
    queries = normal(rng, (B, Hkv * G, L, D), dtype)
    scale, causal = D**-0.5, L > 1
    mask = "causal" if causal else None
    q32 = queries.astype(mx.float32)
    ref = attention_f64(q32, keys, values, scale, mask)
    err = rel_err(_fused_attention(q32, keys, values, scale, causal), ref)
    err_decoded = rel_err(_decoded_attention(queries, keys, values, scale, mask), ref)
    public = scaled_dot_product_attention(queries, keys, values, scale, mask)
    assert public.dtype == dtype and public.shape == queries.shape
    err_public = rel_err(public, ref)
    tol_decoded = 6 * ROUNDING[dtype]
    tol = tol_fused(D, kb, vb)
    tol_public = tol_decoded if L > FUSED_MAX_ROWS else tol + ROUNDING[dtype]
    errors = f"fused {err:.2e}, decoded {err_decoded:.2e}, public {err_public:.2e}"
    assert err <= tol and err_decoded <= tol_decoded, errors
    assert err_public <= tol_public, errors


def test_merge_shifts_by_the_max_of_every_split(monkeypatch):
    """Each query's one loud key (score ~2,400) sits in a late split, 71 splits of 64-dim rows:
    split 39 (staged by the merge's second SIMD-group) and split 66 (past its 64 threads, a
    second round of staging). Shifting by any max but the largest overflows exp. (On the
    matrix units a split is a threadgroup of 4 SIMD-groups of 32 keys each here, merged in
    the attention kernel: its loud key in SIMD-group 0 of split 39 and 2 of split 66.)"""
    monkeypatch.setattr(attention, "MMA_MIN_KEYS", 32)
    S, D = 9000, 64
    rng = np.random.default_rng(9)
    queries = normal(rng, (1, 2, 1, D))
    x = np.asarray(rng.standard_normal((1, 1, S, D)), np.float32)
    x[0, 0, 5000], x[0, 0, 8500] = 300 * np.array(queries[0, :, 0])
    keys = quantize(mx.array(x), 4, 0, check_finite=False)
    values = quantize(normal(rng, (1, 1, S, D)), 4, 1, check_finite=False)
    assert (
        attention._fused_plan(
            mx.float32, 1, 2, 1, 1, D, 4, 4, (0, 1), False, False, D**-0.5, 0
        ).splits(S)
        == 71
    )
    ref = attention_f64(queries, keys, values, D**-0.5, None)
    err = rel_err(_fused_attention(queries, keys, values, D**-0.5, False), ref)
    assert err <= tol_fused(D, 4, 4)


RECENT = [  # (B, Hkv, G, L, S, D, key bits, value bits, window): E = min(S, window - 1 + L)
    (1, 8, 4, 1, 4096, 128, 4, 4, 4),
    (1, 2, 4, 5, 1000, 128, 4, 4, 4),
    (2, 1, 2, 8, 129, 256, 5, 4, 16),
    (1, 2, 1, 3, 300, 80, 3, 3, 1),
    (1, 1, 8, 8, 9, 64, 4, 2, 4),  # fewer keys than window - 1 + L: all of them recent
    (1, 1, 2, 20, 600, 128, 4, 4, 4),  # a prefill chunk: packed rows only
]


def attention_recent_f64(queries, keys, values, scale, mask):
    """attention_f64 where query i of L <= FUSED_MAX_ROWS takes the keys and values of its
    `window` newest positions from the exact recent rows (E of them, the last positions)."""
    B, Hq, L, D = queries.shape
    Hkv, S = keys.shape[1:3]
    E, W, G = keys.recent.shape[2], keys.window, Hq // Hkv
    q = f64(queries) * scale
    if keys.channel_scale is not None:
        q = q * np.repeat(f64(keys.channel_scale), G, axis=1)
    rk, rv = (f64(rotation_matrix(D, t.seed)) for t in (keys, values))
    q = (q @ rk).reshape(B, Hkv, G, L, D)
    exact_k = f64(keys.recent) - (0 if keys.offset is None else f64(keys.offset))
    exact_k = exact_k / (1 if keys.channel_scale is None else f64(keys.channel_scale)) @ rk
    exact_v = f64(values.recent) @ rv
    seen = seen_matrix(mask, L, S)
    out = np.zeros((B, Hkv, G, L, D))
    for i in range(L):
        k, v = rows64(keys), rows64(values)
        near = np.arange(S - E, S) >= S - L + i - W + 1  # in the window, among the recent rows
        near &= L <= FUSED_MAX_ROWS  # a prefill chunk reads packed rows only
        k[:, :, S - E :][:, :, near] = exact_k[:, :, near]
        v[:, :, S - E :][:, :, near] = exact_v[:, :, near]
        s = np.where(seen[i], q[:, :, :, i] @ k.swapaxes(-1, -2), -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, :, :, i] = (p / p.sum(-1, keepdims=True)) @ v
    return (out @ rv.T).reshape(B, Hq, L, D)


@pytest.mark.parametrize("config", RECENT, ids=[str(c) for c in RECENT])
def test_recent_window_matches_float64(config):
    """Keys and values with exact recent rows (unrelated to their packed words, so that a
    mix-up shows): the fused kernel, the decoded path and the public call against float64."""
    B, Hkv, G, L, S, D, kb, vb, W = config
    rng = np.random.default_rng(list(config))
    E = min(S, W - 1 + L)
    keys = packed_view(rng, B, Hkv, S, D, kb, 0, 7, smooth=True)
    values = packed_view(rng, B, Hkv, S, D, vb, 1, 7, keys=False)
    recent = [normal(rng, (B, Hkv, E, D), mx.float16) for _ in range(2)]
    keys = replace(keys, recent=recent[0], window=W, dtype=mx.float16)
    values = replace(values, recent=recent[1], window=W, dtype=mx.float16)
    queries = normal(rng, (B, Hkv * G, L, D), mx.float16)
    scale, mask = D**-0.5, "causal" if L > 1 else None
    ref = attention_recent_f64(queries.astype(mx.float32), keys, values, scale, mask)
    public = rel_err(scaled_dot_product_attention(queries, keys, values, scale, mask), ref)
    decoded = rel_err(_decoded_attention(queries, keys, values, scale, mask), ref)
    errors = f"public {public:.2e}, decoded {decoded:.2e}"
    if L <= FUSED_MAX_ROWS:
        fused = _fused_attention(queries.astype(mx.float32), keys, values, scale, L > 1)
        errors += f", fused {rel_err(fused, ref):.2e}"
        assert rel_err(fused, ref) <= tol_fused(D, kb, vb), errors
    assert decoded <= 6 * ROUNDING[mx.float16], errors
    assert public <= tol_fused(D, kb, vb) + 6 * ROUNDING[mx.float16], errors


# The configs the matrix units take (attention._use_mma on CUDA) as decode (fused) calls.
MERGED = [c for c in CONFIGS if c[6] == c[7] and 2 <= c[6] <= 4 and c[5] % 16 == 0 and c[3] <= 8]


@pytest.mark.skipif(kernels.backend() != "cuda", reason="matrix units: CUDA only")
@pytest.mark.parametrize("config", MERGED, ids=[config_id(c) for c in MERGED])
def test_attention_merged_in_the_launch_matches_float64(config, monkeypatch):
    """attention.MMA_MERGE (off by default: its timings were mixed): the matrix units' launch merges
    its splits itself (the last threadgroup of each head), for the configs that take it."""
    monkeypatch.setattr(attention, "MMA_MERGE", True)  # (a plan of its own: _switches)
    test_attention_matches_float64(config)


@pytest.mark.skipif(kernels.backend() != "cuda", reason="matrix units: CUDA only")
@pytest.mark.parametrize("recent", [None, *RECENT[:5]], ids=["merge-shifts", *map(str, RECENT[:5])])
def test_recent_window_merged_in_the_launch_matches_float64(recent, monkeypatch):
    """As test_attention_merged_in_the_launch_matches_float64: the loud late splits and
    the exact recent window."""
    monkeypatch.setattr(attention, "MMA_MERGE", True)
    if recent is None:
        test_merge_shifts_by_the_max_of_every_split(monkeypatch)
    else:
        test_recent_window_matches_float64(recent)


# Causal rows with L > 8 on the matrix units: a block of 8 rows that does not hold the last
# query stops before S, so a split's end is trimmed off a step boundary (decode_attention_mma's
# loop loads a step ahead), below its begin for the last splits, or inside a split of several
# steps (few SIMD-groups); S < 32 too.
TRIMMED = [
    (1, 1, 1, 20, 100, 64, 4, 4, mx.float16, False),  # block 0: stop 88, split 3 [96, 88)
    (1, 2, 2, 12, 77, 128, 3, 3, mx.bfloat16, True),  # block 0: stop 73
    (1, 1, 1, 16, 250, 64, 2, 2, mx.float16, False),  # block 0: stop 242, in a 2-step split
    (1, 1, 1, 16, 20, 64, 4, 4, mx.float16, False),  # S < 32: block 0 stop 12, block 1 20
]


@pytest.mark.skipif(kernels.backend() != "cuda", reason="matrix units: CUDA only")
@pytest.mark.parametrize("merge", [False, True], ids=["mma", "mma-merge"])
@pytest.mark.parametrize("warps", [2048, 4], ids=["splits", "few-splits"])
@pytest.mark.parametrize("config", TRIMMED, ids=[config_id(c) for c in TRIMMED])
def test_mma_causal_trimmed_end_matches_float64(config, warps, merge, monkeypatch):
    monkeypatch.setattr(attention, "MMA", True)
    monkeypatch.setattr(attention, "MMA_MERGE", merge)
    monkeypatch.setattr(attention, "MMA_MIN_KEYS", 32)
    monkeypatch.setattr(attention, "MMA_TARGET_WARPS", warps)
    B, Hkv, G, L, S, D, kb, vb, dtype, smooth = config
    rng = np.random.default_rng([B, Hkv, G, L, S, D, kb, vb])
    keys = packed_view(rng, B, Hkv, S, D, kb, 0, 5, smooth=smooth)
    values = packed_view(rng, B, Hkv, S, D, vb, 1, 5, keys=False)
    q = normal(rng, (B, Hkv * G, L, D), dtype).astype(mx.float32)
    ref = attention_f64(q, keys, values, D**-0.5, "causal")
    err = rel_err(_fused_attention(q, keys, values, D**-0.5, True), ref)
    assert err <= tol_fused(D, kb, vb), err


@pytest.mark.skipif(kernels.backend() != "cuda", reason="matrix units: CUDA only")
@pytest.mark.parametrize("merge", [False, True], ids=["mma", "mma-merge"])
@pytest.mark.parametrize("L", [1, 3])
def test_mma_left_padding_past_whole_splits(L, merge, monkeypatch):
    """test_fused_left_padding_matches_float64 with one threadgroup of 4 SIMD-groups of 96
    keys each: the row that starts at key 137 has no visible key in the first."""
    monkeypatch.setattr(attention, "MMA", True)
    monkeypatch.setattr(attention, "MMA_MERGE", merge)
    monkeypatch.setattr(attention, "MMA_MIN_KEYS", 32)
    monkeypatch.setattr(attention, "MMA_TARGET_WARPS", 8)
    test_fused_left_padding_matches_float64(L)


# Packed rows all inside the exact window (the kernel's S = 0: no split has keys) and a few
# packed rows, L 1 and 2, on the matrix units.
EMPTY = [(1, 1, 4, 1, 3, 64, 4, 4, 4), (2, 1, 4, 2, 5, 64, 3, 3, 8), (1, 2, 2, 2, 9, 64, 2, 2, 4)]


@pytest.mark.skipif(kernels.backend() != "cuda", reason="matrix units: CUDA only")
@pytest.mark.parametrize("merge", [False, True], ids=["mma", "mma-merge"])
@pytest.mark.parametrize("config", EMPTY, ids=map(str, EMPTY))
def test_mma_window_holds_every_row(config, merge, monkeypatch):
    monkeypatch.setattr(attention, "MMA", True)
    monkeypatch.setattr(attention, "MMA_MERGE", merge)
    test_recent_window_matches_float64(config)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_cache_decode_step_through_mlx_lm_matches_float64(dtype):
    """Decode steps of a cache with a window, attended as a model does (mlx-lm's patched
    function with the cache, which takes the step's keys straight to the fused kernel)
    against float64 of the same packed rows and window; with a mask array (the general
    path), and for keys that are not the step's own."""
    import mlx_lm.models.base as base

    from mlx_tq import patch, unpatch
    from mlx_tq.cache import TurboQuantKVCache

    rng = np.random.default_rng(11)
    B, Hkv, G, D, W = 2, 2, 3, 128, 4
    cache = TurboQuantKVCache(4, 3, smooth_keys=0.5, warmup_tokens=0, recent_tokens=W)
    cache.update_and_fetch(*(normal(rng, (B, Hkv, 200, D), dtype) for _ in range(2)))
    tol = TOL_ATTENTION + 4 * ROUNDING[dtype]
    patch()
    try:
        for mask in (None, "causal", mx.array([[True] * 203])):
            new = [normal(rng, (B, Hkv, 1, D), dtype) for _ in range(2)]
            keys, values = cache.update_and_fetch(*new)
            assert cache._step() is keys.data and keys.recent.shape[2] == W
            q = normal(rng, (B, Hkv * G, 1, D), dtype)
            out = base.scaled_dot_product_attention(
                q, keys, values, cache=cache, scale=D**-0.5, mask=mask
            )
            ref = attention_recent_f64(q.astype(mx.float32), keys, values, D**-0.5, None)
            assert out.dtype == dtype and rel_err(out, ref) <= tol
        other = replace(keys, recent=mx.zeros_like(keys.recent))
        out = base.scaled_dot_product_attention(q, other, values, cache, D**-0.5, None)
        ref = attention_recent_f64(q.astype(mx.float32), other, values, D**-0.5, None)
        assert rel_err(out, ref) <= tol
    finally:
        unpatch()


@pytest.mark.parametrize("fold", [False, True], ids=["", "fold"])
def test_repeated_decode_steps_equal_the_general_path(fold, monkeypatch):
    """A cache's decode steps after the first repeat that step's launch and attention plan
    (issue 15), the token quantised in the merge launch (merge_quantize): the same packed
    rows, window and attention output as a twin that takes the general path every step,
    across the buffer's growth at 256 rows and a trim."""
    import mlx_lm.models.base as base

    from mlx_tq import patch, unpatch
    from mlx_tq.cache import TurboQuantKVCache

    monkeypatch.setattr(attention, "FOLD", fold)
    rng = np.random.default_rng(13)
    B, Hkv, G, D, W = 1, 2, 2, 64, 4
    fast, slow = (
        TurboQuantKVCache(4, 3, smooth_keys=0.5, warmup_tokens=0, recent_tokens=W) for _ in range(2)
    )
    k0 = normal(rng, (B, Hkv, 253, D), mx.float16)
    for c in (fast, slow):
        c.update_and_fetch(k0, k0)
    patch()
    try:
        for i in range(7):  # offsets 254-258, a trim to 256, then 257-258
            if i == 5:
                assert fast.trim(2) == slow.trim(2) == 2
            new = [normal(rng, (B, Hkv, 1, D), mx.float16) for _ in range(2)]
            q = normal(rng, (B, Hkv * G, 1, D), mx.float16)
            slow._step_launch = slow._step_attention = None  # the general path
            launch = fast._step_launch
            got = []
            for c in (fast, slow):
                keys, values = c.update_and_fetch(*new)
                out = base.scaled_dot_product_attention(q, keys, values, c, D**-0.5, None)
                # (a step's own packed row is written after its attention launch: the
                # fast keys' last row is not yet the token's, nor read; the state is)
                rows = (keys.data[..., :-1, :], values.data[..., :-1, :])
                got.append((*rows, keys.recent, values.recent, out, *c.state[:2]))
            assert fast.offset == slow.offset and fast.keys.shape == slow.keys.shape
            assert all(mx.array_equal(a, b) for a, b in zip(*got, strict=True))
            # Repeated where nothing changed (not the first step, nor the buffer's growth).
            assert (fast._step_launch is launch) == (i not in (0, 3))
    finally:
        unpatch()


@pytest.mark.parametrize("D, kb, vb, smooth", [(64, 4, 3, 0.5), (96, 3, 3, 0.0)])
def test_decode_step_quantises_in_the_merge_launch(D, kb, vb, smooth, monkeypatch):
    """A decode step's token is quantised by its merge launch (merge_quantize), its rows
    written at the next update: outputs, windows and the settled state equal a twin's on
    the general path; so do steps whose attention never runs (the next update, `trim`,
    `state`, `nbytes` or a read of `recent` quantise the token instead), a step attended
    twice, and keys transposed as a model's (strided on a GPU: the emulator copies them)."""
    import mlx_lm.models.base as base

    from mlx_tq import patch, unpatch
    from mlx_tq.cache import TurboQuantKVCache

    monkeypatch.setattr(attention, "FOLD", True)
    folds = []
    launch = attention._fold_launch
    monkeypatch.setattr(attention, "_fold_launch", lambda *a: folds.append(1) or launch(*a))
    rng = np.random.default_rng(21)
    B, Hkv, G, W = 2, 2, 2, 3
    fast, slow = (
        TurboQuantKVCache(kb, vb, smooth_keys=smooth, warmup_tokens=0, recent_tokens=W)
        for _ in range(2)
    )
    k0, v0 = (normal(rng, (B, Hkv, 40, D), mx.float16) for _ in range(2))
    for c in (fast, slow):
        c.update_and_fetch(k0, v0)
    patch()
    try:
        # What happens after each step's update: "attend" (the fold), "skip" (no attention:
        # the next update settles), "recent" (recent read before attending), "twice",
        # "trim", "state", "nbytes".
        plan = ["attend", "attend", "skip", "attend", "recent", "twice", "attend", "trim"]
        plan += ["attend", "skip", "skip", "state", "attend", "nbytes", "attend", "attend"]
        for i, what in enumerate(plan):
            # keys as a model's: (B, L, H, D) transposed, so strided
            new = [normal(rng, (B, 1, Hkv, D), mx.float16).transpose(0, 2, 1, 3) for _ in range(2)]
            q = normal(rng, (B, Hkv * G, 1, D), mx.float16)
            slow._step_launch = slow._step_attention = None  # the general path
            outs = []
            for c in (fast, slow):
                keys, values = c.update_and_fetch(*new)
                if what in ("skip", "trim", "state", "nbytes"):
                    continue
                if what == "recent":
                    assert keys.recent is not None  # settles the step
                out = base.scaled_dot_product_attention(q, keys, values, c, D**-0.5, None)
                if what == "twice":
                    again = base.scaled_dot_product_attention(q, keys, values, c, D**-0.5, None)
                    assert mx.array_equal(again, out)
                outs.append(out)
            if what == "trim":
                assert fast.trim(1) == slow.trim(1) == 1
            if what == "nbytes":
                assert fast.nbytes == slow.nbytes
            if len(outs) == 2:
                assert mx.array_equal(*outs), (i, what)
            assert fast.offset == slow.offset
            if what == "state" or i == len(plan) - 1:  # (else the next update settles)
                assert all(mx.array_equal(*ab) for ab in zip(fast.state, slow.state, strict=True))
        assert len(folds) >= plan.count("attend"), "steps left their token to another launch"
    finally:
        unpatch()


@pytest.mark.parametrize("fold", [False, True], ids=["", "fold"])
def test_deep_copy_mid_step_is_its_own(fold, monkeypatch):
    """A cache deep-copied between a decode step's update and its attention (mlx-lm's prompt
    cache copies caches) does not keep its original alive, nor take the original's pending
    step: its own next step equals a copy's on the general path."""
    import copy
    import gc
    import weakref

    import mlx_lm.models.base as base

    from mlx_tq import patch, unpatch
    from mlx_tq.cache import TurboQuantKVCache

    monkeypatch.setattr(attention, "FOLD", fold)
    rng = np.random.default_rng(22)

    def token():
        return normal(rng, (1, 2, 1, 64), mx.float16)

    cache = TurboQuantKVCache(4, 4, warmup_tokens=0, recent_tokens=3)
    k0 = normal(rng, (1, 2, 40, 64), mx.float16)
    cache.update_and_fetch(k0, k0)
    patch()
    try:
        for _ in range(3):  # steps that build the cache's step launches
            new, q = token(), normal(rng, (1, 4, 1, 64), mx.float16)
            keys, values = cache.update_and_fetch(new, new)
            base.scaled_dot_product_attention(q, keys, values, cache, 0.125, None)
        new = token()
        keys, values = cache.update_and_fetch(new, new)  # a step not attended yet
        twin, other = copy.deepcopy(cache), copy.deepcopy(cache)
        other._settle()
        other._step_launch = other._step_attention = None  # the general path
        pending = cache._new
        new, q = token(), normal(rng, (1, 4, 1, 64), mx.float16)
        outs = []
        for c in (twin, other):
            k, v = c.update_and_fetch(new, new)
            outs.append(base.scaled_dot_product_attention(q, k, v, c, 0.125, None))
        assert cache._new is pending, "a copy's step took its original's token"
        assert mx.array_equal(*outs)
        assert all(mx.array_equal(*ab) for ab in zip(twin.state, other.state, strict=True))
        original = weakref.ref(cache)
        del cache, keys, values, pending
        gc.collect()
        assert original() is None, "a deep copy keeps its original alive"
    finally:
        unpatch()


def test_cache_after_decode_steps_holds_no_fetched_keys_and_copies():
    """After decode steps (patched or not) the cache keeps nothing of what it handed out
    (unpatched: the layer's keys dequantised, an fp16 cache's worth), and deep-copies."""
    import copy
    import gc
    import weakref

    from mlx_tq import patch, unpatch
    from mlx_tq.cache import TurboQuantKVCache

    rng = np.random.default_rng(12)
    for patched in (False, True):
        cache = TurboQuantKVCache(warmup_tokens=0, recent_tokens=4)
        cache.update_and_fetch(*(normal(rng, (1, 2, 40, 64), mx.float16) for _ in range(2)))
        if patched:
            patch()
        try:
            keys, values = cache.update_and_fetch(*(normal(rng, (1, 2, 1, 64), mx.float16),) * 2)
            mx.eval(keys.data if patched else keys)
            twin = copy.deepcopy(cache)
            assert twin.offset == cache.offset == 41
            held = weakref.ref(keys.data if patched else keys)
            del keys, values
            gc.collect()
            assert held() is None, f"patched={patched}: the cache holds the fetched keys"
        finally:
            unpatch()


# Keys S and the bad value row j, chosen so that some queries cannot see j: with L = 8 and
# S = 129 (two tiles) the split holding j = 128 is entirely masked for queries 0-6.
NON_FINITE_ROWS = [(2, 1), (129, 128), (1000, 995)]
NON_FINITE_PATHS = [
    ("fused", "causal"),
    ("fused", None),
    ("decoded", "causal"),
    ("decoded", "bool"),
    ("decoded", "additive"),
]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("S, j", NON_FINITE_ROWS, ids=[f"S{s}-j{j}" for s, j in NON_FINITE_ROWS])
@pytest.mark.parametrize(
    "path, mask", NON_FINITE_PATHS, ids=[f"{p}-{m}" for p, m in NON_FINITE_PATHS]
)
@pytest.mark.parametrize("vb", [3, 4], ids=["v3", "v4"])
def test_masked_non_finite_value_adds_nothing(path, mask, S, j, bad, vb):
    """A key that a query cannot see adds nothing to it, whatever its value; the queries that
    see a non-finite value come out non-finite, as in an fp16 cache. The bad row is quantised
    by the kernel, as the cache does; KV head 1 is clean. (K4/V4 runs on the matrix units.)"""
    B, Hkv, G, L, D = 1, 2, 2, min(8, S), 128
    rng = np.random.default_rng([S, j, path == "fused"])
    v = np.array(normal(rng, (B, Hkv, S, D), mx.float16))
    v[0, 0, j, 5] = bad
    k, v = quantize_kv(normal(rng, (B, Hkv, S, D), mx.float16), mx.array(v), 4, vb)
    keys, values = TurboQuantized(k, 4, D, 0, mx.float16), TurboQuantized(v, vb, D, 0, mx.float16)
    bad_rows = np.argwhere(~np.isfinite(scales64(v))).tolist()
    assert bad_rows == [[0, 0, j]], f"non-finite scales at {bad_rows}, the bad value at {j}"
    if mask in ("bool", "additive"):  # j hidden from the first half of the queries
        seen = np.ones((L, S), bool)
        seen[: L // 2, j] = False
        hidden = mx.array(seen)
        mask = hidden if mask == "bool" else mx.where(hidden, 0, -mx.inf).astype(mx.float16)
    queries = normal(rng, (B, Hkv * G, L, D), mx.float16)
    scale = D**-0.5
    if path == "fused":
        out = _fused_attention(queries, keys, values, scale, mask is not None)
    else:
        out = _decoded_attention(queries, keys, values, scale, mask)
    out = f64(out)
    sees = seen_matrix(mask, L, S)[:, j]
    assert sees.any()
    assert np.isfinite(out[:, G:]).all(), "a clean KV head came out non-finite"
    assert np.isfinite(out[:, :G, ~sees]).all(), "a masked bad value reached a query"
    assert not np.isfinite(out[:, :G, sees]).any(), "a query that sees the bad value is finite"
    ref = attention_f64(queries.astype(mx.float32), keys, values, scale, mask)
    finite = np.isfinite(ref)
    fused_tol = tol_fused(D, 4, vb) + ROUNDING[mx.float16]
    tol = fused_tol if path == "fused" else 6 * ROUNDING[mx.float16]
    err = np.abs(out[finite] - ref[finite]).max() / np.abs(ref[finite]).max()
    assert err <= tol, f"error {err:.2e} on the queries that do not see the bad value"


def test_prefill_memory_bound():
    """L = 2048 causal queries over 32K TQ4 keys: the decoded path peaks below a quarter of
    the fp16 L x S scores (it never forms them), and over a 32-layer model, with every layer's
    packed cache held, stays below the fp16 cache of the same tokens. The fused kernel holds
    O(L D): its peak plus the packed layer stays below the fp16 layer."""
    S, L, Hkv, G, D = 32768, 2048, 8, 4, 128
    rng = np.random.default_rng(0)
    keys = packed_view(rng, 1, Hkv, S, D, 4, 0, pad=0)
    values = packed_view(rng, 1, Hkv, S, D, 4, 1, pad=0, keys=False)
    q = normal(rng, (1, Hkv * G, L, D), mx.float16)
    mx.eval(q, keys.data, values.data)

    def peak_above_inputs(attend):
        mx.synchronize()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(attend())
        return mx.get_peak_memory() - base

    peak = peak_above_inputs(
        lambda: scaled_dot_product_attention(q, keys, values, D**-0.5, "causal")
    )
    peak_fused = peak_above_inputs(lambda: _fused_attention(q, keys, values, D**-0.5, True))
    fp16_bytes = 2 * Hkv * S * D * 2
    packed = keys.data.nbytes + values.data.nbytes
    scores_bytes = Hkv * G * L * S * 2
    mb = f"decoded peak {peak / 2**20:.0f} MB, fused {peak_fused / 2**20:.0f} MB"
    assert peak < scores_bytes / 4, mb
    assert peak + LAYERS * packed < LAYERS * fp16_bytes, mb
    assert peak_fused + packed < fp16_bytes, mb


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kb, vb", [(3, 4), (4, 4)])
def test_fused_reads_rows_with_a_stride(causal, kb, vb, monkeypatch):
    """Packed rows that sit apart in their buffer (row stride > words per row), not only the
    adjacent rows of a cache, against float64: 3 splits of two tiles each (CUDA cores),
    8 splits of 3 steps (matrix units, K4/V4)."""
    monkeypatch.setattr(attention, "TARGET_GROUPS", 12)
    monkeypatch.setattr(attention, "MMA_TARGET_WARPS", 32)
    rng = np.random.default_rng(7)
    B, Hkv, G, L, S, D = 2, 2, 4, 2 if causal else 1, 700, 128
    keys = packed_view(rng, B, Hkv, S, D, kb, 0, 5, smooth=True)
    values = packed_view(rng, B, Hkv, S, D, vb, 1, 5, keys=False)
    keys, values = (
        replace(t, data=mx.pad(t.data, [(0, 0)] * 3 + [(0, 3)])[..., : t.data.shape[-1]])
        for t in (keys, values)
    )
    q = normal(rng, (B, Hkv * G, L, D))
    ref = attention_f64(q, keys, values, D**-0.5, "causal" if causal else None)
    err = rel_err(_fused_attention(q, keys, values, D**-0.5, causal), ref)
    assert err <= tol_fused(D, kb, vb)


@pytest.mark.parametrize("L", [1, 3])
def test_fused_left_padding_matches_float64(L):
    """A batch's left padding passed as each row's first visible key (as mlx_tq.patch does for
    TurboQuantBatchKVCache) against float64 with the same mask as an array."""
    rng = np.random.default_rng(L)
    B, Hkv, G, S, D = 3, 2, 4, 300, 128
    starts = [0, 5, 137]
    keys = packed_view(rng, B, Hkv, S, D, 4, 0, 7, smooth=True)
    values = packed_view(rng, B, Hkv, S, D, 4, 1, 7, keys=False)
    q = normal(rng, (B, Hkv * G, L, D))
    got = _fused_attention(q, keys, values, D**-0.5, L > 1, starts=mx.array(starts))
    # The starts read with their stride (a column of a wider int32 array): the same result.
    column = mx.array([[s, 299] for s in starts], mx.int32)[:, 0]
    strided = _fused_attention(q, keys, values, D**-0.5, L > 1, starts=column)
    assert mx.array_equal(strided, got).item()
    for b, start in enumerate(starts):
        mask = mx.array(seen_matrix("causal", L, S) & (np.arange(S) >= start)[None])
        kb = TurboQuantized(
            keys.data[b : b + 1], 4, D, 0, offset=keys.offset[b : b + 1],
            channel_scale=keys.channel_scale[b : b + 1],
        )  # fmt: skip
        vb = TurboQuantized(values.data[b : b + 1], 4, D, 1)
        ref = attention_f64(q[b : b + 1], kb, vb, D**-0.5, mask)
        assert rel_err(got[b : b + 1], ref) <= tol_fused(D, 4, 4), b
