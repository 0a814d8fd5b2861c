import math
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
import test_gpu

from mlx_tq import dequantize, quantize, scaled_dot_product_attention
from mlx_tq.attention import scaled_dot_product_attention_ops

TOLERANCE = {mx.float32: 1e-4, mx.float16: 2e-3, mx.bfloat16: 2e-2}


def attention_reference(q, k, v, scale, mask=None):
    """float64 softmax attention: q (B, Hq, L, D), k and v (B, Hkv, S, D), GQA by repetition."""
    q, k, v = (np.array(a.astype(mx.float32), np.float64) for a in (q, k, v))
    L, S = q.shape[2], k.shape[2]
    k, v = (np.repeat(a, q.shape[1] // k.shape[1], axis=1) for a in (k, v))
    scores = scale * q @ k.swapaxes(-1, -2)
    if isinstance(mask, str):
        mask = np.arange(S - L, S)[:, None] >= np.arange(S)[None]
    elif mask is not None:
        mask = np.array(mask.astype(mx.float32) if mask.dtype != mx.bool_ else mask)
    if mask is not None and mask.dtype == bool:
        scores = np.where(mask, scores, -np.inf)
    elif mask is not None:
        scores = scores + mask
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def make_inputs(B, Hq, Hkv, L, S, D, dtype=mx.float32, seed=0):
    keys = [mx.random.key(seed + i) for i in range(3)]
    q = mx.random.normal((B, Hq, L, D), key=keys[0]).astype(dtype)
    k = mx.random.normal((B, Hkv, S, D), key=keys[1]).astype(dtype)
    v = mx.random.normal((B, Hkv, S, D), key=keys[2]).astype(dtype)
    return q, k, v


def check(q, kq, vq, scale, mask=None, **kwargs):
    out = scaled_dot_product_attention(q, kq, vq, scale, mask, **kwargs)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = attention_reference(q, dequantize(kq), dequantize(vq), scale, mask)
    tol = TOLERANCE[q.dtype]
    out = np.array(out.astype(mx.float32))
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol * np.abs(ref).max())


@pytest.mark.parametrize("L", [1, 7])
@pytest.mark.parametrize("groups", [1, 4, 8])
@pytest.mark.parametrize("S", [1, 31, 32, 33, 1000, 5000])
def test_matches_reference(S, groups, L):
    L = min(L, S)
    q, k, v = make_inputs(1, 2 * groups, 2, L, S, 128, seed=S + groups)
    mask = "causal" if L > 1 else None
    check(q, quantize(k, 4), quantize(v, 4), 128**-0.5, mask)


@pytest.mark.parametrize("D", [64, 80, 96, 112, 192, 256])
def test_head_dims_and_bits(D):
    q, k, v = make_inputs(2, 4, 2, 5, 40, D, seed=D)
    check(q, quantize(k, 4), quantize(v, 2, seed=1), 2 * D**-0.5, "causal")
    check(q, quantize(k, 3, seed=2), quantize(v, 5), D**-0.5)


@pytest.mark.parametrize("shape", ["LS", "B1LS", "BHLS"])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_array_masks(kind, shape):
    B, Hq, L, S = 2, 4, 6, 45
    q, k, v = make_inputs(B, Hq, 2, L, S, 64)
    mask_shape = {"LS": (L, S), "B1LS": (B, 1, L, S), "BHLS": (B, Hq, L, S)}[shape]
    rng = np.random.default_rng(0)
    if kind == "bool":
        mask = rng.random(mask_shape) < 0.6
        mask[..., -1] = True  # every query keeps a key
        mask = mx.array(mask)
    else:
        mask = mx.array(rng.standard_normal(mask_shape).astype(np.float32) * 3)
    check(q, quantize(k, 4), quantize(v, 4), 0.125, mask)
    check(q, quantize(k, 4), quantize(v, 4), 0.125, mask, chunk_size=16)


@pytest.mark.parametrize("chunk_size", [1, 7, 32, 100])
def test_chunks_merge(chunk_size):
    q, k, v = make_inputs(1, 8, 2, 9, 100, 128, seed=chunk_size)
    kq, vq = quantize(k, 4), quantize(v, 3)
    check(q, kq, vq, 0.2, "causal", chunk_size=chunk_size)
    mask = mx.array(np.random.default_rng(1).standard_normal((9, 100)).astype(np.float32))
    check(q, kq, vq, 0.2, mask, chunk_size=chunk_size)


def test_offsets():
    q, k, v = make_inputs(2, 4, 2, 3, 70, 128)
    k_mean = 4 * mx.random.normal((2, 2, 1, 128), key=mx.random.key(7))
    k = k + k_mean
    kq = quantize(k, 4, offset=k.mean(axis=2, keepdims=True))
    check(q, kq, quantize(v, 3), 128**-0.5, "causal", chunk_size=32)
    check(q, kq, quantize(v, 3), 128**-0.5)
    with pytest.raises(ValueError, match="values with an offset or channel_scale"):
        scaled_dot_product_attention(q, kq, quantize(v, 3, offset=k_mean), 128**-0.5)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
@pytest.mark.parametrize("L", [1, 8])
def test_query_dtypes(dtype, L):
    q, k, v = make_inputs(1, 8, 2, L, 33, 128, dtype=dtype, seed=L)
    check(q, quantize(k, 4), quantize(v, 4), 128**-0.5, "causal" if L > 1 else None)


def test_errors():
    q, k, v = make_inputs(2, 4, 2, 3, 10, 64)
    kq, vq = quantize(k, 4), quantize(v, 4)
    with pytest.raises(ValueError, match="not a multiple"):
        scaled_dot_product_attention(q[:, :3], kq, vq, 1.0)
    with pytest.raises(ValueError, match="must share"):
        scaled_dot_product_attention(mx.zeros((2, 4, 3, 128)), kq, vq, 1.0)
    with pytest.raises(ValueError, match="must share"):
        scaled_dot_product_attention(q, kq, quantize(v[:, :, :9], 4), 1.0)
    with pytest.raises(ValueError, match="'causal'"):
        scaled_dot_product_attention(q, kq, vq, 1.0, "upper")
    for shape in [(3, 11), (4, 10), (2, 3, 3, 10), (1, 2, 4, 3, 10)]:
        with pytest.raises(ValueError):
            scaled_dot_product_attention(q, kq, vq, 1.0, mx.zeros(shape))
    assert math.isfinite(scaled_dot_product_attention(q, kq, vq, 1.0).sum().item())


def decoded(q, kq, vq, scale, mask=None):
    """The GPU prefill path (mx.fast SDPA on decoded keys/values), run here on the CPU."""
    from mlx_tq.attention import _decoded_attention

    return _decoded_attention(q, kq, vq, scale, mask)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("mask", [None, "causal", "LS-bool", "B1LS-additive"])
def test_decoded_path_matches_reference(dtype, mask):
    B, Hq, Hkv, L, S, D = 2, 8, 2, 33, 70, 128
    q, k, v = make_inputs(B, Hq, Hkv, L, S, D, dtype, seed=L)
    rng = np.random.default_rng(1)
    if mask == "LS-bool":
        m = rng.random((L, S)) < 0.5
        m[:, 0] = True
        mask = mx.array(m)
    elif mask == "B1LS-additive":
        mask = mx.array(rng.standard_normal((B, 1, L, S)).astype(np.float32)).astype(dtype)
    offset = mx.mean(k.astype(mx.float32), axis=2, keepdims=True)
    smooth = mx.exp(mx.random.normal((B, Hkv, 1, D), key=mx.random.key(3)) * 0.5)
    kq = quantize(k, 4, offset=offset, channel_scale=smooth)
    # 3-bit values, and 5-bit values (not a fused-kernel width).
    for vq in (quantize(v, 3, 1), quantize(v, 5, 1)):
        out = decoded(q, kq, vq, D**-0.5, mask)
        assert out.shape == q.shape and out.dtype == dtype
        ref = attention_reference(q, dequantize(kq), dequantize(vq), D**-0.5, mask)
        tol = TOLERANCE[dtype]
        out = np.array(out.astype(mx.float32))
        np.testing.assert_allclose(out, ref, rtol=tol, atol=tol * np.abs(ref).max())


def test_decoded_path_float16_range():
    # Rotated coordinates of float16 vectors may exceed 65504 (|z_j| <= ||x||): scaled down.
    D = 128
    k = mx.full((1, 1, 4, D), 30000.0).astype(mx.float16)
    v = mx.concatenate([k, -k], axis=2)[:, :, :4]
    q = mx.ones((1, 1, 2, D), mx.float16) * 1e-4
    kq, vq = quantize(k, 4), quantize(v, 4)
    out = decoded(q, kq, vq, D**-0.5, "causal")
    ref = attention_reference(q, dequantize(kq), dequantize(vq), D**-0.5, "causal")
    assert np.isfinite(np.array(out.astype(mx.float32))).all()
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), ref, rtol=3e-3, atol=30)


