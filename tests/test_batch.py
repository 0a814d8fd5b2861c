"""Batched TurboQuant caches in mlx-lm's BatchGenerator: the same tokens as each request alone."""

import copy
from collections import defaultdict

import mlx.core as mx
import numpy as np
import pytest
from conftest import lively, tiny_model
from mlx_lm.generate import BatchGenerator, generate_step

import mlx_tq
from mlx_tq.batch import TurboQuantBatchKVCache, TurboQuantBatchRotatingKVCache
from mlx_tq.cache import TurboQuantKVCache, TurboQuantRotatingKVCache

STEP = 16  # prefill chunk: prompts span several, as long prompts do
MAX_TOKENS = 10
# gemma3's sliding window is 16 tokens: the longer prompts wrap its rotating layers.
LENGTHS = [3, 21, 40, 9]


@pytest.fixture(autouse=True)
def patched():
    mlx_tq.patch()
    yield
    mlx_tq.unpatch()


def prompts(vocab=128):
    key = mx.random.key(7)
    return [
        mx.random.randint(0, vocab, (n,), key=mx.random.split(key, 9)[i]).tolist()
        for i, n in enumerate(LENGTHS)
    ]


def alone(model, prompt, cache):
    """Greedy (token, logprob) pairs of one request with its own cache."""
    out = generate_step(
        mx.array(prompt), model, max_tokens=MAX_TOKENS, prompt_cache=cache, prefill_step_size=STEP
    )
    return [(int(t), lp[t].item()) for t, lp in out]


def run_batch(model, prompts, caches, max_tokens=None, inserts=(), **kw):
    """Greedy (token, logprob) pairs per request from a BatchGenerator, and each request's
    cache as it finished. `inserts`: (step, prompt, cache, max_tokens) joining later."""
    gen = BatchGenerator(model, max_tokens=MAX_TOKENS, prefill_step_size=STEP, **kw)
    uids = gen.insert(prompts, max_tokens=max_tokens, caches=caches)
    out, finished = defaultdict(list), {}
    for step in range(60):
        for at, prompt, cache, n in inserts:
            if step == at:
                uids += gen.insert([prompt], max_tokens=[n], caches=[cache])
        for r in gen.next_generated():
            out[r.uid].append((r.token, r.logprobs[r.token].item()))
            if r.finish_reason is not None:
                finished[r.uid] = r.prompt_cache
    gen.close()
    return [out[u] for u in uids], [finished[u] for u in uids]


def assert_same(got, want):
    assert [t for t, _ in got] == [t for t, _ in want]
    # Float rounding, and the rows frozen while the batch warmed up, quantised again when it
    # packs: same indices except at a level midpoint (1.8e-3 measured once here).
    np.testing.assert_allclose([p for _, p in got], [p for _, p in want], atol=5e-3)


# warmup_tokens 0: every row frozen at its first update, the batch packed from the start;
# 12 and 24: rows freeze at different steps (prefill, decode, some within a wrapped window)
# while the batch holds plain rows, then it packs.
@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("warmup", [0, 12, 24])
def test_batched_tokens_equal_each_request_alone(family, warmup):
    model = lively(tiny_model(family))
    # Batch caches hold no exact recent window (docs/limits.md): alone without one either.
    options = dict(kv_bits=4, warmup_tokens=warmup, recent_tokens=0)
    ps = prompts()
    caches = [mlx_tq.make_prompt_cache(model, **options) for _ in ps]
    want = [alone(model, p, c) for p, c in zip(ps, caches, strict=True)]
    fresh = [mlx_tq.make_prompt_cache(model, **options) for _ in ps]
    got, finished = run_batch(model, ps, fresh, prefill_batch_size=4, completion_batch_size=4)
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)
    # Each finished request hands back a one-request cache, its statistics frozen on the
    # same tokens as alone.
    for one, ref in zip(finished, caches, strict=True):
        for c, r in zip(one, ref, strict=True):
            assert type(c) is type(r) and c.stats_tokens == r.stats_tokens
            if r.key_offset is not None:
                np.testing.assert_allclose(c.key_offset, r.key_offset, rtol=1e-5, atol=1e-5)


def test_a_request_with_history_joins_a_running_batch():
    # c arrives with the cache of its earlier turn (frozen) while a and b still warm up
    # (extend of packed into plain rows); b stops early (filter).
    model = lively(tiny_model("gemma3"))
    a, b, c = prompts()[:3]
    options = dict(warmup_tokens=20, recent_tokens=0)
    history = mlx_tq.make_prompt_cache(model, **options)
    alone(model, c[:30], history)
    want = [alone(model, p, mlx_tq.make_prompt_cache(model, **options)) for p in (a, b)]
    want = [want[0], want[1][:3], alone(model, c[30:], copy.deepcopy(history))]
    caches = [mlx_tq.make_prompt_cache(model, **options) for _ in range(2)]
    late = [(4, c[30:], history, MAX_TOKENS)]
    got, _ = run_batch(model, [a, b], caches, [MAX_TOKENS, 3], late)
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)


def test_merge_extract_filter_keep_each_rows_statistics():
    k = [mx.random.normal((1, 2, n, 64), key=mx.random.key(n)) * (1 + n) for n in (5, 9)]
    singles = [TurboQuantKVCache(smooth_keys=0.5, warmup_tokens=0) for _ in k]
    for c, x in zip(singles, k, strict=True):
        c.update_and_fetch(x, x)
    packed = TurboQuantKVCache.merge(singles)  # every row frozen: the packed rows as they are
    assert isinstance(packed, TurboQuantBatchKVCache) and packed.packed
    for i, c in enumerate(singles):
        one = packed.extract(i)
        assert mx.array_equal(one.keys, c.keys[..., : c.offset, :])
        assert mx.array_equal(one.key_scale, c.key_scale) and one.stats_tokens == c.offset
    # A warming row among them: plain rows, the frozen ones decoded.
    warming = TurboQuantKVCache(smooth_keys=0.5, warmup_tokens=0)
    plain = TurboQuantKVCache.merge([singles[0], warming, singles[1]])
    assert not plain.packed and plain.stats_tokens == [5, 0, 9]
    assert plain.key_offset.shape == plain.key_scale.shape == (3, 2, 1, 64)
    one, ref = plain.extract(2).keys, singles[1].keys[..., :9, :]
    assert mx.array_equal(one[..., :-1], ref[..., :-1])  # quantised again: the same indices
    scales = [x[..., -1:].view(mx.float32) for x in (one, ref)]
    np.testing.assert_allclose(*scales, rtol=1e-5)
    plain.filter([2])
    assert plain.stats_tokens == [9] and mx.array_equal(plain.key_offset, singles[1].key_offset)
    with pytest.raises(ValueError, match="same settings"):
        TurboQuantKVCache.merge([TurboQuantKVCache(key_bits=3), TurboQuantKVCache()])
    rot = TurboQuantRotatingKVCache.merge([TurboQuantRotatingKVCache(16)] * 2)
    assert isinstance(rot, TurboQuantBatchRotatingKVCache)
