"""Tensor parallelism over 2 processes (MLX's ring backend on 127.0.0.1) with TurboQuant caches."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from serving import Server, save_model

HERE = Path(__file__).parent
LAUNCH = Path(sys.executable).parent / "mlx.launch"  # installed with mlx, next to python


def test_tensor_parallel_tokens_equal_one_process(tmp_path):
    out = tmp_path / "result.json"
    cmd = [str(LAUNCH), "--backend", "ring", "-n", "2", "--python", sys.executable]
    subprocess.run(
        [*cmd, str(HERE / "sharded_run.py"), str(out)], cwd=HERE, check=True, timeout=300
    )
    r = json.loads(out.read_text())
    assert r["size"] == 2 and r["kv_heads"] == 1  # each rank holds one of the two KV heads
    for want, got in zip(r["single"]["alone"], r["sharded"]["alone"], strict=True):
        assert [t for t, _ in got] == [t for t, _ in want]
        np.testing.assert_allclose([lp for _, lp in got], [lp for _, lp in want], atol=1e-4)
    assert r["sharded"]["batched"] == [[t for t, _ in a] for a in r["single"]["alone"]]


def test_sharded_server_answers_as_one_process(tmp_path):
    # mlx_tq.server under mlx.launch: mlx-lm's sharded_load, our caches on each rank's KV head.
    model = save_model(tmp_path / "llama")
    texts = []
    for launch in ((), (str(LAUNCH), "--backend", "ring", "-n", "2", "--python")):
        server = Server(model, tmp_path, launch=launch)
        try:
            r = server.client.chat.completions.create(
                model="default_model",
                messages=[{"role": "user", "content": "Say something, anything."}],
                temperature=0,
            )
            texts.append(r.choices[0].message.content)
        finally:
            server.stop()
    assert texts[0] == texts[1] and texts[0]
