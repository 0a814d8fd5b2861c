"""Batched TurboQuant caches in mlx-lm's BatchGenerator: the same tokens as each request alone."""

import copy
from collections import defaultdict

import mlx.core as mx
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
    out = generate_step(
        mx.array(prompt), model, max_tokens=MAX_TOKENS, prompt_cache=cache, prefill_step_size=STEP
    )
    return [int(t) for t, _ in out]


def batched(model, prompts, caches, **kw):
    gen = BatchGenerator(model, max_tokens=MAX_TOKENS, prefill_step_size=STEP, **kw)
    uids = gen.insert(prompts, caches=caches)
    tokens = {u: [] for u in uids}
    finished = {}
    while len(finished) < len(uids):
        for r in gen.next_generated():
            tokens[r.uid].append(r.token)
            if r.finish_reason is not None:
                finished[r.uid] = r.prompt_cache
    gen.close()
    return [tokens[u] for u in uids], [finished[u] for u in uids]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("smooth", [0.0, 0.5])
def test_batched_tokens_equal_each_request_alone(family, smooth):
    model = lively(tiny_model(family))
    options = dict(kv_bits=4, smooth_keys=smooth)
    ps = prompts()
    want = [alone(model, p, mlx_tq.make_prompt_cache(model, **options)) for p in ps]
    caches = [mlx_tq.make_prompt_cache(model, **options) for _ in ps]
    got, extracted = batched(model, ps, caches, prefill_batch_size=4, completion_batch_size=4)
    assert got == want
    # Each finished request hands back a one-request cache holding its own statistics.
    single = (TurboQuantKVCache, TurboQuantRotatingKVCache)
    assert all(isinstance(c, single) for cache in extracted for c in cache)


def test_a_request_with_history_joins_a_running_batch():
    # c arrives with the cache of its earlier turn (its own statistics) while a and b decode
    # (extend); b stops early (filter). Each gets the tokens it gets alone.
    model = lively(tiny_model("gemma3"))
    a, b, c = prompts()[:3]
    history = mlx_tq.make_prompt_cache(model)
    alone(model, c[:30], history)
    want = [alone(model, p, mlx_tq.make_prompt_cache(model)) for p in (a, b)]
    want = [want[0], want[1][:3], alone(model, c[30:], copy.deepcopy(history))]
    gen = BatchGenerator(model, max_tokens=MAX_TOKENS, prefill_step_size=STEP)
    caches = [mlx_tq.make_prompt_cache(model) for _ in range(2)]
    uids = gen.insert([a, b], max_tokens=[MAX_TOKENS, 3], caches=caches)
    tokens = defaultdict(list)
    for i in range(40):
        if i == 4:
            uids += gen.insert([c[30:]], caches=[history])
        for r in gen.next_generated():
            tokens[r.uid].append(r.token)
    gen.close()
    assert [tokens[u] for u in uids] == want


def test_merge_extract_filter_keep_each_rows_statistics():
    k = [mx.random.normal((1, 2, n, 64), key=mx.random.key(n)) * (1 + n) for n in (5, 9)]
    singles = [TurboQuantKVCache(smooth_keys=0.5) for _ in k]
    for c, x in zip(singles, k, strict=True):
        c.update_and_fetch(x, x)
    batch = TurboQuantKVCache.merge([singles[0], TurboQuantKVCache(smooth_keys=0.5), singles[1]])
    assert isinstance(batch, TurboQuantBatchKVCache) and batch.stats_tokens == [5, 0, 9]
    assert batch.key_offset.shape == (3, 2, 1, 64) and batch.key_scale.shape == (3, 2, 1, 64)
    for i, c in ((0, singles[0]), (2, singles[1])):
        assert mx.array_equal(batch.key_offset[i], c.key_offset[0])
        one = batch.extract(i)
        assert mx.array_equal(one.keys[..., : one.offset, :], c.keys[..., : c.offset, :])
        assert mx.array_equal(one.key_scale, c.key_scale)
    batch.filter([2])
    assert batch.stats_tokens == [9] and mx.array_equal(batch.key_offset, singles[1].key_offset)
    with pytest.raises(ValueError, match="same bits"):
        TurboQuantKVCache.merge([TurboQuantKVCache(key_bits=3), TurboQuantKVCache()])
    rot = TurboQuantRotatingKVCache(16).merge([TurboQuantRotatingKVCache(16)] * 2)
    assert isinstance(rot, TurboQuantBatchRotatingKVCache)
