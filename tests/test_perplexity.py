import argparse
import json
import sys

import mlx.core as mx
import pytest
from conftest import ByteTokenizer, tiny_model
from mlx.utils import tree_map

import mlx_tq
from mlx_tq import perplexity
from mlx_tq.perplexity import evaluate, load_windows
from mlx_tq.tools import kv_footprint, make_cache

VOCAB = 256


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
    r = evaluate(model, windows, ["fp16"], chunk_size=16)["fp16"]
    assert r["kl"] == 0 and r["top1"] == 1 and r["delta_ppl"] == 0
    assert r["tokens"] == 2 * 64 and r["ppl"] > 1


def test_more_bits_less_divergence(model, windows):
    r = evaluate(model, windows, ["k8v8-w0", "k3v3-w0"], chunk_size=16)
    assert 0 < r["k8v8-w0"]["kl"] < r["k3v3-w0"]["kl"] / 10
    assert r["k8v8-w0"]["top1"] >= r["k3v3-w0"]["top1"]
    assert abs(r["k8v8-w0"]["delta_ppl"]) < abs(r["k3v3-w0"]["delta_ppl"])


def test_deadline_reports_the_windows_done(model, windows):
    """A passed deadline still runs one window, and the results are that window's alone."""
    late = evaluate(model, windows, ["k4v4-w0"], chunk_size=16, deadline=0.0)
    first = evaluate(model, windows[:1], ["k4v4-w0"], chunk_size=16)
    assert late["k4v4-w0"]["windows"] == 1 and late["k4v4-w0"]["tokens"] == 64
    assert late["k4v4-w0"]["kl"] == first["k4v4-w0"]["kl"]
    assert evaluate(model, windows, [], chunk_size=16)["fp16"]["windows"] == 2


