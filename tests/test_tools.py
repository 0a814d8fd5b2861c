"""What the command-line tools share (mlx_tq.tools), and the generate CLI."""

import argparse
import sys

import mlx.core as mx
import mlx_lm.models.cache as lm_cache
import pytest
from conftest import tiny_model

from mlx_tq import bench, generate, perplexity, tools
from mlx_tq.cache import RECENT_TOKENS, WARMUP_TOKENS, capped_cache

CLIS = {"generate": generate, "perplexity": perplexity}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def feed(model, cache, n):
    model(mx.arange(n)[None] % 100, cache=cache)
    return tools.kv_footprint(cache)


@pytest.mark.parametrize(
    "name",
    ["fp16", "affine8", "affine2", "tq4", "tq3-s0.25", "k4v3", "k8v2-s1", "tq4-w0", "k4v4-s0.5-w8"],
)
def test_config_names(name):
    assert tools.check_config(name) == name


@pytest.mark.parametrize("name", ["q4", "tq", "tq9", "tq1", "affine7", "k4v9", "tq4-sink", "fp32"])
def test_unknown_config_names(name):
    with pytest.raises(argparse.ArgumentTypeError, match=f"unknown configuration '{name}'"):
        tools.check_config(name)


@pytest.mark.parametrize("module", [perplexity, bench])
def test_json_in_a_missing_folder_is_refused_before_the_run(module, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        module.setup_arg_parser().parse_args(["--json", str(tmp_path / "missing" / "x.json")])
    assert e.value.code == 2 and "no folder" in capsys.readouterr().err


def test_affine_compresses_sliding_window_layers_too():
    gemma = tiny_model("gemma3")
    assert {type(c) for c in lm_cache.make_prompt_cache(gemma)} == {
        lm_cache.KVCache,
        lm_cache.RotatingKVCache,
    }
    cache = tools.make_cache(gemma, "affine4")
    assert all(type(c) is lm_cache.QuantizedKVCache and c.bits == 4 for c in cache)
    assert tools.describe(cache) == "mlx-lm QuantizedKVCache 4-bit, group 64"
    smooth = tools.make_cache(gemma, "k4v3-s0.5-w16")
    want = "TurboQuant K4/V3, key smoothing 0.5, warm-up 16, 4 newest tokens exact"
    assert tools.describe(smooth) == want
    assert tools.describe(tools.make_cache(gemma, "k4v3-r0")) == (
        f"TurboQuant K4/V3, warm-up {WARMUP_TOKENS}"
    )
    assert tools.describe(tools.make_cache(gemma, "tq4")) == (
        f"TurboQuant K4/V4, K5 keys in 2 of 3 layers, key smoothing 0.5, warm-up {WARMUP_TOKENS}"
        ", 4 newest tokens exact"
    )


def test_footprint_counts_rows_holding_tokens(model):
    # 2 layers x K+V x 2 kv heads x head_dim 64 x float32, per token
    per_token = 2 * 2 * 2 * 64 * 4
    f = feed(model, lm_cache.make_prompt_cache(model), 46)
    assert f["tokens"] == 46 and f["bits"] == 32 and f["dtype"] == mx.float32
    assert f["held"] == 46 * per_token and f["allocated"] == 256 * per_token
    assert f["elements"] == 46 * 2 * 2 * 2 * 64
    # the warm-up holds the first tokens exactly: an unquantised cache until it ends
    assert feed(model, tools.make_cache(model, "tq4"), WARMUP_TOKENS - 1)["bits"] == 32
    short = feed(model, tools.make_cache(model, "tq4-w0-r0"), 46)
    long = feed(model, tools.make_cache(model, "tq4-w0-r0"), 300)
    # rows grow the held bytes linearly; the per-head key statistics are paid once
    per_row = (long["held"] - short["held"]) / (300 - 46)
    assert long["allocated"] - short["allocated"] == 256 * per_row  # 512 rows against 256
    assert per_row * 8 / (2 * 2 * 2 * 64) == pytest.approx(4 + 32 / 64)
    assert 4.5 < long["bits"] < short["bits"] < 4.5 + 0.7
    assert tools.kv_footprint(tools.make_cache(model, "tq4-w0"))["bits"] == 0


def test_rotating_footprint_holds_the_window(model):
    cache = [lm_cache.RotatingKVCache(max_size=32, keep=4) for _ in model.layers]
    assert feed(model, cache, 100)["tokens"] == 100  # a long prefill is held until the next step
    f = feed(model, cache, 1)
    assert f["tokens"] == 32 and f["held"] == 32 * 2 * 2 * 2 * 64 * 4


def test_capped_cache_caps_every_layer():
    gemma = tiny_model("gemma3")  # sliding window 16
    assert {type(c) for c in capped_cache(gemma)} == {
        lm_cache.KVCache,
        lm_cache.RotatingKVCache,
    }
    for size, windows in ((8, {8}), (32, {16, 32})):
        cache = capped_cache(gemma, size)
        assert {c.max_size for c in cache} == windows and {type(c) for c in cache} == {
            lm_cache.RotatingKVCache
        }


def test_kv_line_names_the_baseline_dtype(model):
    cache = lm_cache.make_prompt_cache(model)
    feed(model, cache, 46)
    line = generate.kv_line(cache)
    assert line.startswith("KV cache: 46 tokens, 32.00 bits per element (1.000x an unquantised")
    assert "float32 cache); 0.094 MB held, 0.524 MB allocated" in line


class Stop(Exception):
    pass


def test_generate_cli_passes_cache_options(model, monkeypatch):
    seen = {}

    def record(model, *args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(generate, "load", lambda path: (model, None))
    monkeypatch.setattr(generate, "make_prompt_cache", record)
    monkeypatch.setattr(generate, "capped_cache", record)
    for argv, expected in (
        (["--kv-bits", "3", "--max-kv-size", "64"], dict(kv_bits=3, max_kv_size=64)),
        (["--kv-bits", "none"], {}),
    ):
        seen.clear()
        monkeypatch.setattr(sys, "argv", ["mlx_tq.generate", *argv])
        with pytest.raises(Stop):
            generate.main()
        assert seen.items() >= expected.items() and ("kv_bits" in seen) == ("kv_bits" in expected)


@pytest.mark.parametrize(
    "cli, argv, message",
    [
        ("generate", ["--max-kv-size", "0"], "--max-kv-size: 0 is not a positive integer"),
        ("generate", ["--max-kv-size", "-4"], "--max-kv-size: -4 is not a positive integer"),
        ("generate", ["--max-kv-size", "4"], "--max-kv-size must exceed the 4 first tokens"),
        ("generate", ["--kv-bits", "none", "--kv-key-bits", "4"], "need a --kv-bits budget"),
        ("generate", ["--kv-bits", "16"], "invalid choice: 16 (choose from 2, 3, 4, 5, 6, 7, 8)"),
        ("perplexity", ["--kv-bits", "9"], "--kv-bits: invalid choice: 9"),
        ("perplexity", ["--compare", "k1v4"], "unknown configuration 'k1v4'"),
        ("perplexity", ["--dtype", "int8"], "--dtype: invalid choice: 'int8'"),
    ],
)
def test_arguments_are_checked_before_loading(cli, argv, message, monkeypatch, capsys):
    monkeypatch.setattr(CLIS[cli], "load", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.setattr(sys, "argv", [f"mlx_tq.{cli}", *argv])
    with pytest.raises(SystemExit) as info:
        CLIS[cli].main()
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("cli", ["generate", "perplexity"])
def test_model_errors_are_one_line(cli, tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("hi")
    for model, message in (
        (tmp_path / "nope", "error: No such model file or folder: "),
        (tmp_path / "notes.txt", "is a file but not a .gguf; give a GGUF file or a model folder"),
        (tmp_path, "is not a model folder: it has no config.json"),
    ):
        data = ["--data", str(tmp_path / "notes.txt")] if cli == "perplexity" else []
        monkeypatch.setattr(sys, "argv", [f"mlx_tq.{cli}", "--model", str(model), *data])
        with pytest.raises(SystemExit) as info:
            CLIS[cli].main()
        assert message in str(info.value) and "\n" not in str(info.value)
        assert info.value.__cause__ is None and info.value.__suppress_context__


def test_user_errors_leave_bugs_alone():
    with pytest.raises(SystemExit, match="^error: a b$"):
        with tools.user_errors():
            raise FileNotFoundError("a\n  b")
    with pytest.raises(KeyError):
        with tools.user_errors():
            raise KeyError("a bug")


@pytest.mark.parametrize("cli", ["generate", "perplexity", "bench"])
def test_help_shows_every_default(cli, capsys):
    parsers = [(CLIS.get(cli) or bench).setup_arg_parser()]
    for p in parsers:
        text = " ".join(p.format_help().split())
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, (p.prog, action.dest)
            if action.default not in (None, False, argparse.SUPPRESS):
                assert f"(default: {action.default})" in text, (p.prog, action.dest)


def test_blas_hint(monkeypatch, capsys):
    if sys.platform != "linux":
        pytest.skip("the hint is for Linux")
    monkeypatch.setattr(tools.mx, "default_device", lambda: mx.cpu)
    tools.blas_hint("")
    assert "LD_PRELOAD=" in capsys.readouterr().err
    tools.blas_hint("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(tools.mx, "default_device", lambda: mx.gpu)
    tools.blas_hint("")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("text, on", [("false", False), ("F", False), ("true", True), ("t", True)])
def test_verbose_reads_as_mlx_lm_generate_does(text, on):
    assert generate.setup_arg_parser().parse_args(["--verbose", text]).verbose is on


def test_recent_tokens_of_a_configuration():
    assert tools.recent_tokens("tq4") == RECENT_TOKENS
    assert tools.recent_tokens("k4v3-s0.5-w0-r8") == 8
    assert tools.recent_tokens("tq3-r0") == 0
    assert tools.recent_tokens("fp16") == tools.recent_tokens("affine4") == 0
