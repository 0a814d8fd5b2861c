import numpy as np
import pytest
from scipy import integrate, special

from mlx_tq.codebook import SUPPORTED_BITS, SUPPORTED_DIMS, _table, codebook, lloyd_max

# N(0, 1) Lloyd-Max quantisers (Max 1960), the D -> infinity limit of the rotated-coordinate law.
GAUSSIAN_LEVELS = {
    2: [0.4528, 1.5104],
    3: [0.2451, 0.7560, 1.3440, 2.1520],
}
GAUSSIAN_DISTORTION = {2: 0.1175, 3: 0.03454, 4: 0.009497}


def lloyd_max_quad(bits, dim, tol=1e-10):
    """Lloyd iterations with cell means by numerical integration of (1 - z^2/D)^((D-3)/2)."""
    root = np.sqrt(dim)
    density = lambda z: (1 - z * z / dim) ** ((dim - 3) / 2)  # noqa: E731
    levels = np.linspace(-2.5, 2.5, 2**bits)
    while True:
        edges = np.concatenate([[-root], (levels[1:] + levels[:-1]) / 2, [root]])
        cells = list(zip(edges[:-1], edges[1:], strict=True))
        new = np.array(
            [
                integrate.quad(lambda z: z * density(z), lo, hi, epsabs=1e-14)[0]
                / integrate.quad(density, lo, hi, epsabs=1e-14)[0]
                for lo, hi in cells
            ]
        )
        if np.max(np.abs(new - levels)) < tol:
            break
        levels = new
    total = integrate.quad(density, -root, root)[0]
    distortion = sum(
        integrate.quad(lambda z, c=c: (z - c) ** 2 * density(z), lo, hi)[0]
        for c, (lo, hi) in zip(new, cells, strict=True)
    )
    return new, distortion / total


def lloyd_step_beta(levels, dim):
    """One Lloyd step by the incomplete Beta function: t = 2B - 1, B ~ Beta(a, a)."""
    a, root = (dim - 1) / 2, np.sqrt(dim)
    edges = np.concatenate([[-root], (levels[1:] + levels[:-1]) / 2, [root]])
    x = (edges / root + 1) / 2
    mass = np.diff(special.betainc(a, a, x))
    mean_b = np.diff(special.betainc(a + 1, a, x)) / 2  # E[B; cell], as E[B] = 1/2
    return root * (2 * mean_b / mass - 1)


@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_lloyd_max_matches_quadrature(bits, dim):
    levels, boundaries, distortion = lloyd_max(bits, dim)
    expected, expected_distortion = lloyd_max_quad(bits, dim)
    np.testing.assert_allclose(levels, expected, atol=1e-6)
    np.testing.assert_allclose(boundaries, (expected[1:] + expected[:-1]) / 2, atol=1e-6)
    np.testing.assert_allclose(distortion, expected_distortion, rtol=1e-8)


def test_shipped_table_matches_lloyd_max():
    table = _table()
    assert set(table) == {f"{b}_{d}" for b in SUPPORTED_BITS for d in SUPPORTED_DIMS}
    for bits in (2, 3, 4, 5):
        for dim in SUPPORTED_DIMS:
            expected = lloyd_max(bits, dim)[0]
            np.testing.assert_allclose(table[f"{bits}_{dim}"], expected, atol=1e-9)
            np.testing.assert_allclose(np.array(codebook(bits, dim)[0]), expected, rtol=1e-6)


@pytest.mark.parametrize("dim", [80, 256])
def test_shipped_8_bit_entry_is_a_lloyd_max_fixed_point(dim):
    # Recomputing 8 bits takes seconds; a fixed point of a log-concave law is the optimum.
    levels = _table()[f"8_{dim}"]
    assert levels.shape == (256,) and np.all(np.diff(levels) > 0)
    np.testing.assert_allclose(lloyd_step_beta(levels, dim), levels, atol=1e-8)


@pytest.mark.parametrize("bits", [2, 3])
def test_large_dim_levels_tend_to_gaussian(bits):
    levels = lloyd_max(bits, 100_000)[0]
    half = np.array(GAUSSIAN_LEVELS[bits])
    np.testing.assert_allclose(levels, np.concatenate([-half[::-1], half]), atol=1e-3)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_large_dim_distortion_tends_to_gaussian(bits):
    np.testing.assert_allclose(lloyd_max(bits, 100_000)[2], GAUSSIAN_DISTORTION[bits], rtol=1e-3)


def test_unsupported_arguments_raise():
    with pytest.raises(ValueError, match=r"choose one of \(2, 3, 4, 5, 6, 7, 8\)"):
        lloyd_max(9, 128)
    with pytest.raises(ValueError, match="too small"):
        lloyd_max(2, 3)
