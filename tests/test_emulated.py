"""The GPU kernels' bodies run on the CPU (tests/emulator.py) against the float64 checks of
test_gpu.py, on shapes small enough for an emulation: so a kernel's logic (tiles, barriers,
splits, masks, SIMD-group exchanges) is tested in CI, not only on a lent GPU."""

import mlx.core as mx
import numpy as np
import pytest
import test_gpu
from emulator import COMPILER, emulate

from mlx_tq import attention

pytestmark = pytest.mark.skipif(COMPILER is None, reason="needs g++ or clang++ (C++20)")

ATTENTION = [  # (B, Hkv, G, L, S, D, key bits, value bits, dtype, smooth): straddling tiles
    (1, 2, 4, 1, 300, 128, 4, 4, mx.float16, False),
    (2, 1, 2, 1, 1000, 192, 3, 4, mx.bfloat16, True),
    (1, 1, 8, 3, 129, 64, 2, 3, mx.float16, True),
    (2, 2, 4, 1, 1, 128, 3, 4, mx.float16, False),
    (1, 1, 2, 5, 517, 80, 4, 2, mx.bfloat16, False),
    (1, 1, 1, 1, 65, 256, 4, 4, mx.float16, True),
    (1, 1, 4, 1, 700, 256, 5, 4, mx.float16, True),  # Gemma's sliding layers (tq4)
    (1, 2, 6, 2, 300, 128, 8, 3, mx.bfloat16, False),
    # Dims that are no power of two, smoothed, with query rows that do not fill the blocks
    # (the prologue's padding rows; R * D not a multiple of the tile).
    (1, 1, 3, 4, 300, 96, 4, 4, mx.float16, True),
    (1, 1, 12, 1, 200, 112, 3, 4, mx.bfloat16, True),
    # 71 splits of 64-dim rows: more than one SIMD-group's and more than the merge's 64
    # threads' worth (its block-wide max and strided staging).
    (1, 1, 2, 1, 9000, 64, 4, 4, mx.float16, False),
    # The matrix units' widths: 3 bits (fields across words; D 64: a key's lane segment
    # starts mid-word), 2 bits with causal rows, 12 rows (two blocks of 8; D 112: segments
    # and spans start mid-word).
    (1, 2, 4, 1, 300, 128, 3, 3, mx.bfloat16, True),
    (1, 1, 4, 2, 333, 64, 3, 3, mx.float16, False),
    (1, 1, 8, 3, 129, 64, 2, 2, mx.float16, True),
    (1, 1, 12, 1, 200, 112, 4, 4, mx.bfloat16, False),
]


@pytest.fixture(autouse=True)
def emulated(monkeypatch):
    emulate(monkeypatch)


PATHS = {"mma-merge": (True, True), "mma": (True, False), "cores": (False, False)}


def use_path(path, monkeypatch):
    """attention.MMA and MMA_MERGE for a path: the matrix units merging in the same launch
    or in the merge kernel, or the CUDA cores."""
    mma, merge = PATHS[path]
    monkeypatch.setattr(attention, "MMA", mma)
    monkeypatch.setattr(attention, "MMA_MERGE", merge)
    return mma


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("groups", [640, 3], ids=["splits", "few-splits"])
@pytest.mark.parametrize("config", ATTENTION, ids=[test_gpu.config_id(c) for c in ATTENTION])
def test_attention_matches_float64(config, groups, path, monkeypatch):
    """With the default threadgroup target (one tile per split at these sizes) and with
    three threadgroups, so that each split runs several tiles (online softmax, prefetch);
    on the matrix units where they apply (K and V of one width: attention._use_mma) with the
    default split target and with 8 splits (several steps of 32 keys each), else on the
    CUDA cores."""
    B, Hkv, G, L, S, D, kb, vb, dtype, smooth = config
    mma = use_path(path, monkeypatch)
    if mma and not attention._use_mma(D, kb, vb):
        pytest.skip("keys and values of different widths: CUDA cores only")
    monkeypatch.setattr(attention, "TARGET_GROUPS", groups)
    monkeypatch.setattr(attention, "MMA_TARGET_WARPS", 2048 if groups == 640 else 8)
    test_gpu.test_attention_matches_float64(config)


@pytest.mark.parametrize("path", PATHS)
def test_merge_shifts_by_the_max_of_every_split(path, monkeypatch):
    use_path(path, monkeypatch)
    test_gpu.test_merge_shifts_by_the_max_of_every_split(monkeypatch)


@pytest.mark.parametrize("path", ["mma-merge", "mma"])
@pytest.mark.parametrize("config", test_gpu.RECENT[:5], ids=[str(c) for c in test_gpu.RECENT[:5]])
def test_recent_window_matches_float64(config, path, monkeypatch):
    use_path(path, monkeypatch)
    test_gpu.test_recent_window_matches_float64(config)


# The matrix units' edges: two batch rows; SIMD-groups, and whole heads, that see no packed
# key (a few keys; a window holding them all); two blocks of rows; dims no power of two.
MMA_EDGES = [
    (2, 2, 2, 1, 5, 128, 4, 4, mx.float16, False),
    (2, 1, 8, 1, 40, 80, 3, 3, mx.bfloat16, True),
]
MMA_RECENT_EDGES = [(2, 1, 4, 4, 6, 64, 2, 2, 4), (2, 2, 3, 4, 300, 96, 4, 4, 3)]


