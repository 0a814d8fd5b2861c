"""Attention over TurboQuant keys and values, computed in the rotated space.

score_j = <q, k_j> = scale_j <R q, c[idx_j]>, and sum_j p_j v_j = R^T sum_j p_j scale_j c[idx_j]:
the query is rotated once, the output once, and no key is dequantised to the original space.
"""

import mlx.core as mx

from .quant import TurboQuantized
from .rotation import rotate, unrotate

DEFAULT_CHUNK = 4096


def _mask_chunk(mask, B, H, L, S, start, stop):
    """The mask for keys [start, stop) as a bool or additive (B, H, L, C) array, or None."""
    if mask is None:
        return None
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"mask {mask!r} is not supported: use None, 'causal' or an array")
        rows = mx.arange(S - L, S)[:, None]
        return rows >= mx.arange(start, stop)[None]
    if mask.ndim > 4 or mask.shape[-1] not in (1, S) or mask.shape[-2] not in (1, L):
        raise ValueError(
            f"mask of shape {mask.shape} does not broadcast to (B, H, L, S) = {(B, H, L, S)}"
        )
    return mask[..., start:stop] if mask.shape[-1] == S else mask


def scaled_dot_product_attention(
    queries: mx.array,
    keys: TurboQuantized,
    values: TurboQuantized,
    scale: float,
    mask: mx.array | str | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> mx.array:
    """Softmax attention over TurboQuant keys and values (reference, plain MLX ops).

    Args:
        queries: (B, Hq, L, D) float array.
        keys, values: `TurboQuantized` of shape (B, Hkv, S, D) with Hq a multiple of Hkv.
        scale: Multiplies the scores.
        mask: None, "causal" (the L queries are the last L positions), or a boolean
            or additive array broadcastable to (B, Hq, L, S).
        chunk_size: Keys per chunk; chunks are merged with log-sum-exp so at most
            L x chunk_size scores per head are held at once.

    Returns:
        (B, Hq, L, D) array in the queries' dtype.
    """
    B, Hq, L, D = queries.shape
    _, Hkv, S, Dk = keys.shape
    if keys.shape != values.shape or Dk != D:
        raise ValueError(
            f"queries {queries.shape}, keys {keys.shape} and values {values.shape} must share "
            "B, D, and keys/values their shape"
        )
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} key/value heads")
    G = Hq // Hkv
    q = rotate(queries * scale, keys.seed).reshape(B, Hkv, G * L, D)
    # Keys' offset is a per-head shift of every score of a query: softmax ignores it.
    m = mx.full((B, Hkv, G * L, 1), -mx.inf, dtype=mx.float32)
    denom = mx.zeros((B, Hkv, G * L, 1), dtype=mx.float32)
    acc = mx.zeros((B, Hkv, G * L, D), dtype=mx.float32)
    for start in range(0, S, chunk_size):
        stop = min(start + chunk_size, S)
        scores = q @ keys.tokens(start, stop).rotated().swapaxes(-1, -2)
        chunk_mask = _mask_chunk(mask, B, Hq, L, S, start, stop)
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
    out = unrotate(acc / denom, values.seed).reshape(B, Hq, L, D)
    if values.offset is not None:
        # Weights sum to one, so a constant value offset passes straight through.
        offset = mx.broadcast_to(values.offset, (B, Hkv, 1, D))
        out = out + mx.repeat(offset, G, axis=1)
    return out.astype(queries.dtype)
