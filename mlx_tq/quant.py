"""The packed TurboQuant format: rotate, quantise each coordinate with a Lloyd-Max codebook,
pack tightly; and back. Encode and decode kernels are dispatched here, attention elsewhere."""

import math
from dataclasses import dataclass, replace
from functools import cache, lru_cache

import mlx.core as mx
import numpy as np

from . import kernels
from .codebook import SUPPORTED_BITS, codebook
from .rotation import check_head_dim, kernel_rotation, rotate, unrotate

FLOAT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)


def words_per_row(dim: int, bits: int) -> int:
    """uint32 words of one packed vector: the index bits, then one float32 scale."""
    return -(-dim * bits // 32) + 1


def pack(indices: mx.array, bits: int) -> mx.array:
    """Packs (..., D) integers < 2**bits into (..., ceil(D*bits/32)) uint32, LSB first.

    Element i occupies bits [i*bits, (i+1)*bits) of the row's bit stream, so 3-bit
    rows hold exactly 3 bits per element and an element may straddle two words.
    """
    *lead, dim = indices.shape
    n_words = -(-dim * bits // 32)
    planes = (indices.astype(mx.uint32)[..., None] >> mx.arange(bits, dtype=mx.uint32)) & 1
    pad = [(0, 0)] * len(lead) + [(0, n_words * 32 - dim * bits)]
    planes = mx.pad(planes.reshape(*lead, dim * bits), pad)
    planes = planes.reshape(*lead, n_words, 32) << mx.arange(32, dtype=mx.uint32)
    return planes.sum(axis=-1).astype(mx.uint32)


@cache
def _unpack_plan(dim: int, bits: int):
    pos = np.arange(dim) * bits
    word, shift = pos >> 5, pos & 31
    spill = shift + bits > 32
    nxt = np.minimum(word + 1, max(word.max(), 0))
    return tuple(mx.array(a.astype(np.uint32)) for a in (word, shift, nxt, spill))


def unpack(words: mx.array, bits: int, dim: int) -> mx.array:
    """Inverse of `pack`: (..., W) uint32 -> (..., D) uint32 indices."""
    word, shift, nxt, spill = _unpack_plan(dim, bits)
    lo = mx.take(words, word, axis=-1) >> shift
    # (w << (31 - s)) << 1 avoids the undefined shift by 32 when s == 0.
    hi = (mx.take(words, nxt, axis=-1) << (31 - shift)) << 1
    return (lo | mx.where(spill.astype(mx.bool_), hi, 0)) & ((1 << bits) - 1)


@dataclass(eq=False, slots=True)
class TurboQuantized:
    """Packed TurboQuant vectors.

    Attributes:
        data: (..., W + 1) uint32: ceil(D*bits/32) words of packed codebook indices,
            then the float32 scale (bit-cast) with x = scale * R^T c[idx] (+ offset).
        bits, dim, seed: codebook width, vector length D, rotation seed.
        dtype: the dtype of the original vectors (returned by `dequantize`).
        offset: optional float32 (..., 1, D) subtracted before quantising (constant
            along the sequence axis -2, e.g. a per-head key mean).
        qjl: optional (..., ceil(D/32) + 1) uint32: 1-bit residual sign sketch and
            the float32 residual norm (QJL, the paper's Q_prod; off by default).
        channel_scale: optional float32 (..., 1, D) the vectors were divided by, per
            channel, after the offset: x = s * (R^T z) + offset.
        recent: optional (..., E, D) exact vectors (the original dtype) of the last E rows,
            which replace them where read (a cache's newest tokens); attention takes
            them for each query's `window` newest positions only (see attention.py).
        window: positions per query attended through `recent` (with recent, >= 1).
    """

    data: mx.array
    bits: int
    dim: int
    seed: int = 0
    dtype: mx.Dtype = mx.float32
    offset: mx.array | None = None
    qjl: mx.array | None = None
    channel_scale: mx.array | None = None
    recent: mx.array | None = None
    window: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.data.shape[:-1], self.dim)

    @property
    def nbytes(self) -> int:
        extra = (self.offset, self.qjl, self.channel_scale, self.recent)
        return self.data.nbytes + sum(a.nbytes for a in extra if a is not None)

    def indices(self) -> mx.array:
        return unpack(self.data[..., :-1], self.bits, self.dim)

    def scales(self) -> mx.array:
        return self.data[..., -1:].view(mx.float32)[..., 0]

    def rotated(self) -> mx.array:
        """(..., D) float32 reconstruction in the rotated space, without the offset."""
        levels, _ = codebook(self.bits, self.dim)
        z = levels[self.indices()] * self.scales()[..., None]
        z = z if self.qjl is None else z + _qjl_rotated(self)
        return z if self.recent is None else _replace_tail(z, self.recent_rotated())

    def recent_rotated(self) -> mx.array:
        """The recent rows as `rotated` reads them: (..., E, D) float32, without the offset."""
        x = self.recent.astype(mx.float32)
        if self.offset is not None:
            x = x - self.offset
        if self.channel_scale is not None:
            x = x / self.channel_scale
        return rotate(x, self.seed)

    def tokens(self, start: int, stop: int) -> "TurboQuantized":
        """The vectors [start, stop) along the sequence axis -2."""
        qjl = None if self.qjl is None else self.qjl[..., start:stop, :]
        recent = self.recent
        if recent is not None:
            first = self.data.shape[-2] - recent.shape[-2]  # the first recent row
            recent = recent[..., max(start, first) - first : max(stop, first) - first, :]
            recent = recent if recent.shape[-2] else None
        return replace(self, data=self.data[..., start:stop, :], qjl=qjl, recent=recent)


def _replace_tail(x: mx.array, tail: mx.array) -> mx.array:
    """x (..., S, D) with its last E rows replaced by tail (..., E, D)."""
    return mx.concatenate([x[..., : x.shape[-2] - tail.shape[-2], :], tail], axis=-2)


def check_bits(bits: int, name: str = "bits"):
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{name}={bits} is not supported: choose one of {SUPPORTED_BITS}")


def check_input(x: mx.array, name: str = "x"):
    if not isinstance(x, mx.array):
        raise TypeError(f"{name} must be an mx.array, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {x.dtype}: supported dtypes are float16, bfloat16, float32"
        )
    if x.ndim < 1:
        raise ValueError(f"{name} must have shape (..., D), got a scalar")
    check_head_dim(x.shape[-1])


def quantize_indices(z: mx.array, bits: int) -> mx.array:
    """Nearest codebook level of each coordinate of z (..., D), by binary search."""
    _, boundaries = codebook(bits, z.shape[-1])
    idx = mx.zeros(z.shape, dtype=mx.uint32)
    for k in reversed(range(bits)):
        cand = idx + (1 << k)
        idx = mx.where(z > boundaries[cand - 1], cand, idx)
    return idx


@cache
def _qjl_matrix(dim: int, seed: int) -> mx.array:
    return mx.array(np.random.default_rng(seed + 7919).standard_normal((dim, dim), np.float32))


def quantize(
    x: mx.array,
    bits: int,
    seed: int = 0,
    *,
    offset: mx.array | None = None,
    channel_scale: mx.array | None = None,
    qjl: bool = False,
    check_finite: bool = True,
) -> TurboQuantized:
    """Quantises vectors with TurboQuant.

    Args:
        x: (..., D) float16, bfloat16 or float32, D in `SUPPORTED_DIMS`.
        bits: Bits per element (2-8). With `qjl`, bits - 1 go to the codebook and
            one to the residual sign sketch.
        seed: Seed of the random signs of the rotation.
        offset: Optional (..., 1, D) vector subtracted before quantising (e.g. a key mean).
        channel_scale: Optional positive (..., 1, D) divisor per channel, applied after
            the offset (key smoothing: attention multiplies the queries by it instead).
        qjl: Add the 1-bit QJL residual sketch (unbiased inner products).
        check_finite: Raise on NaN or inf (costs a synchronisation).

    Returns:
        A `TurboQuantized` holding D*bits/8 bytes per vector plus a 4-byte scale.
    """
    check_input(x)
    check_bits(bits)
    if qjl and bits < 3:
        raise ValueError("qjl needs bits >= 3 (bits - 1 for the codebook, 1 for the sketch)")
    for name, a in (("x", x), ("offset", offset)):
        if check_finite and a is not None and not mx.all(mx.isfinite(a)).item():
            raise ValueError(f"{name} contains NaN or inf: TurboQuant only stores finite vectors")
    dim = x.shape[-1]
    mse_bits = bits - 1 if qjl else bits
    xf = x.astype(mx.float32)
    if offset is not None:
        offset = offset.astype(mx.float32)
        xf = xf - offset
    if channel_scale is not None:
        channel_scale = channel_scale.astype(mx.float32)
        xf = xf / channel_scale
    norms = mx.linalg.norm(xf, axis=-1, keepdims=True)
    z = rotate(xf / mx.where(norms > 0, norms, 1), seed) * math.sqrt(dim)
    idx = quantize_indices(z, mse_bits)
    zq = codebook(mse_bits, dim)[0][idx]
    # Norm correction: the reconstruction keeps the exact norm (lower MSE than norm / sqrt(D)).
    scales = norms / mx.linalg.norm(zq, axis=-1, keepdims=True)
    data = mx.concatenate([pack(idx, mse_bits), scales.view(mx.uint32)], axis=-1)
    sketch = None
    if qjl:
        residual = z * (norms / math.sqrt(dim)) - zq * scales  # rotated space
        signs = (residual @ _qjl_matrix(dim, seed).T) >= 0
        gamma = mx.linalg.norm(residual, axis=-1, keepdims=True)
        sketch = mx.concatenate([pack(signs, 1), gamma.view(mx.uint32)], axis=-1)
    return TurboQuantized(data, mse_bits, dim, seed, x.dtype, offset, sketch, channel_scale)


# Rows per threadgroup of quantize.metal: they share each read of rt. Up to
# QUANTIZE_ONE_ROW rows (decode: B * H of them) one row per threadgroup instead, so that
# no threadgroup waits for a loop over rows.
QUANTIZE_ROWS = 4
QUANTIZE_ONE_ROW = 256


def quantize_kv_ops(keys, values, key_bits, value_bits, seed=0, key_offset=None, key_scale=None):
    """Reference of `quantize_kv`, in plain MLX ops."""
    k = quantize(
        keys, key_bits, seed, offset=key_offset, channel_scale=key_scale, check_finite=False
    )
    return k.data, quantize(values, value_bits, seed, check_finite=False).data


@cache
def quantize_template(dtype, dim, key_bits, value_bits, scaled=False, window=0, rows=QUANTIZE_ROWS):
    """Template constants of quantize.metal (built once per variant: decode is launch-bound)."""
    return [
        ("T", dtype),
        ("D", dim),
        ("KB", key_bits),
        ("VB", value_bits),
        ("WK", words_per_row(dim, key_bits) - 1),
        ("WV", words_per_row(dim, value_bits) - 1),
        ("ROWS", rows),
        ("SCALE", scaled),
        ("POW2", dim & (dim - 1) == 0),
        ("RW", window),
    ]


@cache
def _zeros(dim):
    return mx.zeros((1, dim), mx.float32)


def key_rows(a, shape):
    """A (..., 1, D) key offset or scale as the kernel's float32 (N / P, D) rows: one per run
    of shape[-2] keys (a cache computes these once)."""
    *lead, dim = shape
    return mx.contiguous(
        mx.broadcast_to(a.astype(mx.float32), (*lead[:-1], 1, dim)).reshape(-1, dim)
    )


def quantize_kv(
    keys: mx.array,
    values: mx.array,
    key_bits: int,
    value_bits: int,
    seed: int = 0,
    key_offset: mx.array | None = None,
    key_scale: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """Packed TurboQuant rows of new keys and values, for a cache to store.

    Each equals `quantize(x, bits, seed, offset=..., channel_scale=..., check_finite=False).data`
    (keys with the offset and scale, values without): one GPU kernel for both where Metal or
    CUDA runs custom kernels (indices may differ only where a coordinate sits on a level
    midpoint to float rounding), plain MLX ops elsewhere.

    Args:
        keys, values: (..., L, D) float16, bfloat16 or float32, of one shape.
        key_bits, value_bits: Bits per element, 2-8.
        seed: Seed of the rotation's signs.
        key_offset: Optional (..., 1, D) vector subtracted from the keys first.
        key_scale: Optional positive (..., 1, D) divisor of the keys, after the offset.

    Returns:
        (..., L, W + 1) uint32 keys and values: W = ceil(D * bits / 32) words of indices,
        then the scale.
    """
    check_input(keys, "keys")
    check_input(values, "values")
    check_bits(key_bits, "key_bits")
    check_bits(value_bits, "value_bits")
    if keys.shape != values.shape or keys.ndim < 2:
        raise ValueError(f"keys {keys.shape} and values {values.shape} must be one (..., L, D)")
    if kernels.backend() is None or keys.size == 0:
        return quantize_kv_ops(keys, values, key_bits, value_bits, seed, key_offset, key_scale)
    *lead, L, D = keys.shape
    if key_offset is None and key_scale is None:
        shape, offset, scale = (1, 1, keys.size // D, D), _zeros(D), None
    else:
        shape = (1, math.prod(lead), L, D)
        offset = _zeros(D) if key_offset is None else key_rows(key_offset, keys.shape)
        scale = None if key_scale is None else key_rows(key_scale, keys.shape)
    k, v = quantize_kv_rows(
        keys.reshape(shape), values.reshape(shape), key_bits, value_bits, seed, offset, scale
    )
    return k.reshape(*lead, L, -1), v.reshape(*lead, L, -1)


@lru_cache(maxsize=64)
def _quantize_call(dtype, shape, key_bits, value_bits, seed, scaled, window_shape):
    """The quantise kernel and its arguments other than the inputs that change, for keys
    of `shape` (B, H, L, D) and a window of `window_shape` (B, H, W, D) or None: built once
    per variant and shape (a decode step repeats one)."""
    *lead, dim = shape
    W = 0 if window_shape is None else window_shape[-2]
    rows = 1 if math.prod(lead) <= QUANTIZE_ONE_ROW else QUANTIZE_ROWS
    template = quantize_template(dtype, dim, key_bits, value_bits, scaled, W, rows)
    kernel = kernels.kernel("quantize", template=tuple(template))
    constants = [kernel_rotation(dim, seed), *codebook(key_bits, dim), *codebook(value_bits, dim)]
    threads = 32 * -(-dim // 32)
    words = (words_per_row(dim, key_bits), words_per_row(dim, value_bits))
    call = dict(
        grid=(threads * 2 * -(-math.prod(lead) // rows), 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[*((*lead, w) for w in words)] + [window_shape or (1,)] * 2,
        output_dtypes=[mx.uint32, mx.uint32, dtype, dtype],
    )
    return kernel, constants, call


def quantize_kv_launch(dtype, shape, key_bits, value_bits, seed, offset, scale, window_shape=None):
    """`quantize_kv_rows` for keys of one `shape` and dtype, its other arguments bound: a
    function of (keys, values, window) that launches the kernel and returns all its outputs
    (a cache builds it once and calls it every decode step)."""
    kernel, constants, call = _quantize_call(
        dtype, shape, key_bits, value_bits, seed, scale is not None, window_shape
    )
    # scale is not read without SCALE, nor the window's inputs and outputs without RW.
    fixed = [*constants, offset, offset if scale is None else scale]
    unread = (offset, offset)

    def launch(keys, values, window=None):
        return kernel(inputs=[keys, values, *fixed, *(window or unread)], **call)

    return launch


def quantize_kv_rows(keys, values, key_bits, value_bits, seed, offset, scale, window=None):
    """The kernel of `quantize_kv`, inputs checked: keys and values (B, H, L, D), `offset`
    and `scale` (or None) float32 (B * H, D) rows, or one (1, D) offset row for all when
    B * H * L keys are passed as (1, 1, N, D). With `window`, a cache's exact keys and values
    (B, H, W, D) each in the keys' dtype (oldest row first) and L = 1, the same launch also
    returns them shifted by one row with these keys and values last: (k, v, k_win, v_win)."""
    shape = None if window is None else window[0].shape
    launch = quantize_kv_launch(
        keys.dtype, keys.shape, key_bits, value_bits, seed, offset, scale, shape
    )
    out = launch(keys, values, window)
    return out if window else out[:2]


def _qjl_rotated(q: TurboQuantized) -> mx.array:
    """QJL estimate of the residual in the rotated space, (..., D) float32."""
    signs = unpack(q.qjl[..., :-1], 1, q.dim).astype(mx.float32) * 2 - 1
    gamma = q.qjl[..., -1:].view(mx.float32)
    return gamma * math.sqrt(math.pi / 2) / q.dim * (signs @ _qjl_matrix(q.dim, q.seed))


def dequantize(q: TurboQuantized) -> mx.array:
    """Reconstructs the vectors of `q` in their original dtype."""
    x = unrotate(replace(q, recent=None).rotated(), q.seed)
    if q.channel_scale is not None:
        x = x * q.channel_scale
    if q.offset is not None:
        x = x + q.offset
    if q.dtype == mx.float16:
        # The reconstruction error may carry a value near the fp16 limit past it: not to inf.
        x = mx.clip(x, -65504, 65504)
    x = x.astype(q.dtype)
    return x if q.recent is None else _replace_tail(x, q.recent)


def decode_rotated_ops(t: TurboQuantized, dtype, shift: int = 0) -> mx.array:
    """Reference of `decode_rotated`, in plain MLX ops."""
    return (t.rotated() * 2.0**-shift).astype(dtype)


def dequantize_template(dtype, D, bits, shift):
    """Template constants of dequantize.metal."""
    return [
        ("T", dtype),
        ("D", D),
        ("BITS", bits),
        ("W", words_per_row(D, bits) - 1),
        ("SHIFT", shift),
    ]


def decode_rotated(t: TurboQuantized, dtype, shift: int = 0) -> mx.array:
    """t's vectors in the rotated space without the offset, divided by 2^shift, in `dtype`:
    (B, H, S, D). On a GPU one kernel writes `dtype` directly, so the transient is the
    output alone (the ops hold several uint32 arrays of the same size)."""
    if t.recent is not None:
        n = t.data.shape[-2] - t.recent.shape[-2]
        packed = decode_rotated(replace(t, recent=None).tokens(0, n), dtype, shift)
        exact = (t.recent_rotated() * 2.0**-shift).astype(dtype)
        return mx.concatenate([packed, exact], axis=-2)
    if (
        kernels.backend() is None
        or t.qjl is not None
        or t.data.ndim != 4
        or t.data.shape[2] == 0
        or t.data.size // t.data.shape[-1] * t.dim >= 2**31
    ):
        return decode_rotated_ops(t, dtype, shift)
    B, H, S, D = t.shape
    threads = 32 * -(-D // 32)
    template = tuple(dequantize_template(dtype, D, t.bits, shift))
    kernel = kernels.kernel("dequantize", contiguous=False, template=template)
    (out,) = kernel(
        inputs=[t.data, codebook(t.bits, D)[0]],
        grid=(threads * B * H * S, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(B, H, S, D)],
        output_dtypes=[dtype],
    )
    return out
