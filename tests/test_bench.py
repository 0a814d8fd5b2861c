import importlib.util
import json
import sys
from pathlib import Path

import mlx_lm.models.cache as lm_cache
import pytest
from conftest import tiny_model

from mlx_tq import bench, loading, unpatch
from mlx_tq.cache import RECENT_TOKENS

CONFIGS = ["fp16", "affine8", "affine4", "tq4", "tq3", "k4v3"]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def restore_attention():
    yield
    unpatch()


@pytest.fixture(autouse=True)
def model(monkeypatch):
    m = tiny_model("llama", vocab_size=1024)
    monkeypatch.setattr(bench, "load", lambda path, dtype=None: (m, None))
    return m


def run_generate(tmp_path, *extra):
    out = tmp_path / "gen.json"
    # longer than the TurboQuant warm-up (256 tokens held exactly)
    argv = ["--contexts", "272", "320"]
    argv += ["--decode-tokens", "3", "--repeats", "1", "--json", str(out), *extra]
    bench.main(argv)
    return json.loads(out.read_text())


def test_generate_writes_json_plot_and_table(tmp_path, capsys):
    report = run_generate(tmp_path, "--plot", str(tmp_path / "gen.png"))
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    for field in ("date", "device", "mlx", "mlx_lm", "dtype", "model", "prompt", "runs"):
        assert field in report
    assert report["configs"] == CONFIGS and report["contexts"] == [272, 320]
    rows = report["results"]
    assert [(r["context"], r["config"]) for r in rows] == [
        (n, c) for n in (272, 320) for c in CONFIGS
    ]
    fields = ("prompt_tps", "decode_tps", "host_ms", "peak_memory", "kv_bytes", "kv_bits")
    for r in rows:
        assert all(r[f] > 0 for f in fields)
    assert len(table) == 1 + len(rows)
    assert table[1].startswith("| 272 | float32 (unquantised) |")
    by = {(r["context"], r["config"]): r for r in rows}
    for n in (272, 320):
        # the KV bytes of the rows holding the n + 3 tokens, not mlx-lm's 256-row steps
        assert by[n, "fp16"]["kv_bits"] == 32
        assert by[n, "fp16"]["kv_bytes"] == (n + 3) * 2 * 2 * 2 * 64 * 4
        # below a 2-byte cache of the same tokens, per-head key statistics included
        assert by[n, "tq4"]["kv_bytes"] < by[n, "fp16"]["kv_bytes"] / 2
        # (+ the exact window's float32 rows of the newest tokens)
        window = RECENT_TOKENS * 32 / (n + 3)
        assert 4.5 < by[n, "tq4"]["kv_bits"] - window < 5.5
        assert by[n, "tq3"]["kv_bytes"] < by[n, "tq4"]["kv_bytes"]
    assert report["errors"] == []
    assert report["cache_settings"]["k4v3"].startswith("TurboQuant K4/V3")
    assert report["cache_settings"]["affine4"] == "mlx-lm QuantizedKVCache 4-bit, group 64"
    assert (tmp_path / "gen.png").exists() == HAS_MATPLOTLIB


def test_generate_without_matplotlib_still_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report = run_generate(tmp_path, "--configs", "tq4", "--plot", str(tmp_path / "gen.png"))
    assert report["configs"] == ["fp16", "tq4"]
    assert not (tmp_path / "gen.png").exists()
    err = capsys.readouterr().err
    assert "matplotlib is not installed" in err and "pip install 'mlx-tq[bench]'" in err


def test_failing_configuration_is_reported_and_skipped(tmp_path, monkeypatch, capsys):
    def fail(*args):
        raise RuntimeError("[quantized_matmul] No implementation")

    monkeypatch.setattr(lm_cache.QuantizedKVCache, "update_and_fetch", fail)
    report = run_generate(tmp_path, "--configs", "affine4", "tq4")
    assert {r["config"] for r in report["results"]} == {"fp16", "tq4"}
    assert [e["config"] for e in report["errors"]] == ["affine4"]
    assert "affine4 failed" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--configs", "tq"], "unknown configuration 'tq'"),
        (["--configs", "tq4-sink"], "unknown configuration 'tq4-sink'"),
        (["--contexts", "0"], "--contexts: 0 is not a positive integer"),
        (["--decode-tokens", "1"], "--decode-tokens must be at least 2"),
        (["--model", "/nonexistent"], "error: No such model file or folder: /nonexistent"),
    ],
)
def test_bad_arguments_are_one_line(argv, message, monkeypatch, capsys):
    if "--model" not in argv:
        monkeypatch.setattr(bench, "load", lambda *a, **k: pytest.fail("loaded a model"))
    else:
        monkeypatch.setattr(bench, "load", loading.load)
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    assert message in str(info.value) + capsys.readouterr().err


def test_plot_defaults_to_the_json_name(tmp_path):
    run_generate(tmp_path, "--configs", "tq4")
    assert (tmp_path / "gen.json").exists()
    assert (tmp_path / "gen.png").exists() == HAS_MATPLOTLIB


def test_gpu_targets(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_bench

    def row(context, config, decode_tps, peak):
        kv = dict(kv_bytes=100, kv_bits=16) if config == "fp16" else dict(kv_bytes=30, kv_bits=4.5)
        return dict(context=context, config=config, decode_tps=decode_tps, peak_memory=peak, **kv)

    report = {
        "results": [
            row(8192, "fp16", 10, 1000),
            row(8192, "tq4", 11, 950),
            row(32768, "fp16", 10, 1000),
            row(32768, "tq4", 12, 950),
        ]
    }
    for r in report["results"]:
        r["decode_vs_fp16"] = r["decode_tps"] / 10
    lines = gpu_bench.check_targets(report)
    assert lines[0].startswith("PASS decode at 8192")
    assert lines[1].startswith("FAIL decode at 32768")
    assert lines[2].startswith("FAIL memory at 32768")
    report["results"][-1]["peak_memory"] = 920
    assert gpu_bench.check_targets(report)[2].startswith("PASS memory")
    report["results"][2].update(kv_bytes=200, kv_bits=32)  # a float32 row: the same fp16 bytes
    assert gpu_bench.check_targets(report)[2].startswith("PASS memory")


def test_kernel_sass_builds_each_decode_step_kernel_as_mlx_would(monkeypatch):
    # The offline SASS tool's text for each kernel: the dispatchers' template constants, and
    # every shape/stride argument the body reads (else NVRTC would fail on the device's
    # behalf). Compiling needs NVRTC, which CI does not install.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import kernel_sass

    for name in ("decode_attention", "merge", "quantize"):
        template, inputs, outputs = kernel_sass.variant(name, kernel_sass.mx.float16, 128, 4)
        text = kernel_sass.source(name, template, inputs, outputs)
        assert "constexpr int D = 128;" in text and "using T = __half;" in text
        body = text.split("__global__", 1)[1]
        for n, _ in inputs:
            for part in ("shape", "strides"):
                if f"{n}_{part}[" in body.split(") {", 1)[1]:
                    assert f" {n}_{part}," in body or f" {n}_{part})" in body
    with pytest.raises(SystemExit, match="unknown kernel"):
        kernel_sass.variant("nope", kernel_sass.mx.float16, 128, 4)
