"""Reliability: non-finite and extreme values, long contexts, files, threads, fuzzing."""

import math
import threading

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_model
from hypothesis import given
from hypothesis import strategies as st
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import RotatingKVCache
from test_attention import TOLERANCE, attention_reference

import mlx_tq
from mlx_tq import (
    TurboQuantKVCache,
    TurboQuantRotatingKVCache,
    dequantize,
    quant,
    quantize,
    rotation,
    scaled_dot_product_attention,
)
from mlx_tq.attention import _mask_chunk
from mlx_tq.codebook import SUPPORTED_DIMS, codebook
from mlx_tq.patch import _attention

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
VOCAB = 64


@pytest.fixture
def patched():
    mlx_tq.patch()
    yield
    mlx_tq.unpatch()


def tiny_gemma(window=8):
    return tiny_model(
        "gemma3",
        intermediate_size=128,
        num_attention_heads=2,
        vocab_size=VOCAB,
        sliding_window=window,
    )


def greedy(model, prompt, cache, n=8):
    """(tokens, logprobs) of n greedy steps."""
    steps = list(generate_step(prompt, model, max_tokens=n, prompt_cache=cache))
    return [t for t, _ in steps], np.stack([np.array(lp) for _, lp in steps])


def rel_rms(a, b):
    a, b = np.array(a.astype(mx.float32), np.float64), np.array(b.astype(mx.float32), np.float64)
    return np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2))


# Non-finite and extreme values


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["key", "value"])
def test_non_finite_token_spoils_attention_over_it_only(where, bad, patched):
    # The cache never synchronises to check. A non-finite entry makes the token's scale
    # non-finite; each output that sees it is non-finite in every coordinate (the rotation
    # mixes them) where an fp16 cache spoils one coordinate or, for a -inf key, drops the
    # token. Once the token leaves the window, outputs are finite again in both.
    window = 8
    ours, ref = TurboQuantRotatingKVCache(window, warmup_tokens=0), RotatingKVCache(window)
    k, v = mx.split(mx.random.normal((2, 2, 20, 64), key=mx.random.key(0)), 2)
    (k if where == "key" else v)[0, 0, 1, 3] = bad
    q = mx.random.normal((1, 2, 1, 64), key=mx.random.key(1))
    for t0, t1 in [(0, 4)] + [(t, t + 1) for t in range(4, 20)]:
        kt, vt = k[:, :, t0:t1], v[:, :, t0:t1]
        out = _attention(q, *ours.update_and_fetch(kt, vt), cache=ours, scale=0.1, mask=None)
        fp16 = mx.fast.scaled_dot_product_attention(q, *ref.update_and_fetch(kt, vt), scale=0.1)
        seen = t1 <= window + 1  # token 1 is in the window
        spoiled = ~np.isfinite(np.array(out))
        assert spoiled[0, 0].all() == seen and not spoiled[0, 1].any()  # head 1 is clean
        assert (spoiled | np.isfinite(np.array(fp16))).all()  # never finite where fp16 is not


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("path", ["reference", "decoded"])
def test_masked_non_finite_value_adds_nothing(bad, path):
    """A key that a query cannot see adds nothing to it, whatever its value (no 0 * NaN);
    the queries that see it come out non-finite. On every path (the GPU's fused kernel is
    checked in tests/test_gpu.py)."""
    from mlx_tq.attention import _decoded_attention

    attend = scaled_dot_product_attention if path == "reference" else _decoded_attention
    k, v = mx.split(mx.random.normal((2, 1, 1, 2, 64), key=mx.random.key(3)), 2)
    k, v = k[0], v[0]
    v[0, 0, 1, 3] = bad
    kq, vq = quantize(k, 4, check_finite=False), quantize(v, 4, check_finite=False)
    q = mx.random.normal((1, 2, 2, 64), key=mx.random.key(4))
    out = np.array(attend(q, kq, vq, 0.1, "causal"))
    assert np.isfinite(out[:, :, 0]).all() and not np.isfinite(out[:, :, 1]).any()
    hidden = mx.array([[True, False], [True, False]])
    assert np.isfinite(np.array(attend(q, kq, vq, 0.1, hidden))).all()
    additive = mx.array([[0.0, -math.inf], [0.0, 0.0]])
    out = np.array(attend(q, kq, vq, 0.1, additive))
    assert np.isfinite(out[:, :, 0]).all() and not np.isfinite(out[:, :, 1]).any()


