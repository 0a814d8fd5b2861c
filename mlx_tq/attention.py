"""Attention over TurboQuant keys and values, computed in the rotated space.

score_j = <q, k_j> = scale_j <R q, c[idx_j]>, and sum_j p_j v_j = R^T sum_j p_j scale_j c[idx_j]:
the query is rotated once, the output once, and no key is dequantised to the original space.
"""

import math
from functools import cache

import mlx.core as mx

from . import kernels
from .codebook import codebook
from .quant import TurboQuantized, _zeros, check_input, words_per_row
from .rotation import rotate, rotation_matrix, unrotate

# Threadgroups the split-K kernel aims for: about one full wave on an H100.
TARGET_GROUPS = 640
# Query tokens L up to which a GPU runs the fused kernel (decode, speculative decoding);
# longer prefill chunks go through mx.fast SDPA on decoded keys and values.
FUSED_MAX_ROWS = 8
# Floats per block of scores or accumulators of the reference: 1/16 of the bytes of an
# fp16 cache of the same keys, clamped. (MLX may still hold all blocks of one lazy graph at
# once; on a GPU the reference runs only for 1-D masks and empty caches.)
MIN_BLOCK, MAX_BLOCK = 2**18, 2**24


def _check_inputs(queries, keys, values):
    check_input(queries, "queries")
    if queries.ndim != 4:
        raise ValueError(f"queries must have shape (B, Hq, L, D), got {queries.shape}")
    B, Hq, L, D = queries.shape
    if keys.shape != values.shape or keys.shape[0] != B or keys.shape[-1] != D:
        raise ValueError(
            f"queries {queries.shape}, keys {keys.shape} and values {values.shape} must share "
            "B, D, and keys/values their shape"
        )
    if Hq % keys.shape[1]:
        raise ValueError(f"{Hq} query heads are not a multiple of {keys.shape[1]} key/value heads")
    if values.channel_scale is not None:
        raise ValueError("channel_scale is supported for keys only, not for values")
    if (keys.sink is None) != (values.sink is None):
        raise ValueError("keys and values must both have an exact sink row or neither")


