"""The README's Python snippets run as printed."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    exec(compile(blocks[0], "README quickstart", "exec"), {})
    out = capsys.readouterr().out
    match = re.search(r"\((\d\.\d+)x\), relative MSE (\d\.\d+)", out)
    assert match, out
    ratio, mse = map(float, match.groups())
    assert ratio < 0.27 and 0.005 < mse < 0.012
