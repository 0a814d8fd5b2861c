"""The TurboQuant caches inside real mlx-lm model code: tiny random models and Gemma-3-270M."""

import copy
import sys
import types

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import tiny_model
from mlx_lm.models import llama
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.models.cache import make_prompt_cache as lm_make_prompt_cache

import mlx_tq
from mlx_tq.cache import TurboQuantKVCache, TurboQuantRotatingKVCache
from mlx_tq.patch import _attention

VOCAB = 128


@pytest.fixture
def patched():
    mlx_tq.patch()
    yield
    mlx_tq.unpatch()


def run(model, cache, tokens, chunk):
    """Feeds `tokens` through `cache` in chunks; returns all logits."""
    out = [model(tokens[:, i : i + chunk], cache=cache) for i in range(0, tokens.shape[1], chunk)]
    return mx.concatenate(out, axis=1)


def rel_rms(a, b):
    a, b = np.array(a, np.float64), np.array(b, np.float64)
    return np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2))


TOKENS = mx.random.randint(0, VOCAB, (1, 60), key=mx.random.key(1))
FAMILIES = ["llama", "qwen2", "gemma3"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("smooth, sink", [(0.0, False), (0.5, False), (0.5, True)])
def test_fused_path_adds_no_error(family, smooth, sink, patched):
    # Unpatched, the cache hands dequantised K/V to mlx-lm's own attention: same numbers.
    model = tiny_model(family)
    options = dict(key_bits=4, value_bits=4, smooth_keys=smooth, exact_sink=sink)
    fused = run(model, mlx_tq.make_prompt_cache(model, **options), TOKENS, 7)
    mlx_tq.unpatch()
    plain = run(model, mlx_tq.make_prompt_cache(model, **options), TOKENS, 7)
    assert rel_rms(fused, plain) < 1e-4


# Relative RMS logit error bounds, about twice what these random models measure: K/V error
# ~2^-b relative, amplified through the layers (most in gemma3: 2.2% at 8 bits, 30% at 4).
TOLERANCE = {"llama": {8: 0.02, 4: 0.3}, "qwen2": {8: 0.02, 4: 0.3}, "gemma3": {8: 0.05, 4: 0.6}}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bits", [8, 4])
def test_logits_close_to_fp16(family, bits, patched):
    model = tiny_model(family)
    ref = run(model, lm_make_prompt_cache(model), TOKENS, 7)
    out = run(model, mlx_tq.make_prompt_cache(model, kv_bits=bits), TOKENS, 7)
    assert rel_rms(out, ref) < TOLERANCE[family][bits]


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_equals_one_chunk(family, patched):
    # Without key centring and smoothing each token's code is independent of chunking.
    model = tiny_model(family)
    options = dict(center_keys=False, smooth_keys=0)
    one = run(model, mlx_tq.make_prompt_cache(model, **options), TOKENS, 60)
    many = run(model, mlx_tq.make_prompt_cache(model, **options), TOKENS, 9)
    assert rel_rms(many, one) < 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_trim_then_refeed(family, patched):
    model = tiny_model(family)
    cache = mlx_tq.make_prompt_cache(model, exact_sink=True)
    first = run(model, cache, TOKENS[:, :40], 8)
    sink = cache[0].sink_keys
    assert all(c.is_trimmable() for c in cache)
    assert mlx_tq.cache.lm_cache.trim_prompt_cache(cache, 10) == 10
    assert cache[0].offset == 30 and cache[0].sink_keys is sink
    again = model(TOKENS[:, 30:40], cache=cache)
    assert rel_rms(again, first[:, 30:40]) < 1e-5
    # Trimmed to nothing, the next first token becomes the sink (stored with the key stats
    # frozen at the first update, so compare it in the original space).
    mlx_tq.cache.lm_cache.trim_prompt_cache(cache, 40)
    fresh = mlx_tq.make_prompt_cache(model, exact_sink=True)
    model(TOKENS[:, 5:12], cache=cache), model(TOKENS[:, 5:12], cache=fresh)
    a, b = (c[0].sink_keys * c[0].key_scale + c[0].key_offset for c in (cache, fresh))
    assert mx.allclose(a, b, atol=1e-5) and not mx.allclose(a, sink * cache[0].key_scale)


@pytest.mark.parametrize("keep", [0, 1])
@pytest.mark.parametrize("chunks", [[1] * 14, [3, 1, 1, 1, 1, 1, 1, 1, 3, 2], [5, 4, 6]])
def test_exact_sink_follows_the_window(keep, chunks, patched):
    """The sink is offered exactly while mlx-lm's RotatingKVCache still returns token 0,
    as row 0; through its in-place (one token) and concatenating (several) updates."""
    B, H, D, window = 1, 2, 64, 8
    ours = TurboQuantRotatingKVCache(window, keep, key_bits=4, value_bits=4, exact_sink=True)
    ref = RotatingKVCache(window, keep)
    toks = mx.random.normal((B, H, sum(chunks), D), key=mx.random.key(7))
    start = 0
    for n in chunks:
        k = toks[:, :, start : start + n]
        keys, _ = ours.update_and_fetch(k, k)
        ours._pending = False
        ref_k, _ = ref.update_and_fetch(k, k)
        start += n
        held = bool(mx.any(mx.all(ref_k == toks[:, :, :1], axis=-1)).item())
        assert (keys.sink is not None) == held, (start, n)
        if held:
            assert mx.array_equal(ref_k[:, :, :1], toks[:, :, :1])
            x = mlx_tq.dequantize(keys)
            assert mx.allclose(x[:, :, :1], toks[:, :, :1], atol=1e-5)
            if x.shape[2] > 1:  # row 1 is token 1, quantised
                assert not mx.allclose(x[:, :, 1:2], toks[:, :, 1:2], atol=1e-5)
    assert start > window


def test_rotating_window_semantics(patched):
    model = tiny_model("gemma3")
    ours = mlx_tq.make_prompt_cache(model, kv_bits=8)
    ref = lm_make_prompt_cache(model)
    assert [type(c) for c in ours] == [TurboQuantRotatingKVCache] * 2 + [TurboQuantKVCache]
    model(TOKENS[:, :5], cache=ours)
    model(TOKENS[:, :5], cache=ref)
    errors = []
    for t in range(5, 60):  # decode well past the window, through window-1, window, window+1
        a = model(TOKENS[:, t : t + 1], cache=ours)
        b = model(TOKENS[:, t : t + 1], cache=ref)
        errors.append(rel_rms(a, b))
        for c, r in zip(ours, ref, strict=True):
            assert (c.offset, c.size(), c.keys.shape[2]) == (r.offset, r.size(), r.keys.shape[2])
    assert max(errors) < TOLERANCE["gemma3"][8]


def test_sliding_layers_can_stay_fp16():
    model = tiny_model("gemma3")
    cache = mlx_tq.make_prompt_cache(model, quantize_sliding=False)
    assert [type(c) for c in cache] == [RotatingKVCache] * 2 + [TurboQuantKVCache]


def test_max_kv_size_gives_rotating_caches():
    cache = mlx_tq.make_prompt_cache(tiny_model("llama"), max_kv_size=32)
    assert all(type(c) is TurboQuantRotatingKVCache and c.max_size == 32 for c in cache)


def test_unpatched_fetch_returns_dequantised_arrays():
    cache = TurboQuantKVCache(key_bits=4, value_bits=3)
    k = mx.random.normal((1, 2, 5, 128)).astype(mx.float16)
    keys, values = cache.update_and_fetch(k, k)
    assert keys.shape == (1, 2, 5, 128) and keys.dtype == mx.float16
    assert rel_rms(keys, k) < 0.15 and rel_rms(values, k) < 0.3


def test_protocol_and_hidden_attributes():
    cache = TurboQuantKVCache()
    assert cache.empty() and cache.nbytes == 0 and cache.size() == 0
    for name in ("bits", "to_quantized"):
        assert not hasattr(cache, name)
    k = mx.random.normal((1, 1, 300, 64))
    cache.update_and_fetch(k, k)
    assert cache.offset == 300 and cache.keys.shape[2] == 512  # grown in steps of 256
    buf = cache.keys
    cache.update_and_fetch(k[:, :, :1], k[:, :, :1])
    assert cache.keys.shape == buf.shape  # no re-allocation within a step
    clone = copy.deepcopy(cache)
    cache.update_and_fetch(k[:, :, :1], k[:, :, :1])
    assert clone.offset == 301 and cache.offset == 302


@pytest.mark.parametrize("head_dim", [128, 256])
def test_bytes_after_2048_tokens(head_dim):
    cache = TurboQuantKVCache(key_bits=4, value_bits=4)
    fp16 = KVCache()
    for _ in range(8):
        k = mx.random.normal((1, 2, 256, head_dim)).astype(mx.float16)
        cache.update_and_fetch(k, k)
        fp16.update_and_fetch(k, k)
    assert cache.offset == 2048
    assert cache.nbytes <= 0.27 * fp16.nbytes


def test_patch_is_idempotent_and_reaches_later_modules():
    import mlx_lm.models.base as base

    original = base.scaled_dot_product_attention
    mlx_tq.patch()
    mlx_tq.patch()
    try:
        assert llama.scaled_dot_product_attention is _attention
        sys.modules.pop("mlx_lm.models.phi3", None)
        import mlx_lm.models.phi3 as phi3

        assert phi3.scaled_dot_product_attention is _attention
    finally:
        mlx_tq.unpatch()
    assert base.scaled_dot_product_attention is original
    assert llama.scaled_dot_product_attention is original
    assert phi3.scaled_dot_product_attention is original


def test_model_without_base_attention_is_refused():
    module = types.ModuleType("custom_attention_model")

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [nn.Linear(4, 4)]

    Model.__module__ = module.__name__
    sys.modules[module.__name__] = module
    try:
        with pytest.raises(ValueError, match="does not call mlx_lm.models.base"):
            mlx_tq.make_prompt_cache(Model())
    finally:
        del sys.modules[module.__name__]


def test_unconsumed_fetch_is_detected(patched):
    cache = TurboQuantKVCache()
    k = mx.random.normal((1, 1, 4, 64))
    cache.update_and_fetch(k, k)
    with pytest.raises(RuntimeError, match="never reached"):
        cache.update_and_fetch(k, k)


@pytest.mark.parametrize("sink", [False, True])
def test_save_load_round_trip_and_continue(tmp_path, patched, sink):
    model = tiny_model("gemma3")
    # A mixed list; with the sink, global layers hold one (sliding ones dropped it: 40 > window).
    cache = mlx_tq.make_prompt_cache(model, quantize_sliding=False, exact_sink=sink)
    run(model, cache, TOKENS[:, :40], 8)
    path = tmp_path / "prompt.safetensors"
    mlx_tq.save_prompt_cache(path, cache, {"model": "tiny"})
    loaded, meta = mlx_tq.load_prompt_cache(path, return_metadata=True)
    assert meta == {"model": "tiny"}
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    for a, b in zip(cache, loaded, strict=True):
        for x, y in zip(a.state, b.state, strict=True):
            if isinstance(x, mx.array):
                assert x.dtype == y.dtype and np.array_equal(np.array(x), np.array(y))
            else:
                assert x == y
    a = model(TOKENS[:, 40:50], cache=cache)
    b = model(TOKENS[:, 40:50], cache=loaded)
    assert np.array_equal(np.array(a), np.array(b))
    assert [getattr(c, "sink_keys", None) is not None for c in loaded] == [
        sink and isinstance(c, TurboQuantKVCache) for c in cache
    ]


def test_load_errors(tmp_path):
    cache = [TurboQuantKVCache(key_bits=3, value_bits=3)]
    k = mx.random.normal((1, 1, 8, 64))
    cache[0].update_and_fetch(k, k)
    path = tmp_path / "c.safetensors"
    mlx_tq.save_prompt_cache(path, cache)
    with pytest.raises(ValueError, match="key_bits=3, expected 4"):
        mlx_tq.load_prompt_cache(path, key_bits=4)
    with pytest.raises(ValueError, match="head_dim=64, expected 128"):
        mlx_tq.load_prompt_cache(path, head_dim=128)
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match="truncated"):
        mlx_tq.load_prompt_cache(truncated)
    other = tmp_path / "o.safetensors"
    mx.save_safetensors(str(other), {"w": mx.zeros(3)})
    with pytest.raises(ValueError, match="not an mlx_tq prompt cache"):
        mlx_tq.load_prompt_cache(other)
    with pytest.raises(FileNotFoundError):
        mlx_tq.load_prompt_cache(tmp_path / "missing.safetensors")
    assert not list(tmp_path.glob(".*tmp*"))  # atomic save leaves no temporary file