def test_dispatch_paths(monkeypatch):
    from mlx_tq import attention, kernels

    q1, q9 = mx.zeros((1, 4, 1, 64)), mx.zeros((1, 4, 9, 64))
    k4, k5 = quantize(mx.ones((1, 2, 10, 64)), 4), quantize(mx.ones((1, 2, 10, 64)), 5)
    path = attention._path
    monkeypatch.setattr(kernels, "backend", lambda: None)  # a CPU
    assert path(q1, k4, k4, None) == "reference"
    monkeypatch.setattr(kernels, "backend", lambda: "cuda")
    assert path(q1, k4, k4, None) == "fused"
    assert path(mx.zeros((1, 4, 8, 64)), k4, k4, "causal") == "fused"
    assert path(q9, k4, k4, "causal") == "decoded"
    assert path(q1, k4, k5, None) == "decoded"
    assert path(q1, k4, k4, mx.ones((1, 10), mx.bool_)) == "decoded"
    assert path(q1, k4, k4, mx.ones((10,), mx.bool_)) == "reference"
    assert path(q1, k4.tokens(0, 0), k4.tokens(0, 0), None) == "reference"


@pytest.mark.parametrize("config", test_gpu.RECENT, ids=[str(c) for c in test_gpu.RECENT])
def test_recent_window_reference_matches_float64(config):
    """The plain-ops path with exact recent rows: each query takes its `window` newest
    positions from them (test_gpu.py runs the same check on the kernels)."""
    B, Hkv, G, L, S, D, kb, vb, W = config
    rng = np.random.default_rng(list(config))
    E = min(S, W - 1 + L)
    keys = test_gpu.packed_view(rng, B, Hkv, S, D, kb, 0, 7, smooth=True)
    values = test_gpu.packed_view(rng, B, Hkv, S, D, vb, 1, 7, keys=False)
    recent = [test_gpu.normal(rng, (B, Hkv, E, D)) for _ in range(2)]
    keys = replace(keys, recent=recent[0], window=W)
    values = replace(values, recent=recent[1], window=W)
    queries = test_gpu.normal(rng, (B, Hkv * G, L, D))
    mask = "causal" if L > 1 else None
    ref = test_gpu.attention_recent_f64(queries, keys, values, D**-0.5, mask)
    got = scaled_dot_product_attention_ops(queries, keys, values, D**-0.5, mask)
    assert test_gpu.rel_err(got, ref) < 1e-4


def test_recent_rows_must_reach_back_over_the_window():
    keys = quantize(mx.random.normal((1, 1, 20, 64)), 4)
    values = quantize(mx.random.normal((1, 1, 20, 64)), 4)
    recent = mx.zeros((1, 1, 5, 64))
    keys, values = (replace(t, recent=recent, window=4) for t in (keys, values))
    q = mx.zeros((1, 1, 3, 64))
    with pytest.raises(ValueError, match="at least the last window - 1 \\+ L rows"):
        scaled_dot_product_attention_ops(q, keys, values, 0.1, "causal")