@pytest.mark.parametrize("path", ["reference", "decoded"])
def test_non_finite_value_leaves_the_window_within_a_chunk(path, patched):
    # Window 8: token 5 is bad; a 14-token chunk (positions 6-19) into the rotating cache
    # gets rows 0-19 and a windowed mask: queries 6-12 see token 5, queries 13-19 do not.
    from mlx_tq.attention import _decoded_attention

    cache = TurboQuantRotatingKVCache(8, warmup_tokens=0)
    k, v = mx.split(mx.random.normal((2, 1, 1, 20, 64), key=mx.random.key(5)), 2)
    k, v = k[0], v[0]
    v[0, 0, 5, 0] = math.nan
    cache.update_and_fetch(k[:, :, :6], v[:, :, :6])
    mask = cache.make_mask(14, window_size=8, return_array=True)
    keys, values = cache.update_and_fetch(k[:, :, 6:], v[:, :, 6:])
    assert keys.shape[2] == 20 and mask.shape == (14, 20)
    q = mx.random.normal((1, 2, 14, 64), key=mx.random.key(6))
    attend = scaled_dot_product_attention if path == "reference" else _decoded_attention
    finite = np.isfinite(np.array(attend(q, keys, values, 0.1, mask))).all(axis=(0, 1, 3))
    assert not finite[:7].any() and finite[7:].all()


@pytest.mark.parametrize("bits", range(2, 9))
def test_fp16_near_its_limit_round_trips(bits):
    # Norms of ~6e5 are fine in the float32 scale; reconstructions past 65504 are clipped.
    # The error is that of the same vectors scaled to 1, plus fp16 rounding.
    x = mx.random.uniform(-1, 1, (256, 128), key=mx.random.key(bits))
    x16 = (60000 * x).astype(mx.float16)
    x_hat = dequantize(quantize(x16, bits))
    assert x_hat.dtype == mx.float16 and mx.all(mx.isfinite(x_hat)).item()
    assert rel_rms(x_hat, x16) < 1.02 * rel_rms(dequantize(quantize(x, bits)), x) + 1e-3


def test_fp16_near_its_limit_through_the_cache(patched):
    # (no exact window: the reference reads the dequantised rows)
    cache = TurboQuantKVCache(key_bits=8, value_bits=8, warmup_tokens=0, recent_tokens=0)
    kv = mx.random.uniform(-60000, 60000, (2, 1, 2, 50, 64), key=mx.random.key(0))
    k, v = kv.astype(mx.float16)
    q = mx.random.normal((1, 4, 3, 64), key=mx.random.key(1)).astype(mx.float16) * 1e-4
    keys, values = cache.update_and_fetch(k, v)
    out = _attention(q, keys, values, cache=cache, scale=0.125, mask="causal")
    assert mx.all(mx.isfinite(out)).item()
    # Against the same codes in float64: near 65504 only fp16 rounding may differ.
    ref = attention_reference(q, dequantize(keys), dequantize(values), 0.125, "causal")
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), ref, atol=1e-3 * np.abs(ref).max())


@pytest.mark.parametrize("center_keys", [True, False])
def test_zero_vectors_through_cache_and_attention(center_keys, patched):
    cache = TurboQuantKVCache(key_bits=3, value_bits=3, center_keys=center_keys, warmup_tokens=0)
    zeros = mx.zeros((1, 2, 5, 64), mx.float16)
    q = mx.random.normal((1, 4, 5, 64), key=mx.random.key(0)).astype(mx.float16)
    keys, values = cache.update_and_fetch(zeros, zeros)
    assert mx.array_equal(dequantize(keys), zeros) and mx.array_equal(dequantize(values), zeros)
    for query in (q, mx.zeros_like(q)):
        out = _attention(query, keys, values, cache=cache, scale=0.125, mask="causal")
        assert mx.array_equal(out, mx.zeros_like(q))


# Long contexts


@pytest.mark.parametrize("S", [2**16 + 3, 2**24 + 3, 2**31 - 9])
def test_causal_mask_positions_past_2_24(S):
    L = 5
    for start, stop in [(0, 4), (S - 9, S - 3), (S - 4, S)]:
        mask = np.array(_mask_chunk("causal", L, S, start, stop))
        expected = np.arange(S - L, S, dtype=np.int64)[:, None] >= np.arange(start, stop)[None]
        assert np.array_equal(mask, expected)