def _smooth_queries(queries, keys):
    """<q, s * k'> = <q * s, k'>: keys stored divided by a per-channel scale s."""
    if keys.channel_scale is None:
        return queries
    B, Hq, L, D = queries.shape
    Hkv = keys.shape[1]
    # (B, Hkv, 1, D) -> (B, Hkv, 1, 1, D): one multiply over the G query heads of each KV head.
    s = keys.channel_scale.astype(queries.dtype)[:, :, None]
    return (queries.reshape(B, Hkv, Hq // Hkv, L, D) * s).reshape(B, Hq, L, D)


def _check_mask(mask, B, H, L, S):
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"mask {mask!r} is not supported: use None, 'causal' or an array")
    elif mask is not None and (
        mask.ndim > 4
        or any(m not in (1, n) for m, n in zip(mask.shape[::-1], (S, L, H, B), strict=False))
    ):
        raise ValueError(
            f"mask of shape {mask.shape} does not broadcast to (B, H, L, S) = {(B, H, L, S)}"
        )


def _mask_chunk(mask, L, S, start, stop):
    """The mask for keys [start, stop) as a bool or additive array, or None."""
    if isinstance(mask, str):
        return mx.arange(S - L, S)[:, None] >= mx.arange(start, stop)[None]
    if mask is not None and mask.shape[-1] == S:
        return mask[..., start:stop]
    return mask


def _add_value_offset(out, values, G):
    """Adds the values' offset to out (B, Hq, L, D): the weights sum to one."""
    if values.offset is None:
        return out
    B, Hkv, _, D = values.shape
    offset = mx.broadcast_to(values.offset, (B, Hkv, 1, D))
    return out + mx.repeat(offset, G, axis=1)


def _block_sizes(B, Hq, Hkv, L, S, D):
    """(query rows, keys) per block, so scores and accumulators stay within the budget."""
    budget = min(max(B * Hkv * S * D // 16, MIN_BLOCK), MAX_BLOCK)
    rows = max(1, min(L, budget // (B * Hq * D)))
    return rows, max(1, min(S, budget // (B * Hq * rows)))


def _attend(queries, keys, values, scale, mask, S, chunk_size):
    """Online-softmax attention of queries (B, Hq, L, D) over keys [0, S); float32, rotated."""
    B, Hq, L, D = queries.shape
    Hkv = keys.shape[1]
    G = Hq // Hkv
    q = rotate(queries.astype(mx.float32) * scale, keys.seed).reshape(B, Hkv, G * L, D)
    # Keys' offset is a per-head shift of every score of a query: softmax ignores it.
    m = mx.full((B, Hkv, G * L, 1), -mx.inf, dtype=mx.float32)
    denom = mx.zeros((B, Hkv, G * L, 1), dtype=mx.float32)
    acc = mx.zeros((B, Hkv, G * L, D), dtype=mx.float32)
    for start in range(0, S, chunk_size):
        stop = min(start + chunk_size, S)
        scores = q @ keys.tokens(start, stop).rotated().swapaxes(-1, -2)
        chunk_mask = _mask_chunk(mask, L, S, start, stop)
        if chunk_mask is not None:
            chunk_mask = mx.broadcast_to(chunk_mask, (B, Hq, L, stop - start))
            chunk_mask = chunk_mask.reshape(B, Hkv, G * L, stop - start)
            if chunk_mask.dtype == mx.bool_:
                scores = mx.where(chunk_mask, scores, -mx.inf)
            else:
                scores = scores + chunk_mask.astype(mx.float32)
        m_new = mx.maximum(m, scores.max(axis=-1, keepdims=True))
        # Rows with every key masked so far keep m = -inf; guard the exp against inf - inf.
        m_safe = mx.where(mx.isinf(m_new), 0, m_new)
        p = mx.exp(scores - m_safe)
        alpha = mx.exp(m - m_safe)
        denom = alpha * denom + p.sum(axis=-1, keepdims=True)
        acc = alpha * acc + p @ values.tokens(start, stop).rotated()
        m = m_new
    return (acc / denom).reshape(B, Hq, L, D)


def scaled_dot_product_attention_ops(
    queries: mx.array,
    keys: TurboQuantized,
    values: TurboQuantized,
    scale: float,
    mask: mx.array | str | None = None,
    chunk_size: int | None = None,
) -> mx.array:
    """Softmax attention over TurboQuant keys and values (reference, plain MLX ops).

    Queries are taken in blocks and keys in chunks merged with log-sum-exp, so no
    L x S score matrix is formed; with a causal mask each block skips the keys it cannot see.

    Args:
        queries: (B, Hq, L, D) float array.
        keys, values: `TurboQuantized` of shape (B, Hkv, S, D) with Hq a multiple of Hkv.
        scale: Multiplies the scores.
        mask: None, "causal" (the L queries are the last L positions), or a boolean
            or additive array broadcastable to (B, Hq, L, S).
        chunk_size: Keys per chunk; by default sized so that a block of scores takes
            1/16 of the bytes of an fp16 cache of the same keys (clamped to 2^18-2^24 floats).

    Returns:
        (B, Hq, L, D) array in the queries' dtype.
    """
    _check_inputs(queries, keys, values)
    queries = _smooth_queries(queries, keys)
    B, Hq, L, D = queries.shape
    Hkv, S = keys.shape[1:3]
    _check_mask(mask, B, Hq, L, S)
    rows, chunk = _block_sizes(B, Hq, Hkv, L, S, D)
    outs = []
    for i0 in range(0, L, rows):
        i1 = min(i0 + rows, L)
        block_mask, stop = mask, S
        if isinstance(mask, str):
            stop = max(S - L + i1, 0)
        elif mask is not None and mask.ndim > 1 and mask.shape[-2] == L:
            block_mask = mask[..., i0:i1, :]
        block = queries[:, :, i0:i1]
        out = unrotate(
            _attend(block, keys, values, scale, block_mask, stop, chunk_size or chunk), values.seed
        )
        outs.append(_add_value_offset(out, values, Hq // Hkv).astype(queries.dtype))
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


@cache
def _decode_template(dtype, D, key_bits, value_bits, GL, causal, smooth=False):
    """Template constants of decode_attention.metal (built once per variant)."""
    wk, wv = words_per_row(D, key_bits) - 1, words_per_row(D, value_bits) - 1
    # Keys per tile, one per thread: the K and V tiles stay within 20 KB of threadgroup memory.
    tile = 128 if (wk + wv + 2) * 128 * 4 <= 20480 else 64
    # Query rows per threadgroup: a lane holds R * ceil(D / 32) accumulators.
    R = min(GL, max(1, 32 // -(-D // 32)))
    return (
        ("T", dtype),
        ("D", D),
        ("KB", key_bits),
        ("VB", value_bits),
        ("WK", wk),
        ("WV", wv),
        ("TILE", tile),
        ("R", R),
        ("CAUSAL", causal),
        ("SMOOTH", smooth),
    )


@cache
def _scalar(value):
    return mx.array([value], mx.float32)


@cache
def _ones4(dim):
    return mx.ones((1, 1, 1, dim), mx.float32)


@cache
def _unrotation(dim, seed):
    """Rt^T, contiguous: the merge kernel rotates its output back with it."""
    return mx.contiguous(rotation_matrix(dim, seed).T)


def _rows(a, B, Hkv, D):
    """A per-head (B, Hkv, 1, D) vector (offset, key scale, sink) as the merge kernel's
    float32 (B * Hkv, D) rows; the cache's arrays have that shape and dtype already (one
    reshape, no copy)."""
    if a.dtype != mx.float32:
        a = a.astype(mx.float32)
    if a.shape != (B, Hkv, 1, D):
        a = mx.broadcast_to(a, (B, Hkv, 1, D))
    return a.reshape(B * Hkv, D)


def _fused_attention(queries, keys, values, scale, causal):
    """The split-K kernel, then the merge kernel that also rotates back; (B, Hq, L, D)."""
    B, Hq, L, D = queries.shape
    Hkv, S = keys.shape[1:3]
    sink = keys.sink is not None
    kdata, vdata = keys.data, values.data
    if sink:
        # Row 0 is exact: the split kernel reads rows 1.. in place and the merge adds row 0
        # (causal stays right: query i sees stored rows <= S - L + i, the sink always).
        kdata, vdata, S = kdata[:, :, 1:], vdata[:, :, 1:], S - 1
    GL = Hq // Hkv * L
    smooth = keys.channel_scale is not None
    template = _decode_template(queries.dtype, D, keys.bits, values.bits, GL, causal, smooth)
    tile, R = template[6][1], template[7][1]
    blocks = -(-GL // R)
    splits = min(-(-S // tile), max(1, TARGET_GROUPS // (B * Hkv * blocks)))
    attend = kernels.kernel(
        "decode_attention",
        ("q", "k", "v", "rt", "scale", "k_levels", "v_levels", "qscale"),
        ("o", "ml"),
        contiguous=False,
    )
    # Smoothed keys: the kernels multiply the queries by the channel scale.
    qscale = (
        _ones4(D)
        if not smooth
        else mx.broadcast_to(keys.channel_scale.astype(mx.float32), (B, Hkv, 1, D))
    )
    o, ml = attend(
        inputs=[
            queries,
            kdata,
            vdata,
            rotation_matrix(D, keys.seed),
            _scalar(float(scale)),
            codebook(keys.bits, D)[0],
            codebook(values.bits, D)[0],
            qscale,
        ],
        template=list(template),
        grid=(tile * splits, B * Hkv, blocks),
        threadgroup=(tile, 1, 1),
        output_shapes=[(B * Hkv, splits, GL, D), (B * Hkv, splits, GL, 2)],
        output_dtypes=[mx.float32, mx.float32],
    )
    merge = kernels.kernel(
        "merge", ("o", "ml", "rt_t", "offset", "q", "sk", "sv", "qscale", "scale"), ("out",)
    )
    offset = _zeros(D) if values.offset is None else _rows(values.offset, B, Hkv, D)
    # Placeholders, not read without SINK (and qscale without SMOOTH).
    sink_inputs = [_zeros(D)] * 4
    if sink:
        sink_inputs = [queries, _rows(keys.sink, B, Hkv, D), _rows(values.sink, B, Hkv, D)]
        sink_inputs.append(_rows(qscale, B, Hkv, D) if smooth else _zeros(D))
    threads = 32 * -(-D // 32)
    (out,) = merge(
        inputs=[o, ml, _unrotation(D, values.seed), offset, *sink_inputs, _scalar(float(scale))],
        template=[
            ("T", queries.dtype),
            ("D", D),
            ("OFFSET", values.offset is not None),
            ("SINK", sink),
            ("SMOOTH", sink and smooth),
        ],
        grid=(threads * B * Hkv * GL, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(B, Hq, L, D)],
        output_dtypes=[queries.dtype],
    )
    return out


def decode_rotated_ops(t: TurboQuantized, dtype, shift: int = 0, offset: bool = False):
    """Reference of `decode_rotated`, in plain MLX ops."""
    z = t.rotated()
    if offset and t.offset is not None:
        z = z + rotate(t.offset, t.seed)
    return (z * 2.0**-shift).astype(dtype)


def _dequantize_template(dtype, D, bits, shift, offset):
    """Template constants of dequantize.metal."""
    return [
        ("T", dtype),
        ("D", D),
        ("BITS", bits),
        ("W", words_per_row(D, bits) - 1),
        ("SHIFT", shift),
        ("OFFSET", offset),
    ]


def decode_rotated(t: TurboQuantized, dtype, shift: int = 0, offset: bool = False) -> mx.array:
    """t's vectors in the rotated space (plus the rotated offset when `offset`), divided
    by 2^shift, in `dtype`: (..., S, D). On a GPU one kernel writes `dtype` directly, so
    the transient is the output alone (the ops hold several uint32 arrays of the same size)."""
    if (
        kernels.backend() is None
        or t.qjl is not None
        or t.data.ndim != 4
        or t.data.shape[2] == 0
        or t.data.size // t.data.shape[-1] * t.dim >= 2**31
    ):
        return decode_rotated_ops(t, dtype, shift, offset)
    B, H, S, D = t.shape
    with_offset = offset and t.offset is not None
    off = _zeros(D)
    if with_offset:
        off = mx.broadcast_to(rotate(t.offset, t.seed), (B, H, 1, D)).reshape(B * H, D)
    threads = 32 * -(-D // 32)
    kernel = kernels.kernel("dequantize", ("data", "levels", "offset"), ("out",), contiguous=False)
    (out,) = kernel(
        inputs=[t.data, codebook(t.bits, D)[0], mx.contiguous(off)],
        template=_dequantize_template(dtype, D, t.bits, shift, with_offset),
        grid=(threads * B * H * S, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(B, H, S, D)],
        output_dtypes=[dtype],
    )
    if t.sink is not None:  # row 0 written over, not a copy of the layer
        z = rotate(t.sink, t.seed)
        if with_offset:
            z = z + rotate(t.offset, t.seed)
        out[:, :, :1] = (z * 2.0**-shift).astype(dtype)
    return out


def _decoded_attention(queries, keys, values, scale, mask):
    """`mx.fast.scaled_dot_product_attention` over keys and values decoded in the rotated
    space, in the queries' dtype: for prefill chunks, where the fused kernel (CUDA cores,
    no tensor cores) is many times slower. Holds one layer's keys and values decoded (as an
    fp16 cache would hold them), not a whole fp16 cache."""
    D = queries.shape[-1]
    dtype = queries.dtype
    # A rotated coordinate is bounded by the vector's norm, so |z_j| <= 65504 sqrt(D) for
    # float16 vectors: decode divided by a power of two >= sqrt(D) (exact), scale back after.
    shift = math.ceil(math.log2(D) / 2) if dtype == mx.float16 else 0
    q = rotate(_smooth_queries(queries, keys), keys.seed).astype(dtype)
    # Keys without their offset (softmax ignores it); values with it, so that float16 holds
    # the values themselves, not their small difference from a large mean.
    k = decode_rotated(keys, dtype, shift)
    v = decode_rotated(values, dtype, shift, offset=True)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale * 2**shift, mask=mask)
    out = (unrotate(out, values.seed) * 2**shift).astype(dtype)
    # mlx-lm evaluates a prefill chunk's graph of all layers at once; MLX encodes it ahead of
    # the GPU and frees buffers as command buffers complete, so every layer's temporaries can
    # be held together: 9-16 GB above the cache at 8-32K tokens of Llama-3.1-8B's shape on an
    # H100 (fp16 caches: 3-11 GB), 0.6-0.7 GB when each layer's attention is waited for; prefill
    # time moved within run-to-run spread (benchmarks/prefill_memory.py; mx.async_eval: 9-12 GB).
    mx.eval(out)
    return out


def _path(queries, keys, values, mask) -> str:
    """Which implementation runs: 'fused', 'decoded' or 'reference'."""
    if kernels.backend() is None or keys.shape[2] <= (0 if keys.sink is None else 1):
        return "reference"
    causal_or_none = mask is None or (isinstance(mask, str) and mask == "causal")
    if (
        causal_or_none
        and queries.shape[2] <= FUSED_MAX_ROWS
        and keys.qjl is None
        and values.qjl is None
        and max(keys.bits, values.bits) <= 4
    ):
        return "fused"
    if causal_or_none or (isinstance(mask, mx.array) and mask.ndim >= 2):
        return "decoded"
    return "reference"


def scaled_dot_product_attention(
    queries: mx.array,
    keys: TurboQuantized,
    values: TurboQuantized,
    scale: float,
    mask: mx.array | str | None = None,
    chunk_size: int | None = None,
) -> mx.array:
    """Softmax attention over TurboQuant keys and values.

    On a GPU (Metal or CUDA):
    - up to `FUSED_MAX_ROWS` query rows (decode) with mask None or "causal", 2-4 bit keys
      and values and no QJL sketch: a fused split-K kernel reads the packed data in place
      (views of a larger buffer sliced along the sequence axis need no copy);
    - longer chunks (prefill), other bits, or a mask array: `mx.fast.scaled_dot_product_attention`
      on this layer's keys and values decoded in the rotated space (see `_decoded_attention`).
    Elsewhere (CPU), and for 1-D masks: `scaled_dot_product_attention_ops`.

    Args:
        queries: (B, Hq, L, D) float array.
        keys, values: `TurboQuantized` of shape (B, Hkv, S, D) with Hq a multiple of Hkv.
        scale: Multiplies the scores.
        mask: None, "causal" (the L queries are the last L positions), or a boolean
            or additive array broadcastable to (B, Hq, L, S).
        chunk_size: Keys per chunk of the plain-ops path (default: adaptive).

    Returns:
        (B, Hq, L, D) array in the queries' dtype.
    """
    path = _path(queries, keys, values, mask)
    if path == "reference":
        return scaled_dot_product_attention_ops(queries, keys, values, scale, mask, chunk_size)
    _check_inputs(queries, keys, values)
    _check_mask(mask, *queries.shape[:3], keys.shape[2])
    if path == "decoded":
        return _decoded_attention(queries, keys, values, scale, mask)
    return _fused_attention(queries, keys, values, scale, causal=mask is not None)
