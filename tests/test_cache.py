"""The TurboQuant caches inside real mlx-lm model code: tiny random models and Gemma-3-270M."""

import copy
import sys
import types

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import lively, tiny_model
from mlx_lm.generate import generate_step, speculative_generate_step
from mlx_lm.models import llama
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.models.cache import make_prompt_cache as lm_make_prompt_cache

import mlx_tq
from mlx_tq import dequantize
from mlx_tq.cache import WARMUP_TOKENS, TurboQuantKVCache, TurboQuantRotatingKVCache
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
@pytest.mark.parametrize("smooth", [0.0, 0.5])
def test_fused_path_adds_no_error(family, smooth, patched):
    # Unpatched, the cache hands dequantised K/V to mlx-lm's own attention: same numbers.
    model = tiny_model(family)
    options = dict(key_bits=4, value_bits=4, smooth_keys=smooth, warmup_tokens=0)
    for recent, chunk in ((0, 7), (4, 1)):  # unpatched, a window is exact for all L queries
        fused = run(
            model, mlx_tq.make_prompt_cache(model, **options, recent_tokens=recent), TOKENS, chunk
        )
        mlx_tq.unpatch()
        plain = run(
            model, mlx_tq.make_prompt_cache(model, **options, recent_tokens=recent), TOKENS, chunk
        )
        mlx_tq.patch()
        assert rel_rms(fused, plain) < 1e-4, recent


# Relative RMS logit error bounds, about twice what these random models measure: K/V error
# ~2^-b relative, amplified through the layers (most in gemma3: 2.2% at 8 bits, 30% at 4).
TOLERANCE = {"llama": {8: 0.02, 4: 0.3}, "qwen2": {8: 0.02, 4: 0.3}, "gemma3": {8: 0.05, 4: 0.6}}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bits", [8, 4])
def test_logits_close_to_fp16(family, bits, patched):
    model = tiny_model(family)
    ref = run(model, lm_make_prompt_cache(model), TOKENS, 7)
    out = run(model, mlx_tq.make_prompt_cache(model, kv_bits=bits, warmup_tokens=0), TOKENS, 7)
    assert rel_rms(out, ref) < TOLERANCE[family][bits]


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_equals_one_chunk(family, patched):
    # Without key centring and smoothing each token's code is independent of chunking (the
    # last chunk of 6 would take its window from the exact rows: see the next test).
    model = tiny_model(family)
    options = dict(center_keys=False, smooth_keys=0, recent_tokens=0)
    one = run(model, mlx_tq.make_prompt_cache(model, **options, warmup_tokens=0), TOKENS, 60)
    many = run(model, mlx_tq.make_prompt_cache(model, **options, warmup_tokens=0), TOKENS, 9)
    assert rel_rms(many, one) < 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_trim_then_refeed(family, patched):
    model = tiny_model(family)
    cache = mlx_tq.make_prompt_cache(model, warmup_tokens=0, recent_tokens=0)
    # Chunks of 10, as the refeed: the same matmul shapes (multithreaded OpenBLAS rounds a
    # differently shaped product differently, and a key that lands on another code is
    # visible at 1e-3).
    first = run(model, cache, TOKENS[:, :40], 10)
    assert all(c.is_trimmable() for c in cache)
    assert mlx_tq.cache.lm_cache.trim_prompt_cache(cache, 10) == 10
    assert cache[0].offset == 30
    again = model(TOKENS[:, 30:40], cache=cache)
    assert rel_rms(again, first[:, 30:40]) < 1e-5


def test_speculative_decoding_gives_the_tokens_of_plain_decoding(patched):
    """mlx-lm's speculative decoding over TurboQuant caches (verification updates of <= 8
    tokens, rejected drafts trimmed): the greedy tokens of plain decoding. Without the window
    the log-probabilities are equal too; with it a trim refills the window's older positions
    from packed rows (docs/limits.md): they move, but by a small part of the window's effect."""
    model, draft = lively(tiny_model("llama")), lively(tiny_model("llama"), std=0.45)
    prompt = mx.random.randint(0, 128, (30,), key=mx.random.key(3))
    runs = {}
    for recent in (0, 4):
        options = dict(warmup_tokens=12, recent_tokens=recent)
        cache = mlx_tq.make_prompt_cache(model, **options)
        plain = list(generate_step(prompt, model, max_tokens=40, prompt_cache=cache))
        cache = mlx_tq.make_prompt_cache(model, **options)
        cache += mlx_tq.make_prompt_cache(draft, **options)
        spec = list(
            speculative_generate_step(
                prompt, model, draft, num_draft_tokens=3, max_tokens=40, prompt_cache=cache
            )
        )
        assert [int(t) for t, _ in plain] == [int(t) for t, _, _ in spec]
        assert 0 < sum(d for _, _, d in spec) < len(spec)  # drafts accepted and rejected
        runs[recent] = [np.array([lp[t].item() for t, lp, *_ in r]) for r in (plain, spec)]
    np.testing.assert_allclose(*runs[0], atol=1e-4)
    moved = np.abs(runs[4][1] - runs[4][0]).mean()
    assert moved < 0.05 * np.abs(runs[4][0] - runs[0][0]).mean()  # measured: 0.009 vs 0.57


