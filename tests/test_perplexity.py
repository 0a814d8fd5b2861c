import json
import sys

import mlx.core as mx
import pytest
from conftest import tiny_model
from mlx.utils import tree_map

import mlx_tq
from mlx_tq import needle, perplexity
from mlx_tq.patch import is_patched
from mlx_tq.perplexity import evaluate, kv_bits_per_element, load_windows, parse_config

VOCAB = 256


class ByteTokenizer:
    bos_token_id = 1

    def encode(self, text, add_special_tokens=True):
        ids = list(text.encode())
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


@pytest.fixture(scope="module")
def model():
    m = tiny_model("llama", vocab_size=VOCAB)
    # Larger weights than the default init, so the logits are far from uniform.
    m.update(tree_map(lambda w: w * 3, m.parameters()))
    mx.eval(m.parameters())
    return m


@pytest.fixture(scope="module")
def windows():
    return mx.random.randint(2, VOCAB, (2, 65), key=mx.random.key(1))


def test_fp16_against_itself(model, windows):
    r = evaluate(model, windows, [parse_config("fp16")], chunk_size=16)["fp16"]
    assert r["kl"] == 0 and r["top1"] == 1 and r["delta_ppl"] == 0
    assert r["tokens"] == 2 * 64 and r["ppl"] > 1


def test_more_bits_less_divergence(model, windows):
    r = evaluate(model, windows, [parse_config("k8v8"), parse_config("k3v3")], chunk_size=16)
    assert 0 < r["k8v8"]["kl"] < r["k3v3"]["kl"] / 10
    assert r["k8v8"]["top1"] >= r["k3v3"]["top1"]
    assert abs(r["k8v8"]["delta_ppl"]) < abs(r["k3v3"]["delta_ppl"])


def test_chunk_size_does_not_change_fp16(model, windows):
    ppl = [evaluate(model, windows, [], chunk_size=n)["fp16"]["ppl"] for n in (1, 16, 64)]
    assert ppl == pytest.approx([ppl[0]] * 3, rel=1e-5)


def test_bits_per_element(model, windows):
    caches = {n: parse_config(n).make_cache(model) for n in ("fp16", "k4v3", "affine8")}
    for cache in caches.values():
        model(windows[:1, :64], cache=cache)
    ref = caches["fp16"]
    assert kv_bits_per_element(ref, ref) == 32  # float32 weights: the plain cache is fp32
    # 3.5 bits of indices + a float32 scale per 64-element row + the key offset per head
    offset_bits = 8 * 2 * 64 * 4 / (2 * 256 * 2 * 64)
    assert kv_bits_per_element(caches["k4v3"], ref) == pytest.approx(3.5 + 0.5 + offset_bits)
    assert kv_bits_per_element(caches["affine8"], ref) == pytest.approx(8 + 2 * 32 / 64)


def test_load_windows(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("abcdefghij" * 10)
    w = load_windows(ByteTokenizer(), path, 16, num_windows=3)
    assert w.shape == (3, 17)
    assert (w[:, 0] == 1).all().item()
    assert w[1, 1:].tolist() == ByteTokenizer().encode("abcdefghij" * 10, False)[16:32]
    with pytest.raises(ValueError, match="fewer than one window"):
        load_windows(ByteTokenizer(), path, 1000)


def test_parse_config_errors():
    with pytest.raises(ValueError, match="unknown configuration"):
        parse_config("q4")


def test_cli_json(model, tmp_path, monkeypatch, capsys):
    data, out = tmp_path / "text.txt", tmp_path / "out.json"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    asked = []
    monkeypatch.setattr(
        perplexity, "load", lambda path, dtype=None: asked.append(dtype) or (model, ByteTokenizer())
    )
    argv = ["mlx_tq.perplexity", "--data", str(data), "--window", "32", "--num-windows", "2"]
    argv += ["--chunk-size", "8", "--kv-bits", "4", "--kv-key-bits", "5", "--kv-value-bits", "3"]
    argv += ["--compare", "affine4", "--dtype", "float32", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    was_patched = is_patched()
    try:
        perplexity.main()
    finally:
        if not was_patched:
            mlx_tq.unpatch()
    r = json.loads(out.read_text())
    assert r["window"] == 32 and r["num_windows"] == 2 and r["chunk_size"] == 8
    assert asked == [mx.float32] and r["dtype"] == "float32" and r["mode"] == "perplexity"
    assert {"date", "device", "mlx", "mlx_lm"} <= set(r)
    assert list(r["results"]) == ["fp16", "tq4", "k5v3", "affine4"]
    fields = {"ppl", "ppl_se", "delta_ppl", "delta_ppl_se", "kl", "kl_se", "top1"}
    for v in r["results"].values():
        assert fields | {"bits_per_element", "tokens"} == set(v)
        assert v["tokens"] == 64
    table = capsys.readouterr().out
    assert "| k5v3 |" in table and "| affine4 |" in table


def test_needle_prompt_and_retrieve(model):
    tok = ByteTokenizer()
    prompt = needle.make_prompt(tok, 400, 0.5, "12345")
    text = tok.decode(prompt[1:])
    assert prompt[0] == 1 and abs(len(prompt) - 401) <= 1
    assert text.index("12345") == pytest.approx(len(text) / 2, abs=100)
    assert text.endswith(needle.QUESTION)
    out = needle.retrieve(model, parse_config("k4v4").make_cache(model), prompt, chunk_size=64)
    assert len(out) == needle.DECODE_TOKENS and all(0 <= t < VOCAB for t in out)


def test_smooth_keys(model, windows, tmp_path):
    r = evaluate(model, windows, [parse_config("k8v8-s0.5"), parse_config("k3v3-s0.5")], 16)
    assert 0 < r["k8v8-s0.5"]["kl"] < r["k3v3-s0.5"]["kl"] / 10
    cache = parse_config("k4v4-s0.5").make_cache(model)
    model(windows[:1, :40], cache=cache)
    assert cache[0].key_scale.shape == (1, 2, 1, 64)
    path = tmp_path / "cache.safetensors"
    mlx_tq.save_prompt_cache(str(path), cache)
    loaded = mlx_tq.load_prompt_cache(str(path))
    assert loaded[0].smooth_keys == 0.5
    assert mx.array_equal(loaded[0].key_scale, cache[0].key_scale)
    x = windows[:1, 40:41]
    assert mx.array_equal(model(x, cache=cache), model(x, cache=loaded))


def test_generate_cli_passes_cache_options(model, monkeypatch):
    from mlx_tq import generate

    seen = {}

    class Stop(Exception):
        pass

    def record(model, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(generate, "load", lambda path: (model, ByteTokenizer()))
    monkeypatch.setattr(generate, "make_prompt_cache", record)
    for argv, sink in ((["--kv-exact-sink"], True), ([], None)):
        monkeypatch.setattr(sys, "argv", ["mlx_tq.generate", "--kv-bits", "3", *argv])
        with pytest.raises(Stop):
            generate.main()
        assert seen["exact_sink"] is sink and seen["kv_bits"] == 3