@pytest.mark.parametrize("path", ["mma-merge", "mma"])
@pytest.mark.parametrize("config", MMA_EDGES, ids=[test_gpu.config_id(c) for c in MMA_EDGES])
def test_mma_edges_match_float64(config, path, monkeypatch):
    use_path(path, monkeypatch)
    test_gpu.test_attention_matches_float64(config)


@pytest.mark.parametrize("path", ["mma-merge", "mma"])
@pytest.mark.parametrize("config", MMA_RECENT_EDGES, ids=[str(c) for c in MMA_RECENT_EDGES])
def test_mma_recent_window_edges_match_float64(config, path, monkeypatch):
    use_path(path, monkeypatch)
    test_gpu.test_recent_window_matches_float64(config)


@pytest.mark.parametrize("path", ["mma-merge", "mma"])
def test_cache_decode_step_through_mlx_lm_matches_float64(path, monkeypatch):
    use_path(path, monkeypatch)
    test_gpu.test_cache_decode_step_through_mlx_lm_matches_float64(mx.bfloat16)


@pytest.mark.parametrize("fold", [False, True], ids=["", "fold"])
def test_repeated_decode_steps_equal_the_general_path(fold, monkeypatch):
    test_gpu.test_repeated_decode_steps_equal_the_general_path(fold, monkeypatch)


@pytest.mark.parametrize("D, kb, vb, smooth", [(64, 4, 3, 0.5), (96, 3, 3, 0.0)])
def test_decode_step_quantises_in_the_merge_launch(D, kb, vb, smooth, monkeypatch):
    test_gpu.test_decode_step_quantises_in_the_merge_launch(D, kb, vb, smooth, monkeypatch)


@pytest.mark.parametrize("fold", [False, True], ids=["", "fold"])
def test_deep_copy_mid_step_is_its_own(fold, monkeypatch):
    test_gpu.test_deep_copy_mid_step_is_its_own(fold, monkeypatch)


def test_cache_after_decode_steps_holds_no_fetched_keys_and_copies():
    test_gpu.test_cache_after_decode_steps_holds_no_fetched_keys_and_copies()


@pytest.mark.parametrize("kb, vb", [(3, 4), (4, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_fused_reads_rows_with_a_stride(causal, kb, vb, monkeypatch):
    test_gpu.test_fused_reads_rows_with_a_stride(causal, kb, vb, monkeypatch)


@pytest.mark.parametrize("L", [1, 3])
def test_left_padding_matches_float64(L):
    test_gpu.test_fused_left_padding_matches_float64(L)


@pytest.mark.parametrize("vb", [3, 4])
@pytest.mark.parametrize("path, mask", [("fused", "causal"), ("fused", None)])
def test_masked_non_finite_value_adds_nothing(path, mask, vb):
    test_gpu.test_masked_non_finite_value_adds_nothing(path, mask, 129, 128, np.nan, vb)


@pytest.mark.parametrize("D, key_bits, value_bits", [(128, 4, 3), (80, 2, 4)])
def test_quantize_kv_matches_float64(D, key_bits, value_bits):
    test_gpu.test_quantize_kv_matches_float64(D, key_bits, value_bits)


def test_decode_step_shifts_the_window_in_the_quantise_launch():
    test_gpu.test_decode_step_shifts_the_window_in_the_quantise_launch(mx.float16)


def test_decode_rotated_matches_float64():
    test_gpu.test_decode_rotated_matches_float64(64, 3)


@pytest.mark.parametrize("one_row", [0, 10**6], ids=["rows-per-group", "one-row"])
def test_quantize_kv_rows_per_threadgroup(one_row, monkeypatch):
    test_gpu.test_quantize_kv_rows_per_threadgroup(one_row, monkeypatch)


# The matrix units' pipelined loop (decode_attention_mma.metal loads each step one step
# ahead): splits trimmed off a step boundary or below their begin, left padding past whole
# splits, all packed rows inside the exact window.
@pytest.mark.parametrize("merge", [False, True], ids=["mma", "mma-merge"])
@pytest.mark.parametrize("warps", [2048, 4], ids=["splits", "few-splits"])
@pytest.mark.parametrize("config", test_gpu.TRIMMED, ids=map(test_gpu.config_id, test_gpu.TRIMMED))
def test_mma_causal_trimmed_end(config, warps, merge, monkeypatch):
    test_gpu.test_mma_causal_trimmed_end_matches_float64(config, warps, merge, monkeypatch)


@pytest.mark.parametrize("merge", [False, True], ids=["mma", "mma-merge"])
@pytest.mark.parametrize("L", [1, 3])
def test_mma_left_padding_past_whole_splits(L, merge, monkeypatch):
    test_gpu.test_mma_left_padding_past_whole_splits(L, merge, monkeypatch)


@pytest.mark.parametrize("merge", [False, True], ids=["mma", "mma-merge"])
@pytest.mark.parametrize("config", test_gpu.EMPTY, ids=map(str, test_gpu.EMPTY))
def test_mma_window_holds_every_row(config, merge, monkeypatch):
    test_gpu.test_mma_window_holds_every_row(config, merge, monkeypatch)