@pytest.mark.parametrize("n", [1, 3, 4, 9])
def test_trim_refills_the_window(n):
    # Trimmed, the window holds the 4 positions before the new end again: the rows it still
    # has, exact, and the older ones decoded from their packed words.
    cache = TurboQuantKVCache(warmup_tokens=0, recent_tokens=4)
    plain = KVCache()
    for L in (20, 1, 1, 3, 1, 1):
        k, v = (mx.random.normal((1, 2, L, 64)) for _ in range(2))
        cache.update_and_fetch(k, v)
        plain.update_and_fetch(k, v)
    end = cache.offset - n
    old = cache.offset - 4  # the first position the window held
    assert cache.trim(n) == n and plain.trim(n) == n
    k, v = cache._window_rows(end)
    exact = slice(max(old, end - 4), end)
    np.testing.assert_array_equal(k[..., exact.start - (end - 4) :, :], plain.keys[..., exact, :])
    lost = min(old, end)  # positions end - 4 ... lost - 1 come back decoded
    decoded = dequantize(cache._packed(cache.keys, cache.values)[0])[..., end - 4 : lost, :]
    np.testing.assert_allclose(k[..., : lost - (end - 4), :], decoded, atol=1e-5)
    assert np.abs(np.array(decoded) - np.array(plain.keys[..., end - 4 : lost, :])).max() > 0


@pytest.mark.parametrize("warmup", [0, 5, 16, 100])
@pytest.mark.parametrize("chunks", [[1] * 20, [2, 1, 1, 1, 4, 11], [3, 17]])
@pytest.mark.parametrize("rotating", [False, True])
def test_warmup_holds_exact_tokens_then_quantises_in_place(warmup, chunks, rotating, patched):
    """Until `warmup` tokens have arrived the cache is mlx-lm's own (exact rows, plain
    arrays out); then the statistics come from every token so far and the held rows are
    quantised where they lie: the same as one quantised update of those tokens."""
    B, H, D, window = 1, 2, 64, 8
    if rotating:
        ours, ref = TurboQuantRotatingKVCache(window, warmup_tokens=warmup), RotatingKVCache(window)
    else:
        ours, ref = TurboQuantKVCache(warmup_tokens=warmup), KVCache()
    toks = mx.random.normal((B, H, sum(chunks), D), key=mx.random.key(7)) + 3
    start = 0
    for n in chunks:
        k = toks[:, :, start : start + n]
        keys, values = ours.update_and_fetch(k, -k)
        ref_k, ref_v = ref.update_and_fetch(k, -k)
        start += n
        exact = start < warmup
        assert isinstance(keys, mx.array) == exact and (ours.key_offset is None) == exact
        if exact:
            assert mx.array_equal(keys, ref_k) and mx.array_equal(values, ref_v)
            continue
        assert (ours.offset, keys.shape) == (ref.offset, ref_k.shape)
        if start - n < warmup and start <= window:  # froze the statistics, nothing evicted
            mean = toks[:, :, :start].mean(axis=2, keepdims=True)
            assert mx.allclose(ours.key_offset, mean, atol=1e-5)
        # Every row is the quantised token that mlx-lm's cache holds there.
        want = mlx_tq.quantize(ref_k, 4, offset=ours.key_offset, channel_scale=ours.key_scale).data
        assert mx.array_equal(keys.data, want)


def test_rotating_window_semantics(patched):
    model = tiny_model("gemma3")
    ours = mlx_tq.make_prompt_cache(model, kv_bits=8, warmup_tokens=0)
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
    cache = mlx_tq.make_prompt_cache(model, quantize_sliding=False, warmup_tokens=0)
    assert [type(c) for c in cache] == [RotatingKVCache] * 2 + [TurboQuantKVCache]


@pytest.mark.parametrize(
    "options, key_bits",
    [
        (dict(kv_bits=4), [5, 5, 4]),
        (dict(kv_bits=3), [4, 4, 3]),
        (dict(kv_bits=8), [8, 8, 8]),
        (dict(kv_bits=4, key_bits=4), [4, 4, 4]),
        (dict(kv_bits=4, sliding_key_bits=6), [6, 6, 4]),
        (dict(kv_bits=4, max_kv_size=24), [5, 5, 4]),  # a capped global layer is not sliding
    ],
)
def test_sliding_layers_get_the_presets_key_bits(options, key_bits, patched):
    model = tiny_model("gemma3")  # two sliding-window layers, then a global one
    cache = mlx_tq.make_prompt_cache(model, warmup_tokens=0, **options)
    assert [c.key_bits for c in cache] == key_bits
    assert [c.value_bits for c in cache] == [options["kv_bits"]] * 3
    ref = run(model, lm_make_prompt_cache(model), TOKENS, 7)
    assert rel_rms(run(model, cache, TOKENS, 7), ref) < TOLERANCE["gemma3"].get(
        options["kv_bits"], 1
    )


