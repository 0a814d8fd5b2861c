"""Quantiser choices by measurement: norm correction, fp16 scales, key offset, QJL.

Run: python benchmarks/core_choices.py  (prints markdown tables; CPU is fine)

Metrics over N keys k and unit queries q at cosine 0.5 to each key (so a shrink shows as bias):
  MSE   E ||k - k_hat||^2 / ||k||^2
  bias  mean of (<q, k_hat> - <q, k>) / (||q|| ||k||);  std: its standard deviation.
"""

import argparse
import math
from dataclasses import replace

import mlx.core as mx
import numpy as np

from mlx_tq import dequantize, quantize
from mlx_tq.codebook import lloyd_max

COSINE = 0.5
MEAN_FRACTION = 0.7  # ||mu|| / ||k|| for the shared-mean keys


def make_keys(kind, n, dim, rng):
    noise = rng.standard_normal((n, dim)).astype(np.float32)
    if kind == "gauss":
        return noise
    # ||mu||^2 / (||mu||^2 + D) = MEAN_FRACTION^2 for unit-variance noise.
    mu = rng.standard_normal(dim)
    mu *= math.sqrt(dim * MEAN_FRACTION**2 / (1 - MEAN_FRACTION**2)) / np.linalg.norm(mu)
    return (mu + noise).astype(np.float32)


def make_queries(k, rng):
    u = k / np.linalg.norm(k, axis=-1, keepdims=True)
    w = rng.standard_normal(k.shape)
    w -= (w * u).sum(-1, keepdims=True) * u
    w /= np.linalg.norm(w, axis=-1, keepdims=True)
    return COSINE * u + math.sqrt(1 - COSINE**2) * w


def fp16_scales(q):
    """The same quantised vectors with their scale word rounded through float16."""
    scales = q.data[..., -1:].view(mx.float32).astype(mx.float16).astype(mx.float32)
    return replace(q, data=mx.concatenate([q.data[..., :-1], scales.view(mx.uint32)], axis=-1))


def measure(kind, dim, bits, n, n_seeds, offset=False, fp16=False, **kwargs):
    """(MSE, bias, std, stored bits per element) over n_seeds rotation/sketch seeds."""
    rng = np.random.default_rng(dim * 100 + bits)
    sq, ip, nbytes = [], [], 0
    for seed in range(n_seeds):
        k = make_keys(kind, n, dim, rng)
        q = make_queries(k, rng)
        mu = mx.array(k.mean(0, keepdims=True)) if offset else None
        kq = quantize(mx.array(k), bits, seed, offset=mu, **kwargs)
        kq = fp16_scales(kq) if fp16 else kq
        nbytes += kq.nbytes - (0 if mu is None else mu.nbytes)
        k_hat = np.array(dequantize(kq), np.float64)
        norms = np.linalg.norm(k, axis=-1)
        sq.append(((k_hat - k) ** 2).sum(-1) / norms**2)
        ip.append(((k_hat - k) * q).sum(-1) / norms)
    ip = np.concatenate(ip)
    return np.mean(np.concatenate(sq)), ip.mean(), ip.std(), 8 * nbytes / (n * n_seeds * dim)


def row(*cells):
    return "| " + " | ".join(cells) + " |"


def table(header, rows):
    lines = [row(*header), row(*["---"] * len(header))]
    return "\n".join(lines + [row(*r) for r in rows])


def f(x, digits=4):
    return f"{x:.{digits}f}"


def pct(new, old):
    return f"{100 * (new / old - 1):+.3f}%"


NORM_HEADER = ["D", "b", "keys", "MSE corr", "MSE plain", "bias corr", "bias plain"]
NORM_HEADER += ["std corr", "std plain"]
SCALE_HEADER = ["D", "b", "keys", "MSE corr fp32", "fp16", "MSE plain fp32", "fp16"]
SCALE_HEADER += ["bias corr fp16 - fp32", "std corr fp16"]
QJL_HEADER = ["D", "b", "quantiser", "bits/elt", "MSE", "bias", "std"]
MSE_HEADER = ["b", "Lloyd-Max theory", "measured, plain norm", "measured, norm corr (default)"]
MSE_HEADER += ["bits/elt"]
CASES = {
    ("gauss", False): "Gaussian",
    ("mean", False): "mean 0.7",
    ("mean", True): "mean 0.7, offset",
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="keys per seed")
    parser.add_argument("--seeds", type=int, default=8, help="rotation/sketch seeds")
    args = parser.parse_args()
    n, seeds = args.n, args.seeds

    rows_norm, rows_scale = [], []
    for dim in (128, 256):
        for bits in (2, 3, 4):
            for (kind, offset), name in CASES.items():
                nc, nc16, plain, plain16 = [
                    measure(kind, dim, bits, n, seeds, offset, fp16, norm_correction=corr)
                    for corr in (True, False)
                    for fp16 in (False, True)
                ]
                label = [str(dim), str(bits), name]
                rows_norm.append(label + [f(x) for i in range(3) for x in (nc[i], plain[i])])
                rows_scale.append(
                    label
                    + [f(nc[0]), pct(nc16[0], nc[0]), f(plain[0]), pct(plain16[0], plain[0])]
                    + [f"{nc16[1] - nc[1]:+.1e}", pct(nc16[2], nc[2])]
                )
    print(f"### Norm correction (n/||c[idx]||) vs plain (n/sqrt(D)); {n * seeds} keys\n")
    print(table(NORM_HEADER, rows_norm))
    print("\n### fp16 stored scale: change against fp32\n")
    print(table(SCALE_HEADER, rows_scale))

    rows_qjl = []
    for dim in (128, 256):
        for bits in (3, 4):
            for name, kwargs in [
                (f"MSE {bits}-bit, corr", dict(norm_correction=True)),
                (f"MSE {bits}-bit, plain", dict(norm_correction=False)),
                (f"QJL: MSE {bits - 1}-bit corr + 1-bit sketch", dict(qjl=True)),
            ]:
                mse, bias, std, bpe = measure("gauss", dim, bits, n, seeds, **kwargs)
                rows_qjl.append([str(dim), str(bits), name, f(bpe, 3), f(mse), f(bias), f(std)])
    print(f"\n### QJL vs MSE quantiser at the same bits (Gaussian keys, {n * seeds} keys)\n")
    print(table(QJL_HEADER, rows_qjl))

    rows_mse = []
    for bits in (2, 3, 4):
        plain = measure("gauss", 128, bits, n, seeds, norm_correction=False)
        corr = measure("gauss", 128, bits, n, seeds)
        theory = lloyd_max(bits, 128)[2]
        rows_mse.append([str(bits), f(theory, 5), f(plain[0], 5), f(corr[0], 5), f(corr[3], 3)])
    print("\n### Normalised MSE per bit width, D = 128 (Gaussian keys)\n")
    print(table(MSE_HEADER, rows_mse))


if __name__ == "__main__":
    main()
