"""Lloyd-Max codebooks for one coordinate of a randomly rotated vector.

After a random rotation, a unit vector in R^D has coordinates t with density
proportional to (1 - t^2)^((D - 3) / 2) on [-1, 1] (a Beta((D-1)/2, (D-1)/2) law
moved to [-1, 1]). We work in units z = sqrt(D) t, whose law tends to N(0, 1).
"""

from functools import cache
from pathlib import Path

import mlx.core as mx
import numpy as np
from scipy import special

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
SUPPORTED_DIMS = (64, 80, 96, 112, 128, 192, 256)
# Lloyd-Max at 6-8 bits takes seconds to converge, so the head dims we support are shipped.
TABLE = Path(__file__).with_name("codebooks.npz")


def _law(dim: int):
    """(cdf, partial first moment, partial second moment) of z = sqrt(D) t."""
    a = (dim - 1) / 2  # t = 2 B - 1 with B ~ Beta(a, a)
    alpha = (dim - 3) / 2
    norm = special.beta(0.5, alpha + 1)  # integral of (1 - t^2)^alpha over [-1, 1]
    root = np.sqrt(dim)

    def cdf(z):
        t = np.clip(np.asarray(z, dtype=np.float64) / root, -1, 1)
        return special.betainc(a, a, (t + 1) / 2)

    def moment1(z):
        # integral of z f(z) dz from -inf: closed form of t (1 - t^2)^alpha
        t = np.clip(np.asarray(z, dtype=np.float64) / root, -1, 1)
        return -root * (1 - t * t) ** (alpha + 1) / (2 * (alpha + 1) * norm)

    def moment2(z):
        # integral of z^2 f(z) dz from -inf: t^2 ~ Beta(3/2, alpha + 1) on each half
        t = np.clip(np.asarray(z, dtype=np.float64) / root, -1, 1)
        half = special.betainc(1.5, alpha + 1, t * t) / 2
        return np.where(t < 0, 0.5 - half, 0.5 + half)

    return cdf, moment1, moment2


@cache
def lloyd_max(bits: int, dim: int, tol: float = 1e-10, max_iter: int = 100_000):
    """Lloyd-Max quantiser for one rotated coordinate, in units z = sqrt(D) t.

    Args:
        bits: Bits per coordinate (2**bits levels).
        dim: The vector dimension D.

    Returns:
        (levels, boundaries, distortion): float64 NumPy arrays of 2**bits sorted
        levels and 2**bits - 1 decision boundaries, and E[(z - Q(z))^2].
    """
    if bits not in (1, *SUPPORTED_BITS):
        raise ValueError(f"bits={bits} is not supported: choose one of {SUPPORTED_BITS}")
    if dim < 4:
        raise ValueError(f"dim={dim} is too small for a rotated-coordinate codebook")
    cdf, moment1, moment2 = _law(dim)
    n = 2**bits
    root = np.sqrt(dim)
    # Start from the companding optimum (quantiles of N(0, 3) ~ f^(1/3)), then iterate.
    levels = np.sqrt(3) * special.ndtri((np.arange(n) + 0.5) / n)
    levels = levels.clip(-0.99 * root, 0.99 * root)
    for _ in range(max_iter):
        edges = np.concatenate([[-root], (levels[1:] + levels[:-1]) / 2, [root]])
        new = np.diff(moment1(edges)) / np.diff(cdf(edges))
        converged = np.max(np.abs(new - levels)) < tol
        levels = new
        if converged:
            break
    edges = np.concatenate([[-root], (levels[1:] + levels[:-1]) / 2, [root]])
    mass = np.diff(cdf(edges))
    m1 = np.diff(moment1(edges))
    m2 = np.diff(moment2(edges))
    distortion = float(np.sum(m2 - 2 * levels * m1 + levels**2 * mass))
    return levels, edges[1:-1], distortion


@cache
def _table():
    return dict(np.load(TABLE)) if TABLE.exists() else {}


@cache
def codebook(bits: int, dim: int) -> tuple[mx.array, mx.array]:
    """The (levels, boundaries) of `lloyd_max` as float32 MLX arrays."""
    levels = _table().get(f"{bits}_{dim}")
    if levels is None:
        levels = lloyd_max(bits, dim)[0]
    boundaries = (levels[1:] + levels[:-1]) / 2
    return mx.array(levels, dtype=mx.float32), mx.array(boundaries, dtype=mx.float32)


if __name__ == "__main__":
    # Regenerate the shipped table: python -m mlx_tq.codebook
    np.savez(
        TABLE,
        **{f"{b}_{d}": lloyd_max(b, d)[0] for b in SUPPORTED_BITS for d in SUPPORTED_DIMS},
    )