def test_max_kv_size_gives_rotating_caches():
    cache = mlx_tq.make_prompt_cache(tiny_model("llama"), max_kv_size=32, warmup_tokens=0)
    assert all(type(c) is TurboQuantRotatingKVCache and c.max_size == 32 for c in cache)


@pytest.mark.parametrize("max_kv_size, sizes", [(8, [8, 8, 8]), (24, [16, 16, 24])])
def test_max_kv_size_caps_sliding_layers_too(max_kv_size, sizes, patched):
    # Every layer holds at most min(its window, max_kv_size) tokens (the window is 16 here).
    model = tiny_model("gemma3")
    cache = mlx_tq.make_prompt_cache(model, max_kv_size=max_kv_size)
    assert [c.max_size for c in cache] == sizes
    for i in range(50):
        model(TOKENS[:, i : i + 1], cache=cache)
    assert [c.size() for c in cache] == sizes
    # Windows shorter than the warm-up quantise once full (else they would never quantise).
    assert all(c.key_offset is not None for c in cache if c.max_size < WARMUP_TOKENS)
    for n in (0, -3, 4):
        with pytest.raises(ValueError, match=f"max_kv_size={n} is too small"):
            mlx_tq.make_prompt_cache(model, max_kv_size=n)


def test_unpatched_fetch_returns_dequantised_arrays():
    cache = TurboQuantKVCache(key_bits=4, value_bits=3, warmup_tokens=0)
    k = mx.random.normal((1, 2, 5, 128)).astype(mx.float16)
    keys, values = cache.update_and_fetch(k, k)
    assert keys.shape == (1, 2, 5, 128) and keys.dtype == mx.float16
    assert rel_rms(keys, k) < 0.15 and rel_rms(values, k) < 0.3


def test_protocol_and_hidden_attributes():
    cache = TurboQuantKVCache(warmup_tokens=0)
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
    cache = TurboQuantKVCache(key_bits=4, value_bits=4, warmup_tokens=0, recent_tokens=0)
    window = TurboQuantKVCache(key_bits=4, value_bits=4, warmup_tokens=0, recent_tokens=4)
    fp16 = KVCache()
    for _ in range(8):
        k = mx.random.normal((1, 2, 256, head_dim)).astype(mx.float16)
        cache.update_and_fetch(k, k)
        window.update_and_fetch(k, k)
        fp16.update_and_fetch(k, k)
    assert cache.offset == 2048
    assert cache.nbytes <= 0.27 * fp16.nbytes
    # The window: its 4 newest tokens' keys and values in float16.
    assert window.nbytes - cache.nbytes == 4 * fp16.nbytes // 2048


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
        with pytest.raises(ValueError, match="does not reach mlx_lm.models.base"):
            mlx_tq.make_prompt_cache(Model(), warmup_tokens=0)
    finally:
        del sys.modules[module.__name__]


def test_attention_that_bypasses_the_patch_is_named():
    """A model module whose attention function wraps mlx-lm's original (another package's
    patch) and never reaches ours: refused, naming the function. A wrapper that calls on to
    whatever `base` holds (ours once patched) is accepted."""
    model = tiny_model("llama")
    original = llama.scaled_dot_product_attention

    def foreign(*args, **kwargs):
        return original(*args, **kwargs)

    def wrapper(*args, **kwargs):
        return sys.modules["mlx_lm.models.base"].scaled_dot_product_attention(*args, **kwargs)

    try:
        llama.scaled_dot_product_attention = foreign
        with pytest.raises(ValueError, match="test_attention_that_bypasses_the_patch_is_named"):
            mlx_tq.make_prompt_cache(model)
        llama.scaled_dot_product_attention = wrapper
        assert len(mlx_tq.make_prompt_cache(model)) == 2
    finally:
        llama.scaled_dot_product_attention = original


@pytest.mark.parametrize("warmup", [0, 100])
def test_save_load_round_trip_and_continue(tmp_path, patched, warmup):
    model = tiny_model("gemma3")
    # A mixed list; with warmup 100 the TurboQuant layer still holds its 40 tokens exactly.
    cache = mlx_tq.make_prompt_cache(model, quantize_sliding=False, warmup_tokens=warmup)
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
    assert (loaded[-1].key_offset is None) == (warmup > 50)


def test_load_errors(tmp_path):
    cache = [TurboQuantKVCache(key_bits=3, value_bits=3, warmup_tokens=0)]
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
    old = tmp_path / "old.safetensors"
    mx.save_safetensors(str(old), {"w": mx.zeros(3)}, {"format": "mlx_tq.prompt_cache/1"})
    with pytest.raises(ValueError, match="written in format 'mlx_tq.prompt_cache/1'"):
        mlx_tq.load_prompt_cache(old)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic save leaves no temporary file
