"""benchmarks/needle.py: pass-key prompts, retrieval and the CLI's argument checks."""

import sys
from pathlib import Path

import pytest
from conftest import ByteTokenizer, tiny_model

from mlx_tq.tools import make_cache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import needle  # noqa: E402

VOCAB = 256


def test_needle_prompt_and_retrieve():
    model = tiny_model("llama", vocab_size=VOCAB)
    tok = ByteTokenizer()
    prompt = needle.make_prompt(tok, 400, 0.5, "12345")
    text = tok.decode(prompt[1:])
    assert prompt[0] == 1 and abs(len(prompt) - 401) <= 1
    assert text.index("12345") == pytest.approx(len(text) / 2, abs=100)
    assert text.endswith(needle.QUESTION)
    out = needle.retrieve(model, make_cache(model, "k4v4"), prompt, chunk_size=64)
    assert len(out) == needle.DECODE_TOKENS and all(0 <= t < VOCAB for t in out)


def test_progress_advances_within_prompts():
    model = tiny_model("llama", vocab_size=VOCAB)
    tok = ByteTokenizer()
    results = needle.run(model, tok, ["fp16", "tq4"], [200], [0.5], 1, chunk_size=64)
    assert set(results) == {"fp16", "tq4"} and list(results["tq4"]["cells"]) == ["200@50%"]

    class Bar:
        steps = []

        def update(self, n):
            self.steps.append(n)

    prompt = needle.make_prompt(tok, 200, 0.5, "1")
    needle.retrieve(model, make_cache(model, "tq4"), prompt, 64, Bar())
    # one step per prefill chunk: all tokens but the last, which the decode feeds
    assert sum(Bar.steps) == len(prompt) - 1 and len(Bar.steps) == -(-(len(prompt) - 1) // 64)
    assert set(Bar.steps[:-1]) == {64}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--kv-bits", "9"], "--kv-bits: invalid choice: 9"),
        (["--compare", "tq4-sink"], "unknown configuration 'tq4-sink'"),
        (["--depths", "1.5"], "1.5 is not a depth between 0 and 1"),
        (["--chunk-size", "0"], "--chunk-size: 0 is not a positive integer"),
        (["--lengths", "-1"], "--lengths: -1 is not a positive integer"),
    ],
)
def test_arguments_are_checked_before_loading(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(needle, "load", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.setattr(sys, "argv", ["needle.py", *argv])
    with pytest.raises(SystemExit) as info:
        needle.main()
    assert info.value.code == 2 and message in capsys.readouterr().err
