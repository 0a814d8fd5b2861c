import math

import mlx.core as mx
import numpy as np
import pytest
from scipy import stats

from mlx_tq.codebook import SUPPORTED_DIMS, _law
from mlx_tq.rotation import rotate, rotation_matrix, unrotate


def random_unit_vectors(n, dim, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, dim))
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def rotated_coordinate_cdf(z, dim):
    """cdf of z = sqrt(D) t, t one coordinate of a uniform unit vector: (t + 1) / 2 ~ Beta."""
    a = (dim - 1) / 2
    return stats.beta.cdf((np.asarray(z) / math.sqrt(dim) + 1) / 2, a, a)


@pytest.mark.parametrize("dim", SUPPORTED_DIMS)
@pytest.mark.parametrize("seed", [0, 3])
def test_orthogonal_and_invertible(dim, seed):
    r = np.array(rotation_matrix(dim, seed), dtype=np.float64)
    np.testing.assert_allclose(r @ r.T, np.eye(dim), atol=1e-5)
    # A signed Hadamard matrix spreads every basis vector evenly.
    np.testing.assert_allclose(np.abs(r), 1 / math.sqrt(dim), rtol=1e-5)
    x = mx.random.normal((2, 3, dim), key=mx.random.key(dim))
    z = rotate(x, seed)
    np.testing.assert_allclose(np.array(unrotate(z, seed)), np.array(x), atol=1e-5)
    np.testing.assert_allclose(np.array(z), np.array(x) @ r, atol=1e-5)
    assert not np.allclose(np.array(z), np.array(x), atol=0.1)


def test_seeds_give_different_rotations():
    assert not np.allclose(np.array(rotation_matrix(128, 0)), np.array(rotation_matrix(128, 1)))


@pytest.mark.parametrize("dim", [72, 100, 512, 32])
def test_unsupported_dim_raises(dim):
    with pytest.raises(ValueError, match=r"head_dim .*\(64, 80, 96, 112, 128, 192, 256\)"):
        rotate(mx.zeros((2, dim)))


@pytest.mark.parametrize("dim", [64, 80, 128, 256])
def test_rotated_coordinates_follow_the_beta_law(dim):
    # One coordinate per vector (coordinate i mod D of vector i) keeps the sample independent.
    n = 4000
    z = np.array(rotate(mx.array(random_unit_vectors(n, dim, seed=dim), mx.float32)))
    sample = math.sqrt(dim) * z[np.arange(n), np.arange(n) % dim]
    assert stats.kstest(sample, rotated_coordinate_cdf, args=(dim,)).pvalue > 1e-3
    grid = np.linspace(-3, 3, 13)
    np.testing.assert_allclose(_law(dim)[0](grid), rotated_coordinate_cdf(grid, dim), atol=1e-12)