def test_attention_past_2_16_keys():
    S, L = 2**16 + 3, 3
    kv = mx.random.normal((2, 1, 1, S, 64), key=mx.random.key(0))
    kq, vq = quantize(kv[0], 2), quantize(kv[1], 2)
    q = mx.random.normal((1, 2, L, 64), key=mx.random.key(1))
    ref = attention_reference(q, dequantize(kq), dequantize(vq), 0.5, "causal")
    for chunk_size in (None, 2**15 + 1):
        out = scaled_dot_product_attention(q, kq, vq, 0.5, "causal", chunk_size=chunk_size)
        np.testing.assert_allclose(np.array(out), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def check_same_window(ours, ref):
    """Ours holds what mlx-lm's RotatingKVCache holds, in the same slots, masked the same."""
    assert (ours.offset, ours._idx, ours.size()) == (ref.offset, ref._idx, ref.size())
    assert ours.keys.shape[2] == ref.keys.shape[2]
    for n, window in [(1, None), (1, 3), (3, None), (3, 3)]:
        a, b = ours.make_mask(n, window_size=window), ref.make_mask(n, window_size=window)
        assert mx.array_equal(a, b) if isinstance(b, mx.array) else a == b


@pytest.mark.parametrize("keep", [0, 2])
@pytest.mark.parametrize("prefill", [7, 8, 9])
@pytest.mark.parametrize("jump", [0, 2**24, 2**40])
def test_rotating_window_edges_and_large_offsets(prefill, keep, jump):
    window = 8
    ours, ref = (
        TurboQuantRotatingKVCache(window, keep, 8, 8, warmup_tokens=0),
        RotatingKVCache(window, keep),
    )
    kv = mx.random.normal((2, 1, 2, 40, 64), key=mx.random.key(prefill))
    steps = [(0, prefill)] + [(t, t + 1) for t in range(prefill, 20)] + [(20, 23), (23, 24)]
    for i, (t0, t1) in enumerate(steps):
        if i == 2 and jump:
            # Resume as if `jump` tokens had gone by: positions are Python ints end to end.
            meta = ours.meta_state
            meta = (*meta[:2], str(int(meta[2]) + jump), *meta[3:])
            ours = TurboQuantRotatingKVCache.from_state(ours.state, meta)
            ref.offset += jump
        a = ours.update_and_fetch(kv[0, :, :, t0:t1], kv[1, :, :, t0:t1])
        b = ref.update_and_fetch(kv[0, :, :, t0:t1], kv[1, :, :, t0:t1])
        check_same_window(ours, ref)
        assert rel_rms(a[0], b[0]) < 0.02 and rel_rms(a[1], b[1]) < 0.02
    assert ours.offset == 24 + jump


@pytest.mark.parametrize("fed", [6, 7])
def test_rotating_trim_matches_mlx_lm(fed):
    ours, ref = (
        TurboQuantRotatingKVCache(8, key_bits=8, value_bits=8, warmup_tokens=0),
        RotatingKVCache(8),
    )
    kv = mx.random.normal((2, 1, 1, 12, 64), key=mx.random.key(fed))
    for cache in (ours, ref):
        cache.update_and_fetch(kv[0, :, :, :fed], kv[1, :, :, :fed])
    assert ours.is_trimmable() and ref.is_trimmable()
    assert ours.trim(3) == ref.trim(3) == 3
    for t in range(fed - 3, fed + 2):
        a = ours.update_and_fetch(kv[0, :, :, t : t + 1], kv[1, :, :, t : t + 1])
        b = ref.update_and_fetch(kv[0, :, :, t : t + 1], kv[1, :, :, t : t + 1])
        check_same_window(ours, ref)
        assert rel_rms(a[0], b[0]) < 0.02


@pytest.mark.parametrize("fed, n", [(8, 3), (20, 3), (20, 6), (20, 20)])
def test_wrapped_window_refuses_trim(fed, n, patched):
    """Once the window is full its newest tokens are not at the end of the buffer: mlx-lm's
    RotatingKVCache trims anyway (it then keeps the trimmed tokens, drops others, or leaves
    its ring index negative); ours trims nothing and says so."""
    ours = TurboQuantRotatingKVCache(8, key_bits=8, value_bits=8, warmup_tokens=0)
    kv = mx.random.normal((2, 1, 1, fed + 1, 64), key=mx.random.key(fed))
    for t in range(fed):
        ours.update_and_fetch(kv[0, :, :, t : t + 1], kv[1, :, :, t : t + 1])
    before = (ours.offset, ours._idx)
    assert not ours.is_trimmable() and ours.trim(n) == 0 and (ours.offset, ours._idx) == before
    keys, _ = ours.update_and_fetch(kv[0, :, :, fed:], kv[1, :, :, fed:])
    # The window holds exactly the last 8 tokens fed, trimmed tokens 18 and 19 included.
    held = np.sort(np.array(dequantize(keys))[0, 0, :, 0])
    want = np.sort(np.array(kv[0, 0, 0, fed - 7 : fed + 1, 0]))
    np.testing.assert_allclose(held, want, atol=0.05)


@pytest.mark.parametrize(
    "make", [TurboQuantKVCache, lambda **kw: TurboQuantRotatingKVCache(8, **kw)]
)
@pytest.mark.parametrize("warmup", [0, 100])
def test_negative_trim_is_an_error(make, warmup):
    cache = make(warmup_tokens=warmup)
    k = mx.ones((1, 1, 5, 64))
    cache.update_and_fetch(k, k)
    with pytest.raises(ValueError, match="cannot trim -1 tokens"):
        cache.trim(-1)
    assert cache.offset == 5 and cache.trim(0) == 0 and cache.trim(2) == 2 and cache.offset == 3


# Files


def test_saved_prompt_continues_like_never_saved(tmp_path, patched):
    # The last prompt token is left for generation, as generate_step does, so both runs
    # quantise the same chunks: tokens and log-probabilities must match exactly.
    model = tiny_gemma()
    prompt = mx.random.randint(0, VOCAB, (20,), key=mx.random.key(3))
    tokens, logprobs = greedy(model, prompt, mlx_tq.make_prompt_cache(model, warmup_tokens=0))
    cache = mlx_tq.make_prompt_cache(model, warmup_tokens=0)
    model(prompt[None, :-1], cache=cache)
    mlx_tq.save_prompt_cache(tmp_path / "p.safetensors", cache)
    loaded = mlx_tq.load_prompt_cache(tmp_path / "p.safetensors", value_bits=4, head_dim=64)
    assert [type(c) for c in loaded] == [TurboQuantRotatingKVCache] * 2 + [TurboQuantKVCache]
    assert [c.offset for c in loaded] == [19] * 3
    resumed_tokens, resumed_logprobs = greedy(model, prompt[-1:], loaded)
    assert resumed_tokens == tokens
    np.testing.assert_array_equal(resumed_logprobs, logprobs)


def test_large_offsets_survive_a_file(tmp_path):
    cache = TurboQuantRotatingKVCache(8, warmup_tokens=0)
    cache.update_and_fetch(mx.ones((1, 1, 10, 64)), mx.ones((1, 1, 10, 64)))
    cache.offset += 2**40
    mlx_tq.save_prompt_cache(tmp_path / "p.safetensors", [cache])
    (loaded,) = mlx_tq.load_prompt_cache(tmp_path / "p.safetensors")
    assert (loaded.offset, loaded._idx) == (2**40 + 10, cache._idx)


def test_failed_save_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    cache = [TurboQuantKVCache(warmup_tokens=0)]
    cache[0].update_and_fetch(mx.ones((1, 1, 4, 64)), mx.ones((1, 1, 4, 64)))
    path = tmp_path / "p.safetensors"
    save = mx.save_safetensors

    def half_written(file, arrays, metadata=None):
        with open(file, "wb") as f:
            f.write(b"\x00" * 10)
        raise OSError("No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", half_written)
    with pytest.raises(OSError, match="No space left"):
        mlx_tq.save_prompt_cache(path, cache)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(mx, "save_safetensors", save)
    mlx_tq.save_prompt_cache(path, cache)
    before = path.read_bytes()
    monkeypatch.setattr(mx, "save_safetensors", half_written)
    with pytest.raises(OSError):
        mlx_tq.save_prompt_cache(path, cache + cache)
    assert list(tmp_path.iterdir()) == [path] and path.read_bytes() == before
    assert len(mlx_tq.load_prompt_cache(path)) == 1


# Threads


def test_threads_with_their_own_caches_match_sequential_runs(patched):
    # What mlx-lm's server needs: patch() once, then one cache per request, whichever
    # thread runs it. The shared rotation matrices are rebuilt inside the threads.
    model = tiny_gemma()
    prompts = [mx.random.randint(0, VOCAB, (12 + 5 * i,), key=mx.random.key(i)) for i in range(3)]
    mx.eval(prompts)
    shared = (rotation.rotation_matrix, rotation.kernel_rotation, codebook, quant._unpack_plan)
    for cached in shared:
        cached.cache_clear()
    results = [None] * len(prompts)

    def run(i):
        try:
            results[i] = greedy(
                model, prompts[i], mlx_tq.make_prompt_cache(model, kv_bits=3 + i, warmup_tokens=0)
            )
        except Exception as e:  # re-raised below, in the test's thread
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, p in enumerate(prompts):
        if isinstance(results[i], Exception):
            raise results[i]
        tokens, logprobs = greedy(
            model, p, mlx_tq.make_prompt_cache(model, kv_bits=3 + i, warmup_tokens=0)
        )
        assert results[i][0] == tokens
        np.testing.assert_array_equal(results[i][1], logprobs)


# Fuzzing, with the ci profile of conftest.py (derandomised, bounded)


@given(
    lead=st.lists(st.integers(0, 3), max_size=3),
    dim=st.sampled_from(SUPPORTED_DIMS),
    bits=st.integers(2, 8),
    dtype=st.sampled_from(DTYPES),
    magnitude=st.sampled_from([1e-3, 1.0, 1e4]),
    offset=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantize_matches_nearest_level_oracle(lead, dim, bits, dtype, magnitude, offset, seed):
    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal((*lead, dim)) * magnitude).astype(dtype)
    mu = mx.array(rng.standard_normal((*lead[:-1], 1, dim)), mx.float32) if offset else None
    q = quantize(x, bits, seed % 7, offset=mu if lead else None)
    x_hat = dequantize(q)
    assert x_hat.shape == x.shape and x_hat.dtype == dtype and q.dtype == dtype
    if x.size == 0:
        return
    # Oracle in float64: rotate, pick the nearest level, rescale to the exact norm.
    xf = np.array(x.astype(mx.float32), np.float64)
    if q.offset is not None:
        xf = xf - np.array(q.offset, np.float64)
    levels, bounds = (np.array(a, np.float64) for a in codebook(bits, dim))
    norms = np.linalg.norm(xf, axis=-1, keepdims=True)
    z = xf / np.where(norms > 0, norms, 1) @ np.array(rotation.rotation_matrix(dim, seed % 7))
    z *= math.sqrt(dim)
    idx = np.array(q.indices())
    near_bound = np.abs(z[..., None] - bounds).min(-1) < 1e-4
    assert ((idx == np.searchsorted(bounds, z)) | near_bound).all()
    # Inside the outer levels a coordinate is within half a cell of its level.
    inside = (z >= levels[0]) & (z <= levels[-1])
    assert (np.abs(z - levels[idx])[inside] <= np.diff(levels).max() / 2 + 1e-4).all()
    scales = norms[..., 0] / np.linalg.norm(levels[idx], axis=-1)
    np.testing.assert_allclose(np.array(q.scales()), scales, rtol=1e-5)


@st.composite
def attention_case(draw):
    B, Hkv, G = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4]))
    S = draw(st.integers(1, 70))
    L = draw(st.integers(1, min(S, 9)))
    mask = draw(st.sampled_from([None, "causal", "bool", "additive", "row"]))
    shape = draw(st.sampled_from([(L, S), (B, 1, L, S), (B, Hkv * G, L, S)]))
    return dict(
        shape=(B, Hkv, G, L, S),
        D=draw(st.sampled_from([64, 80, 128])),
        bits=(draw(st.integers(2, 8)), draw(st.integers(2, 8))),
        dtype=draw(st.sampled_from(DTYPES)),
        mask=mask,
        mask_shape=(S,) if mask == "row" else shape,
        chunk_size=draw(st.one_of(st.none(), st.integers(1, S))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@given(attention_case())
def test_attention_matches_float64_oracle(case):
    B, Hkv, G, L, S = case["shape"]
    D, dtype, rng = case["D"], case["dtype"], np.random.default_rng(case["seed"])
    q, k, v = (
        mx.array(rng.standard_normal(s), mx.float32).astype(dtype)
        for s in [(B, Hkv * G, L, D), (B, Hkv, S, D), (B, Hkv, S, D)]
    )
    kq = quantize(k, case["bits"][0], offset=k.astype(mx.float32).mean(axis=2, keepdims=True))
    vq = quantize(v, case["bits"][1], seed=1)
    mask = case["mask"]
    if mask in ("bool", "row"):
        keep = rng.random(case["mask_shape"]) < 0.7
        keep[..., -1] = True  # every query keeps a key
        mask = mx.array(keep)
    elif mask == "additive":
        mask = mx.array(rng.standard_normal(case["mask_shape"]) * 3, mx.float32).astype(dtype)
    out = scaled_dot_product_attention(q, kq, vq, D**-0.5, mask, chunk_size=case["chunk_size"])
    assert out.shape == q.shape and out.dtype == dtype
    ref = attention_reference(q, dequantize(kq), dequantize(vq), D**-0.5, mask)
    tol = TOLERANCE[dtype]
    out = np.array(out.astype(mx.float32))
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol * np.abs(ref).max())