@pytest.mark.parametrize("chunk_size", [8, 16])
def test_batched_windows_give_the_numbers_of_one_at_a_time(model, chunk_size):
    """Three windows in batches of 2 (the last batch one window): each row's cache keeps its
    own statistics and window, so every figure matches feeding the windows one by one."""
    windows = mx.random.randint(2, VOCAB, (3, 49), key=mx.random.key(2))
    configs = ["k4v3-w0", "k4v4-w16-r4", "affine4"]
    alone = evaluate(model, windows, configs, chunk_size=chunk_size)
    batched = evaluate(model, windows, configs, chunk_size=chunk_size, batch_size=2)
    for c in ["fp16", *configs]:
        a, b = alone[c], batched[c]
        assert a["tokens"] == b["tokens"] == 3 * 48 and a["windows"] == b["windows"] == 3
        for key in ("ppl", "delta_ppl", "kl", "top1"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (c, key)
    assert alone["k4v3-w0"]["kl"] > 1e-3  # (the comparison is not of zeros)


def test_chunk_size_does_not_change_fp16(model, windows):
    ppl = [evaluate(model, windows, [], chunk_size=n)["fp16"]["ppl"] for n in (1, 16, 64)]
    assert ppl == pytest.approx([ppl[0]] * 3, rel=1e-5)


def test_bits_per_element(model, windows):
    caches = {n: make_cache(model, n) for n in ("fp16", "k4v3-w0-r0", "affine8", "k4v3-w0-r4")}
    for cache in caches.values():
        model(windows[:1, :64], cache=cache)
    bits = {n: kv_footprint(cache)["bits"] for n, cache in caches.items()}
    assert bits["fp16"] == 32  # float32 weights: the plain cache is fp32
    # 3.5 bits of indices + a float32 scale per 64-element row + the key offset per head,
    # over the 64 rows that hold tokens (not the 256 allocated)
    offset_bits = 8 * 2 * 64 * 4 / (2 * 64 * 2 * 64)
    assert bits["k4v3-w0-r0"] == pytest.approx(3.5 + 0.5 + offset_bits)
    # a window of 4 exact tokens: 4 rows of K and V at 32 bits
    assert bits["k4v3-w0-r4"] == pytest.approx(3.5 + 0.5 + offset_bits + 4 * 32 / 64)
    assert bits["affine8"] == pytest.approx(8 + 2 * 32 / 64)


def test_load_windows(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("abcdefghij" * 10)
    w = load_windows(ByteTokenizer(), path, 16, num_windows=3)
    assert w.shape == (3, 17)
    assert (w[:, 0] == 1).all().item()
    assert w[1, 1:].tolist() == ByteTokenizer().encode("abcdefghij" * 10, False)[16:32]
    with pytest.raises(ValueError, match="fewer than one window"):
        load_windows(ByteTokenizer(), path, 1000)
    path.write_bytes(b"\x91\x00\xff" * 10)
    with pytest.raises(ValueError, match="text.txt is not UTF-8 text"):
        load_windows(ByteTokenizer(), path, 4)


def test_parse_config_errors():
    with pytest.raises(argparse.ArgumentTypeError, match="unknown configuration"):
        make_cache(None, "q4")


def test_cli_json(model, tmp_path, monkeypatch, capsys, restore_patch):
    data, out = tmp_path / "text.txt", tmp_path / "out.json"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    asked = []
    monkeypatch.setattr(
        perplexity, "load", lambda path, dtype=None: asked.append(dtype) or (model, ByteTokenizer())
    )
    argv = ["mlx_tq.perplexity", "--data", str(data), "--window", "32", "--num-windows", "2"]
    argv += ["--chunk-size", "8", "--kv-bits", "4", "--compare", "k5v3", "affine4"]
    argv += ["--dtype", "float32", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    perplexity.main()
    r = json.loads(out.read_text())
    assert r["window"] == 32 and r["num_windows"] == 2 and r["chunk_size"] == 8
    assert asked == [mx.float32] and r["dtype"] == "float32" and r["mode"] == "perplexity"
    assert {"date", "device", "mlx", "mlx_lm"} <= set(r)
    assert list(r["results"]) == ["fp16", "tq4", "k5v3", "affine4"]
    fields = {"ppl", "ppl_se", "delta_ppl", "delta_ppl_se", "kl", "kl_se", "top1"}
    for v in r["results"].values():
        assert fields | {"bits_per_element", "tokens", "windows"} == set(v)
        assert v["tokens"] == 64
    table = capsys.readouterr().out
    assert "| k5v3 |" in table and "| affine4 |" in table


def test_smooth_keys(model, windows, tmp_path):
    r = evaluate(model, windows, ["k8v8-s0.5-w0", "k3v3-s0.5-w0"], 16)
    assert 0 < r["k8v8-s0.5-w0"]["kl"] < r["k3v3-s0.5-w0"]["kl"] / 10
    cache = make_cache(model, "k4v4-s0.5-w0")
    model(windows[:1, :40], cache=cache)
    assert cache[0].key_scale.shape == (1, 2, 1, 64)
    path = tmp_path / "cache.safetensors"
    mlx_tq.save_prompt_cache(str(path), cache)
    loaded = mlx_tq.load_prompt_cache(str(path))
    assert loaded[0].smooth_keys == 0.5
    assert mx.array_equal(loaded[0].key_scale, cache[0].key_scale)
    x = windows[:1, 40:41]
    assert mx.array_equal(model(x, cache=cache), model(x, cache=loaded))


def test_first_update_feeds_a_short_first_call(model, windows):
    lengths = []

    class Recording:
        def __getattr__(self, name):
            return getattr(model, name)

        def __call__(self, x, cache):
            lengths.append(x.shape[1])
            return model(x, cache=cache)

    chat = evaluate(Recording(), windows, ["k4v4-w0"], chunk_size=16, first_update=5)
    # two windows of 64, each: 5 tokens, then chunks of 16, for fp16 and k4v4 (without the
    # 1-token probe make_prompt_cache sends through the model)
    assert [n for n in lengths if n != 1] == [n for n in (5, 16, 16, 16, 11) for _ in range(2)] * 2
    chunked = evaluate(model, windows, ["k4v4-w0"], chunk_size=16)
    assert chat["fp16"]["kl"] == 0 and chat["k4v4-w0"]["tokens"] == chunked["k4v4-w0"]["tokens"]
    # without a warm-up, the key statistics come from the first call: 5 tokens or 16
    assert chat["k4v4-w0"]["kl"] != chunked["k4v4-w0"]["kl"]


def test_cli_first_update_and_data_errors(model, tmp_path, monkeypatch, capsys, restore_patch):
    data, out = tmp_path / "text.txt", tmp_path / "out.json"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    monkeypatch.setattr(perplexity, "load", lambda path, dtype=None: (model, ByteTokenizer()))
    # a window longer than the warm-up (256), so the feeds freeze statistics differently
    argv = ["mlx_tq.perplexity", "--data", str(data), "--window", "300", "--num-windows", "1"]
    argv += ["--chunk-size", "8", "--kv-bits", "4", "--compare", "--first-update", "3"]
    monkeypatch.setattr(sys, "argv", argv + ["--json", str(out)])
    perplexity.main()
    r = json.loads(out.read_text())
    assert r["first_update"] == 3
    assert list(r["results"]) == list(r["first_update_results"]) == ["fp16", "tq4"]
    assert r["first_update_results"]["tq4"]["kl"] != r["results"]["tq4"]["kl"]
    table = capsys.readouterr().out
    assert "| tq4 | 3, then 8s |" in table and "| tq4 | chunks of 8 |" in table
    assert "| float32 (unquantised) |" in table
    monkeypatch.delenv("MLX_TQ_PPL_DATA", raising=False)
    monkeypatch.setattr(perplexity, "load", lambda *a, **k: pytest.fail("loaded a model"))
    for bad, message in (
        ([], "give a text file with --data or $MLX_TQ_PPL_DATA"),
        (["--data", str(tmp_path / "nope.txt")], "no text file at"),
        (["--data", str(data), "--first-update", "512"], "shorter than the window"),
        (["--data", str(data), "--kv-bits", "9"], "invalid choice: 9"),
        (["--data", str(data), "--window", "0"], "0 is not a positive integer"),
        (["--data", str(data), "--compare", "affine7"], "unknown configuration 'affine7'"),
    ):
        monkeypatch.setattr(sys, "argv", ["mlx_tq.perplexity", *bad])
        with pytest.raises(SystemExit) as info:
            perplexity.main()
        assert info.value.code == 2 and message in capsys.readouterr().err
