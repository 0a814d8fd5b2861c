"""The matrix-unit kernel's pipelined loop (decode_attention_mma.metal loads each step one
step ahead), emulated against float64: causal rows with L > 8, where a block of 8 rows
does not hold the last query, so `stop` trims a split's end off a step boundary, to below
its begin for the last split (begin > end), and, with few SIMD-groups, inside a split of
several steps; with and without the launch that merges; left padding past a split."""

import mlx.core as mx
import numpy as np
import pytest
import test_gpu
from emulator import COMPILER, emulate
from test_gpu import attention_f64, normal, packed_view, rel_err, tol_fused

from mlx_tq import attention
from mlx_tq.attention import _fused_attention

pytestmark = pytest.mark.skipif(COMPILER is None, reason="needs g++ or clang++ (C++20)")

TRIMMED = [
    (1, 1, 1, 20, 100, 64, 4, 4, mx.float16, False),  # block 0: stop 88, split 3 [96, 88)
    (1, 2, 2, 12, 77, 128, 3, 3, mx.bfloat16, True),  # block 0: stop 73
    (1, 1, 1, 16, 250, 64, 2, 2, mx.float16, False),  # block 0: stop 242, in a 2-step split
    (1, 1, 1, 16, 20, 64, 4, 4, mx.float16, False),  # S < 32: block 0 stop 12, block 1 20
]


@pytest.fixture(autouse=True)
def emulated(monkeypatch):
    emulate(monkeypatch)


@pytest.mark.parametrize("merge", [False, True], ids=["mma", "mma-merge"])
@pytest.mark.parametrize("warps", [2048, 4], ids=["splits", "few-splits"])
@pytest.mark.parametrize("config", TRIMMED, ids=[test_gpu.config_id(c) for c in TRIMMED])
def test_mma_causal_trimmed_end(config, warps, merge, monkeypatch):
    monkeypatch.setattr(attention, "MMA", True)
    monkeypatch.setattr(attention, "MMA_MERGE", merge)
    monkeypatch.setattr(attention, "MMA_MIN_KEYS", 32)
    monkeypatch.setattr(attention, "MMA_TARGET_WARPS", warps)
    B, Hkv, G, L, S, D, kb, vb, dtype, smooth = config
    rng = np.random.default_rng([B, Hkv, G, L, S, D, kb, vb])
    keys = packed_view(rng, B, Hkv, S, D, kb, 0, 5, smooth=smooth)
    values = packed_view(rng, B, Hkv, S, D, vb, 1, 5, keys=False)
    q = normal(rng, (B, Hkv * G, L, D), dtype).astype(mx.float32)
    ref = attention_f64(q, keys, values, D**-0.5, "causal")
    err = rel_err(_fused_attention(q, keys, values, D**-0.5, True), ref)
    assert err <= tol_fused(D, kb, vb), err


@pytest.mark.parametrize("merge", [False, True], ids=["mma", "mma-merge"])
@pytest.mark.parametrize("L", [1, 3])
def test_mma_left_padding_past_whole_splits(L, merge, monkeypatch):
    """test_gpu's left-padding case with one threadgroup of 4 SIMD-groups of 96 keys each:
    the row that starts at key 137 has no visible key in the first."""
    monkeypatch.setattr(attention, "MMA", True)
    monkeypatch.setattr(attention, "MMA_MERGE", merge)
    monkeypatch.setattr(attention, "MMA_MIN_KEYS", 32)
    monkeypatch.setattr(attention, "MMA_TARGET_WARPS", 8)
    test_gpu.test_fused_left_padding_matches_float64(L)


# Packed rows all inside the exact window (the kernel's S = 0: no split has keys, k_last
# would be (0 - 1) * k_row) and a few packed rows, L 1 and 2.
EMPTY = [(1, 1, 4, 1, 3, 64, 4, 4, 4), (2, 1, 4, 2, 5, 64, 3, 3, 8), (1, 2, 2, 2, 9, 64, 2, 2, 4)]


@pytest.mark.parametrize("merge", [False, True], ids=["mma", "mma-merge"])
@pytest.mark.parametrize("config", EMPTY, ids=[str(c) for c in EMPTY])
def test_mma_window_holds_every_row(config, merge, monkeypatch):
    monkeypatch.setattr(attention, "MMA", True)
    monkeypatch.setattr(attention, "MMA_MERGE", merge)
    test_gpu.test_recent_window_matches_float64(config)
