"""Optimal rounding against nearest-level rounding (issue 18): MSE per unit variance of random
unit vectors in R^D quantised with the Lloyd-Max codebook, the scale stored per vector.

- nearest: each coordinate to its nearest level, scale n / |c| (the package's norm correction)
  or the least-squares scale <z, c> / |c|^2;
- scale search: the indices of nearest(g z) for 31 gains g in [0.85, 1.15], the best kept;
- coordinate descent (LeanKV's TQ3): from there, each coordinate moved to an adjacent level
  when that raises cos(z, c), sweep after sweep (the least-squares error is |z|^2 (1 - cos^2)).

    python benchmarks/rounding_mse.py [--dim 256] [--vectors 4000]
"""

import argparse

import numpy as np

from mlx_tq.codebook import lloyd_max


def mse(z, levels, idx, least_squares):
    c = levels[idx]
    if least_squares:
        a = (z * c).sum(1, keepdims=True) / (c * c).sum(1, keepdims=True)
    else:
        a = np.linalg.norm(z, axis=1, keepdims=True) / np.linalg.norm(c, axis=1, keepdims=True)
    return ((z - a * c) ** 2).sum(1).mean() / z.shape[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--vectors", type=int, default=4000)
    parser.add_argument("--sweeps", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    D = args.dim
    for bits in (3, 4):
        levels, bounds, _ = lloyd_max(bits, D)
        x = rng.standard_normal((args.vectors, D))
        z = x / np.linalg.norm(x, axis=1, keepdims=True) * np.sqrt(D)
        idx = np.searchsorted(bounds, z)
        rows = {"nearest, norm kept": mse(z, levels, idx, False)}
        rows["nearest, least squares"] = mse(z, levels, idx, True)
        c = levels[idx]
        best = np.abs((z * c).sum(1)) / np.linalg.norm(c, axis=1)
        for g in np.linspace(0.85, 1.15, 31):
            cand = np.searchsorted(bounds, z * g)
            c = levels[cand]
            cos = np.abs((z * c).sum(1)) / np.linalg.norm(c, axis=1)
            better = cos > best
            idx[better], best[better] = cand[better], cos[better]
        rows["scale search, least squares"] = mse(z, levels, idx, True)
        c = levels[idx]
        A, B = (z * c).sum(1), (c * c).sum(1)
        for _ in range(args.sweeps):
            for d in range(D):
                for step in (-1, 1):
                    j = np.clip(idx[:, d] + step, 0, len(levels) - 1)
                    A2 = A + z[:, d] * (levels[j] - c[:, d])
                    B2 = B + levels[j] ** 2 - c[:, d] ** 2
                    better = A2**2 / B2 > A**2 / B
                    idx[better, d], c[better, d] = j[better], levels[j][better]
                    A, B = np.where(better, A2, A), np.where(better, B2, B)
        rows[f"+ coordinate descent ({args.sweeps} sweeps), least squares"] = mse(
            z, levels, idx, True
        )
        base = rows["nearest, norm kept"]
        for name, value in rows.items():
            print(f"{bits} bits, D={D}: {name:48s} MSE {value:.5f} ({value / base:.3f}x)")


if __name__ == "__main__":
    main()
