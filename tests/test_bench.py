import importlib.util
import json
import sys

import mlx_lm.models.cache as lm_cache
import pytest

from mlx_tq import bench, unpatch

CONFIGS = ["fp16", "affine8", "affine4", "tq4", "tq3", "k4v3"]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(autouse=True)
def restore_attention():
    yield
    unpatch()


def run_generate(tmp_path, *extra):
    out = tmp_path / "gen.json"
    argv = ["generate", "--random-model", "tiny", "--contexts", "32", "80"]
    argv += ["--decode-tokens", "3", "--repeats", "1", "--json", str(out), *extra]
    bench.main(argv)
    return json.loads(out.read_text())


def test_generate_writes_json_plot_and_table(tmp_path, capsys):
    report = run_generate(tmp_path, "--plot", str(tmp_path / "gen.png"))
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    for field in ("date", "device", "mlx", "mlx_lm", "dtype", "model", "prompt", "note", "runs"):
        assert field in report
    assert report["configs"] == CONFIGS and report["contexts"] == [32, 80]
    rows = report["results"]
    assert [(r["context"], r["config"]) for r in rows] == [
        (n, c) for n in (32, 80) for c in CONFIGS
    ]
    fields = ("prompt_tps", "decode_tps", "peak_memory", "kv_bytes", "fp16_kv_bytes")
    for r in rows:
        assert all(r[f] > 0 for f in fields)
    assert len(table) == 1 + len(rows)
    by = {(r["context"], r["config"]): r for r in rows}
    for n in (32, 80):
        assert by[n, "tq4"]["kv_bytes"] < by[n, "fp16"]["fp16_kv_bytes"]
        assert by[n, "tq3"]["kv_bytes"] < by[n, "tq4"]["kv_bytes"]
    assert len(report["targets"]) == 3
    assert report["errors"] == []
    assert report["cache_settings"]["k4v3"].startswith("TurboQuant K4/V3")
    assert report["cache_settings"]["affine4"] == "mlx-lm QuantizedKVCache 4-bit, group 64"
    assert (tmp_path / "gen.png").exists() == HAS_MATPLOTLIB


def test_generate_without_matplotlib_still_writes_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report = run_generate(tmp_path, "--configs", "tq4", "--plot", str(tmp_path / "gen.png"))
    assert report["configs"] == ["fp16", "tq4"]
    assert not (tmp_path / "gen.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_failing_configuration_is_reported_and_skipped(tmp_path, monkeypatch, capsys):
    def fail(*args):
        raise RuntimeError("[quantized_matmul] No implementation")

    monkeypatch.setattr(lm_cache.QuantizedKVCache, "update_and_fetch", fail)
    report = run_generate(tmp_path, "--configs", "affine4", "tq4")
    assert {r["config"] for r in report["results"]} == {"fp16", "tq4"}
    assert [e["config"] for e in report["errors"]] == ["affine4"]
    assert "affine4 failed" in capsys.readouterr().out


def test_attention_writes_json_and_table(tmp_path, capsys):
    out, png = tmp_path / "att.json", tmp_path / "att.png"
    bench.main(
        ["attention", "--keys", "64", "200", "--heads", "4", "--kv-heads", "2", "--head-dim", "64"]
        + ["--runs", "2", "--warmup", "1", "--json", str(out), "--plot", str(png)]
    )
    report = json.loads(out.read_text())
    methods = [report["dtype"], "mlx-lm affine8", "mlx-lm affine4", "tq4", "tq3", "k4v3"]
    assert [(r["keys"], r["method"]) for r in report["results"]] == [
        (n, m) for n in (64, 200) for m in methods
    ]
    assert all(r["ms"] > 0 for r in report["results"])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 3
    assert png.exists() == HAS_MATPLOTLIB


def test_check_targets():
    def row(context, config, decode_tps, peak):
        return {
            "context": context,
            "config": config,
            "decode_tps": decode_tps,
            "peak_memory": peak,
            "fp16_kv_bytes": 100,
            "decode_vs_fp16": decode_tps / 10,
        }

    report = {
        "results": [
            row(8192, "fp16", 10, 1000),
            row(8192, "tq4", 11, 950),
            row(32768, "fp16", 10, 1000),
            row(32768, "tq4", 12, 950),
        ]
    }
    lines = bench.check_targets(report)
    assert lines[0].startswith("PASS decode at 8192")
    assert lines[1].startswith("FAIL decode at 32768")
    assert lines[2].startswith("FAIL memory at 32768")
    report["results"][-1]["peak_memory"] = 920
    assert bench.check_targets(report)[2].startswith("PASS memory")


def test_unknown_config_is_refused():
    with pytest.raises(SystemExit, match="unknown configuration 'tq'"):
        bench.main(["generate", "--random-model", "tiny", "--configs", "tq"])


def test_plot_defaults_to_the_json_name(tmp_path):
    run_generate(tmp_path, "--configs", "tq4")
    assert (tmp_path / "gen.json").exists()
    assert (tmp_path / "gen.png").exists() == HAS_MATPLOTLIB
