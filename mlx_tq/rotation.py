"""Randomised Hadamard rotation: z = H S x with S a seeded +-1 diagonal."""

from functools import cache

import mlx.core as mx
import numpy as np

from .codebook import SUPPORTED_DIMS


def check_head_dim(dim: int):
    if dim not in SUPPORTED_DIMS:
        raise ValueError(
            f"head_dim {dim} is not supported: the rotation needs mx.hadamard_transform "
            f"(D = m * 2^k, m in {{1, 12, 20, 28}}); supported head dims are {SUPPORTED_DIMS}"
        )


@cache
def rotation_matrix(dim: int, seed: int = 0) -> mx.array:
    """The orthonormal (D, D) float32 matrix `Rt` with rotate(x) = x @ Rt.

    Built once from `mx.hadamard_transform`. For D = 80 and 112 that transform is
    orthonormal but not symmetric, so the inverse is the transpose, not a second pass.
    """
    check_head_dim(dim)
    signs = np.random.default_rng(seed).choice(np.array([-1.0, 1.0], np.float32), dim)
    hadamard_t = mx.hadamard_transform(mx.eye(dim, dtype=mx.float32))  # rows H e_i
    rt = mx.array(signs)[:, None] * hadamard_t
    # Evaluated now: an unevaluated array cached by one thread fails in another's stream.
    mx.eval(rt)
    return rt


@cache
def kernel_rotation(dim: int, seed: int = 0, inverse: bool = False) -> mx.array:
    """What a kernel reads to rotate (`inverse`: to rotate back): for D a power of two, the
    signs s_i / sqrt(D) as a contiguous float32 (D,) vector (column 0 of `rotation_matrix`,
    row 0 of its transpose; the butterflies need nothing else, and a strided gather of the
    column was where ncu's largest stall sat in the attention at 8K, H200 2026-12-01); else
    the (D, D) matrix, transposed and contiguous when `inverse`."""
    rt = rotation_matrix(dim, seed)
    if dim & (dim - 1):
        out = mx.contiguous(rt.T) if inverse else rt
    else:
        out = mx.contiguous(rt[:, 0])
    mx.eval(out)
    return out


def rotate(x: mx.array, seed: int = 0) -> mx.array:
    """Rotates the last axis of `x` (..., D); float32 result."""
    return x.astype(mx.float32) @ rotation_matrix(x.shape[-1], seed)


def unrotate(z: mx.array, seed: int = 0) -> mx.array:
    """The inverse of `rotate`; float32 result."""
    return z.astype(mx.float32) @ rotation_matrix(z.shape[-1], seed).T
