import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlx_tq import TurboQuantized, dequantize, quantize
from mlx_tq.codebook import SUPPORTED_DIMS, lloyd_max
from mlx_tq.quant import pack, unpack

DTYPES = [mx.float32, mx.float16, mx.bfloat16]


def random_unit_vectors(n, dim, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, dim))
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def queries_at_cosine(keys, cosine, seed=1):
    """Unit queries with a given cosine to each key, the rest of the direction random."""
    u = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
    w = np.random.default_rng(seed).standard_normal(keys.shape)
    w -= (w * u).sum(-1, keepdims=True) * u
    w /= np.linalg.norm(w, axis=-1, keepdims=True)
    return cosine * u + math.sqrt(1 - cosine**2) * w


def pack_reference(indices, bits):
    """Bit i*bits + j of a row's LSB-first stream is bit j of element i."""
    *lead, dim = indices.shape
    stream = (indices[..., None] >> np.arange(bits)) & 1
    stream = stream.reshape(*lead, dim * bits)
    n_words = -(-dim * bits // 32)
    stream = np.concatenate([stream, np.zeros((*lead, n_words * 32 - dim * bits), int)], -1)
    words = stream.reshape(*lead, n_words, 32) << np.arange(32)
    return words.sum(-1).astype(np.uint32)


@given(
    lead=st.lists(st.integers(1, 3), max_size=3),
    dim=st.sampled_from(SUPPORTED_DIMS),
    bits=st.integers(1, 8),
    seed=st.integers(0, 2**32 - 1),
)
def test_pack_unpack_round_trip(lead, dim, bits, seed):
    indices = np.random.default_rng(seed).integers(0, 2**bits, (*lead, dim))
    words = pack(mx.array(indices, mx.uint32), bits)
    assert words.dtype == mx.uint32 and words.shape == (*lead, -(-dim * bits // 32))
    np.testing.assert_array_equal(np.array(words), pack_reference(indices, bits))
    np.testing.assert_array_equal(np.array(unpack(words, bits, dim)), indices)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_matches_lloyd_max_distortion(bits):
    # Norm correction rescales by ||z||/||c[idx]||: measured +2.4% MSE at 2 bits, -1.5% at 4.
    x = mx.array(random_unit_vectors(8192, 128, seed=bits), mx.float32)
    x_hat = dequantize(quantize(x, bits))
    mse = mx.mean(mx.sum((x - x_hat) ** 2, axis=-1)).item()
    np.testing.assert_allclose(mse, lloyd_max(bits, 128)[2], rtol=0.05)


@pytest.mark.parametrize("dim", SUPPORTED_DIMS)
@pytest.mark.parametrize("bits", range(2, 9))
def test_nbytes(bits, dim):
    q = quantize(mx.ones((2, 5, dim)), bits)
    assert q.shape == (2, 5, dim)
    # A row pads to a whole uint32 word (D = 80, 112 at odd bits), plus a float32 scale.
    assert q.nbytes == 10 * (4 * math.ceil(dim * bits / 32) + 4)
    if dim % 32 == 0:
        assert q.nbytes <= 10 * (dim * bits / 8 + 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_preserved(dtype):
    x = mx.random.normal((3, 128), key=mx.random.key(0)).astype(dtype)
    q = quantize(x, 4)
    x_hat = dequantize(q)
    assert q.dtype == dtype and x_hat.dtype == dtype and x_hat.shape == x.shape
    err = mx.sum((x_hat.astype(mx.float32) - x.astype(mx.float32)) ** 2).item()
    assert err < 0.02 * mx.sum(x.astype(mx.float32) ** 2).item()


def test_zero_vectors_round_trip_to_zero():
    x = mx.concatenate([mx.zeros((2, 64)), mx.ones((1, 64))])
    x_hat = np.array(dequantize(quantize(x, 3)))
    assert np.all(x_hat[:2] == 0) and np.all(np.isfinite(x_hat))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_raises(bad):
    x = mx.ones((4, 128))
    x[2, 7] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize(x, 4)
    quantize(x, 4, check_finite=False)


@pytest.mark.parametrize(
    "x, bits, error, message",
    [
        (mx.zeros((2, 128), mx.int32), 4, TypeError, "float16, bfloat16, float32"),
        (mx.zeros((2, 128), mx.float64), 4, TypeError, "float16, bfloat16, float32"),
        (np.zeros((2, 128), np.float32), 4, TypeError, "mx.array"),
        (mx.array(1.0), 4, ValueError, r"\(..., D\)"),
        (mx.zeros((2, 72)), 4, ValueError, r"\(64, 80, 96, 112, 128, 192, 256\)"),
        (mx.zeros((2, 128)), 1, ValueError, r"\(2, 3, 4, 5, 6, 7, 8\)"),
        (mx.zeros((2, 128)), 9, ValueError, r"\(2, 3, 4, 5, 6, 7, 8\)"),
    ],
)
def test_bad_input_raises(x, bits, error, message):
    with pytest.raises(error, match=message):
        quantize(x, bits)


def test_qjl_needs_three_bits():
    with pytest.raises(ValueError, match="bits >= 3"):
        quantize(mx.ones((1, 128)), 2, qjl=True)


def test_offset_is_added_back():
    rng = np.random.default_rng(0)
    mu = rng.standard_normal((2, 1, 128)).astype(np.float32) * 5
    x = mu + rng.standard_normal((2, 16, 128)).astype(np.float32)
    q = quantize(mx.array(x), 4, offset=mx.array(mu))
    assert q.offset.shape == (2, 1, 128)
    centred = dequantize(quantize(mx.array(x - mu), 4))
    np.testing.assert_allclose(np.array(dequantize(q)) - mu, np.array(centred), atol=1e-5)


def test_seeds_give_different_data():
    x = mx.random.normal((4, 128), key=mx.random.key(0))
    a, b = quantize(x, 4, seed=0), quantize(x, 4, seed=1)
    assert not mx.array_equal(a.data[..., :-1], b.data[..., :-1])
    assert isinstance(a, TurboQuantized) and a.seed == 0 and b.seed == 1
    for q in (a, b):
        assert mx.sum((dequantize(q) - x) ** 2).item() < 0.02 * mx.sum(x**2).item()


def inner_product_errors(bits, n_seeds=64, n=256, cosine=0.5, **kwargs):
    """(<q, k_hat> - <q, k>) / (||q|| ||k||) over keys and rotation/sketch seeds."""
    errors = []
    for seed in range(n_seeds):
        k = np.random.default_rng(seed).standard_normal((n, 128)).astype(np.float32)
        q = queries_at_cosine(k, cosine, seed=seed + 1000)
        k_hat = np.array(dequantize(quantize(mx.array(k), bits, seed, **kwargs)))
        errors.append(((k_hat - k) * q).sum(-1) / np.linalg.norm(k, axis=-1))
    errors = np.concatenate(errors)
    return errors.mean(), errors.std() / math.sqrt(errors.size)


@pytest.mark.parametrize("bits", [3, 4])
def test_qjl_inner_products_are_unbiased(bits):
    bias, stderr = inner_product_errors(bits, qjl=True)
    assert abs(bias) < 4 * stderr


@pytest.mark.parametrize("bits", [2, 3])
def test_mse_inner_products_shrink(bits):
    # Lloyd-Max centroids give E<z, z_hat> = E||z_hat||^2 = 1 - d: <q, k> would shrink by
    # (1 - d); norm correction rescales by 1/||z_hat|| ~ 1/sqrt(1 - d): less, still biased.
    d, cosine = lloyd_max(bits, 128)[2], 0.5
    bias, stderr = inner_product_errors(bits)
    assert abs(bias + cosine * (1 - math.sqrt(1 - d))) < 4 * stderr + 0.02 * cosine * d
    assert bias < -10 * stderr
