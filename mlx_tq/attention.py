"""Attention over TurboQuant keys and values, computed in the rotated space.

score_j = <q, k_j> = scale_j <R q, c[idx_j]>, and sum_j p_j v_j = R^T sum_j p_j scale_j c[idx_j]:
the query is rotated once, the output once, and no key is dequantised to the original space.
"""

import math
from dataclasses import replace
from functools import cache
from types import SimpleNamespace

import mlx.core as mx

from . import kernels
from .codebook import codebook
from .quant import FLOAT_DTYPES, TurboQuantized, check_input, decode_rotated, words_per_row
from .rotation import kernel_rotation, rotate, unrotate

# Threadgroups the split-K kernel aims for: about one full wave on an H100.
TARGET_GROUPS = 640
# On CUDA, the split-K kernel on the matrix units (decode_attention_mma.metal) where it
# applies (`_use_mma`): MMA_WARPS SIMD-groups a threadgroup, each over at least
# MMA_MIN_KEYS keys, about MMA_TARGET_WARPS SIMD-groups over all heads (on the H200 at
# 32K-131K keys, 1,024 beat 2,048: each SIMD-group's prologue is paid fewer times;
# benchmarks/probes/mma_sweep.py); a threadgroup's SIMD-groups merge into one split.
MMA = True
# On the matrix units, the split merge in the same launch (decode_attention_mma_merge.metal:
# the last threadgroup of each head merges): one custom-kernel call a layer instead of two.
# Off: it passes the GPU tests; on the H200 it was 6-13% faster pipelined at 32K-131K keys,
# 22% slower at 8K, no cheaper to build, and end to end within the noise (benchmarks/RESULTS.md,
# 2026-12-01 15:29- UTC).
MMA_MERGE = False
# A decode step's merge launch also quantises the step's token (merge_quantize.metal;
# `_fused_plan`'s fold), its packed rows written at the next update: one custom-kernel call
# a layer fewer. Off: it passes the GPU tests, and on the H200 a layer's step built 4 us
# faster (43 vs 47 us, interleaved), but the whole model decoded 8K tokens ~10% slower in
# two runs (host build + encode +0.1-0.2 ms a token), 128K the same (benchmarks/RESULTS.md,
# 2026-12-01 17:30- UTC).
FOLD = False
MMA_WARPS = 4
MMA_TARGET_WARPS = 1024
MMA_MIN_KEYS = 128
# Splits the merge kernel can stage in threadgroup memory (merge.metal).
MAX_SPLITS = 1024
# Query tokens L up to which a GPU runs the fused kernel (decode, speculative decoding);
# longer prefill chunks go through mx.fast SDPA on decoded keys and values.
FUSED_MAX_ROWS = 8
_queued = []  # the last decoded attention's marker, waited for by the next (_decoded_attention)
# Floats per block of scores or accumulators of the reference: 1/16 of the bytes of an
# fp16 cache of the same keys, clamped. (MLX may still hold all blocks of one lazy graph at
# once; on a GPU the reference runs only for 1-D masks and empty caches.)
MIN_BLOCK, MAX_BLOCK = 2**18, 2**24


def check_queries(queries, keys):
    """Queries (B, Hq, L, D) fit keys (B, Hkv, S, D) with Hq a multiple of Hkv."""
    if not isinstance(queries, mx.array) or queries.dtype not in FLOAT_DTYPES:
        check_input(queries, "queries")
    if queries.ndim != 4:
        raise ValueError(f"queries must have shape (B, Hq, L, D), got {queries.shape}")
    B, Hq, _, D = queries.shape
    k = keys.data.shape
    if k[0] != B or keys.dim != D:
        raise ValueError(f"queries {queries.shape} and keys {keys.shape} must share B and D")
    if Hq % k[1]:
        raise ValueError(f"{Hq} query heads are not a multiple of {k[1]} key/value heads")


def _check_inputs(queries, keys, values):
    check_queries(queries, keys)
    k, v = keys.data.shape, values.data.shape
    if k[:-1] != v[:-1] or values.dim != keys.dim:
        raise ValueError(
            f"queries {queries.shape}, keys {keys.shape} and values {values.shape} must share "
            "B, D, and keys/values their shape"
        )
    D = keys.dim
    for t in (keys, values):
        r = t.recent
        if r is not None and (
            r.shape[:-2] != t.data.shape[:-2] or r.shape[-2] > k[-2] or r.shape[-1] != D
        ):
            raise ValueError(
                f"recent rows {r.shape} do not fit packed rows {t.shape}: they must be "
                "(..., E, D) with E <= S"
            )
    if (keys.recent is None) != (values.recent is None):
        raise ValueError("keys and values must both have recent rows or neither")
    if values.channel_scale is not None or values.offset is not None:
        raise ValueError(
            "values with an offset or channel_scale are not supported: quantise values "
            "without them (keys may have both)"
        )


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


def _recent_offset(keys, L):
    """c such that query i of L (position S - L + i) attends recent rows e >= i + c exactly
    and packed rows j < S - E + i + c: its `window` newest positions exactly. c = 0 when the
    E recent rows are the window - 1 + L a cache hands over; the rows must reach back that
    far unless they are all S keys."""
    S, E = keys.data.shape[-2], keys.recent.shape[-2]
    c = E - L - keys.window + 1
    if c < 0 and E < S:
        raise ValueError(
            f"{E} recent rows of {S} for {L} queries with window {keys.window}: they must be "
            "at least the last window - 1 + L rows, or all of them"
        )
    return c


def _use_recent(keys, values, mask, L):
    """Keys, values and mask as a plain attention reads them: up to FUSED_MAX_ROWS queries
    (decode) take their window from the recent rows; a longer chunk (prefill) reads packed
    rows only, so that it needs no mask array (MLX's SDPA would form the L x S scores)."""
    if keys.recent is None:
        return keys, values, mask
    if L > FUSED_MAX_ROWS:
        return replace(keys, recent=None), replace(values, recent=None), mask
    c = _recent_offset(keys, L)
    if L == 1:  # the recent rows replace the packed ones
        return keys, values, mask
    return _with_recent(keys, values, mask, L, c)


def _with_recent(keys, values, mask, L, c):
    """Keys, values and mask for L > 1 queries over keys with recent rows, as a plain
    attention reads them: the packed rows up to S - E + L - 1 + c (c: `_recent_offset`),
    then the E recent ones, and a mask over those S + L - 1 + c keys."""
    S, E = keys.data.shape[-2], keys.recent.shape[-2]
    n = max(S - E + L - 1 + c, 0)

    def extend(t):  # the recent rows' packed words stay behind their exact vectors
        return replace(t, data=mx.concatenate([t.data[..., :n, :], t.data[..., S - E :, :]], -2))

    i, e = mx.arange(L)[:, None], mx.arange(E)[None]
    exact = e >= i + c
    if isinstance(mask, str):  # causal: query i sees positions up to S - L + i
        exact = exact & (e <= E - L + i)
    lagged = mx.concatenate([mx.arange(n)[None] < S - E + i + c, exact], axis=1)
    if isinstance(mask, mx.array):
        if mask.shape[-1] != 1:  # its columns for the keys above
            mask = mx.concatenate([mask[..., :n], mask[..., S - E :]], axis=-1)
        if mask.dtype == mx.bool_:
            lagged = lagged & mask
        else:
            lagged = mx.where(lagged, mask.astype(mx.float32), -mx.inf)
    return extend(keys), extend(values), lagged


def _block_sizes(B, Hq, Hkv, L, S, D):
    """(query rows, keys) per block, so scores and accumulators stay within the budget."""
    budget = min(max(B * Hkv * S * D // 16, MIN_BLOCK), MAX_BLOCK)
    rows = max(1, min(L, budget // (B * Hq * D)))
    return rows, max(1, min(S, budget // (B * Hq * rows)))


def _attend(queries, keys, values, scale, mask, S, chunk_size):
    """Online-softmax attention of queries (B, Hq, L, D) over keys [0, S); float32, rotated.

    A key that a query cannot see adds nothing to it, whatever its value (no 0 * NaN);
    a query that sees a non-finite value comes out NaN, as in an fp16 cache."""
    B, Hq, L, D = queries.shape
    Hkv = keys.shape[1]
    G = Hq // Hkv
    q = rotate(queries.astype(mx.float32) * scale, keys.seed).reshape(B, Hkv, G * L, D)
    # Keys' offset is a per-head shift of every score of a query: softmax ignores it.
    m = mx.full((B, Hkv, G * L, 1), -mx.inf, dtype=mx.float32)
    denom = mx.zeros((B, Hkv, G * L, 1), dtype=mx.float32)
    acc = mx.zeros((B, Hkv, G * L, D), dtype=mx.float32)
    spoilt = mx.zeros((B, Hkv, G * L, 1), dtype=mx.bool_)
    for start in range(0, S, chunk_size):
        stop = min(start + chunk_size, S)
        scores = q @ keys.tokens(start, stop).rotated().swapaxes(-1, -2)
        chunk_mask = _mask_chunk(mask, L, S, start, stop)
        if chunk_mask is not None:
            chunk_mask = mx.broadcast_to(chunk_mask, (B, Hq, L, stop - start))
            chunk_mask = chunk_mask.reshape(B, Hkv, G * L, stop - start)
            if chunk_mask.dtype != mx.bool_:
                chunk_mask = chunk_mask.astype(mx.float32)
                scores = scores + chunk_mask
                chunk_mask = chunk_mask != -mx.inf
            scores = mx.where(chunk_mask, scores, -mx.inf)
        m_new = mx.maximum(m, scores.max(axis=-1, keepdims=True))
        # Rows with every key masked so far keep m = -inf; guard the exp against inf - inf.
        m_safe = mx.where(mx.isinf(m_new), 0, m_new)
        p = mx.exp(scores - m_safe)
        alpha = mx.exp(m - m_safe)
        denom = alpha * denom + p.sum(axis=-1, keepdims=True)
        chunk = values.tokens(start, stop)
        bad = ~mx.isfinite(chunk.scales())[:, :, None]  # (B, Hkv, 1, keys)
        seen = scores != -mx.inf
        spoilt = spoilt | mx.any(seen & bad, axis=-1, keepdims=True)
        acc = alpha * acc + p @ mx.where(bad.swapaxes(-1, -2), 0, chunk.rotated())
        m = m_new
    out = mx.where(spoilt, mx.nan, acc / denom)
    return out.reshape(B, Hq, L, D)


def scaled_dot_product_attention_ops(
    queries: mx.array,
    keys: TurboQuantized,
    values: TurboQuantized,
    scale: float,
    mask: mx.array | str | None = None,
    chunk_size: int | None = None,
) -> mx.array:
    """Reference of `scaled_dot_product_attention` (same arguments), in plain MLX ops.

    Queries are taken in blocks and keys in chunks merged with log-sum-exp, so no
    L x S score matrix is formed; with a causal mask each block skips the keys it cannot see.
    By default `chunk_size` makes a block of scores take 1/16 of the bytes of an fp16 cache
    of the same keys (clamped to 2^18-2^24 floats).
    """
    _check_inputs(queries, keys, values)
    queries = _smooth_queries(queries, keys)
    B, Hq, L, D = queries.shape
    _check_mask(mask, B, Hq, L, keys.shape[2])
    keys, values, mask = _use_recent(keys, values, mask, L)
    Hkv, S = keys.shape[1:3]
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
        out = _attend(block, keys, values, scale, block_mask, stop, chunk_size or chunk)
        outs.append(unrotate(out, values.seed).astype(queries.dtype))
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


@cache
def _decode_template(dtype, D, key_bits, value_bits, GL, causal, smooth, tail=0):
    """Template constants of decode_attention.metal, tile and R (built once per variant)."""
    wk, wv = words_per_row(D, key_bits) - 1, words_per_row(D, value_bits) - 1
    # Keys per tile, one per thread: the K and V tiles stay within 20 KB of threadgroup memory.
    tile = 128 if (wk + wv + 2) * 128 * 4 <= 20480 else 64
    # Query rows per threadgroup: a lane holds R * ceil(D / 32) accumulators.
    R = min(GL, max(1, 32 // -(-D // 32)))
    template = [
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
        ("POW2", D & (D - 1) == 0),
        ("TAIL", tail),
    ]
    return template, tile, R


def _use_mma(D, key_bits, value_bits):
    """Whether the fused call runs decode_attention_mma.metal: CUDA (mma.sync), keys and
    values of one width (one table of level pairs) of 2-4 bits, D a multiple of 16."""
    return (
        MMA
        and kernels.backend() == "cuda"
        and key_bits == value_bits
        and 2 <= key_bits <= 4
        and D % 16 == 0
    )


def _mma_template(dtype, D, bits, causal, smooth, tail=0, merge=None):
    """Template constants of decode_attention_mma.metal; with `merge` (the mask's causal
    flag), of decode_attention_mma_merge (its exact window: the last `tail` rows)."""
    words = words_per_row(D, bits) - 1
    template = [
        ("T", dtype),
        ("D", D),
        ("KB", bits),
        ("VB", bits),
        ("WK", words),
        ("WV", words),
        ("NW", MMA_WARPS),
        ("CAUSAL", causal),
        ("SMOOTH", smooth),
        ("POW2", D & (D - 1) == 0),
        ("TAIL", tail),
    ]
    if merge is not None:
        template += [("RECENT", tail > 0), ("WINDOW", tail), ("MCAUSAL", merge)]
    return template


def merge_template(dtype, D, recent, causal, quant=False):
    """Template constants of merge.metal (`recent`: the exact window, 0 for none; `quant`:
    of merge_quantize, see `merge_quantize_template`)."""
    return [
        ("T", dtype),
        ("D", D),
        ("POW2", D & (D - 1) == 0),
        ("RECENT", recent > 0),
        ("WINDOW", recent),
        ("CAUSAL", causal),
        ("QUANT", quant),
    ]


def merge_quantize_template(dtype, D, recent, key_bits, value_bits, smooth):
    """Template constants of merge_quantize (merge.metal's, then quantize.metal's for one
    token a row and a window of `recent` rows)."""
    return merge_template(dtype, D, recent, False, True) + [
        ("KB", key_bits),
        ("VB", value_bits),
        ("WK", words_per_row(D, key_bits) - 1),
        ("WV", words_per_row(D, value_bits) - 1),
        ("ROWS", 1),
        ("SCALE", smooth),
        ("RW", recent),
    ]


@cache
def _fused_plan(
    dtype, B, Hq, Hkv, L, D, key_bits, value_bits, seeds, causal, smooth, scale, recent,
    switches=None,
):  # fmt: skip
    """What a fused call needs besides its queries and keys, built once per layer shape.
    `switches`: the module's settings it is built under (`_switches()`, part of the key)."""
    GL = Hq // Hkv * L
    # recent: the window; then query i of L reads packed rows j < S - E + i + c
    # = (S - recent) - L + 1 + i (see _recent_offset): the kernel leaves out the last
    # `recent` rows and reads the rest causally.
    mma = _use_mma(D, key_bits, value_bits)
    mma_merge = MMA_MERGE and mma
    if mma:
        # A threadgroup of MMA_WARPS SIMD-groups over its keys, 8 query rows, one split.
        template = _mma_template(
            dtype, D, key_bits, causal or recent > 0, smooth, recent, causal if mma_merge else None
        )
        name, tile, R, per_group = "decode_attention_mma", 32 * MMA_WARPS, 8, MMA_WARPS
        name += "_merge" if mma_merge else ""
        most = min(MMA_TARGET_WARPS // (B * Hkv * -(-GL // R)) // per_group, MAX_SPLITS)

        def groups(S):
            return max(1, min(-(-S // (MMA_MIN_KEYS * per_group)), most))
    else:
        template, tile, R = _decode_template(
            dtype, D, key_bits, value_bits, GL, causal or recent > 0, smooth, recent
        )
        name, per_group = "decode_attention", 1
        most = min(TARGET_GROUPS // (B * Hkv * -(-GL // R)), MAX_SPLITS)

        def groups(S):  # one split per tile of keys, then fixed
            return max(1, min(-(-S // tile), most))

    attend = kernels.kernel(name, contiguous=False, template=tuple(template))
    constants = [
        kernel_rotation(D, seeds[0]),
        mx.array([scale], mx.float32),
        codebook(key_bits, D)[0],
        codebook(value_bits, D)[0],
    ]
    ones, no_starts = mx.ones((1, 1, 1, D), mx.float32), mx.zeros((B,), mx.int32)
    zeros = mx.zeros((1, 1, 1, D), mx.float32)
    threads = 32 * -(-D // 32)
    merge_args = dict(
        grid=(threads * B * Hkv * GL, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(B, Hq, L, D)],
        output_dtypes=[dtype],
    )
    # The merge kernel rotates its output back with it.
    unrotation = kernel_rotation(D, seeds[1], inverse=True)
    mx.eval(constants, ones, no_starts, zeros)
    merge_kernel = kernels.kernel(
        "merge", contiguous=False, template=tuple(merge_template(dtype, D, recent, causal))
    )
    blocks = -(-GL // R)

    @cache
    def attend_args(n):  # the launch for n threadgroups a head, one split each
        shapes, dtypes = [(B * Hkv, n, GL, D), (B * Hkv, n, GL, 2)], [mx.float32, mx.float32]
        if mma_merge:  # (and the merged output)
            shapes, dtypes = [*shapes, (B, Hq, L, D)], [*dtypes, dtype]
        return dict(
            grid=(tile * n, B * Hkv, blocks),
            threadgroup=(tile, 1, 1),
            output_shapes=shapes,
            output_dtypes=dtypes,
        )

    # decode_attention_mma_merge's count of finished threadgroups per head and block of rows,
    # zeroed for each launch: MLX's CUDA graph runs launches that share no written array at
    # the same time, and it does not know the kernel writes the counts, so launches sharing
    # one array raced (two independent calls in one graph; the H200, 2026-12-01).
    counters = (B * Hkv * blocks,) if mma_merge else None

    # A decode step of a cache with a window (L = 1, no mask, one seed): the merge launch
    # also quantises the step's token (merge_quantize.metal), one launch a layer fewer.
    fold = None
    if FOLD and recent and L == 1 and not causal and not mma_merge and seeds[0] == seeds[1]:
        template = merge_quantize_template(dtype, D, recent, key_bits, value_bits, smooth)
        words = (words_per_row(D, key_bits), words_per_row(D, value_bits))
        window = (B, Hkv, recent, D)
        # rt, the key and value codebooks, rt^T and the scale as one input (inputs cost the
        # host ~0.35 us each a call).
        qc = mx.concatenate(
            [constants[0].reshape(-1), *codebook(key_bits, D), *codebook(value_bits, D)]
            + [unrotation.reshape(-1), constants[1]]
        )
        mx.eval(qc)
        fold = SimpleNamespace(
            kernel=kernels.kernel("merge_quantize", contiguous=False, template=tuple(template)),
            qc=qc,
            args=dict(
                grid=(threads * (B * Hkv * GL + 2 * B * Hkv), 1, 1),
                threadgroup=(threads, 1, 1),
                output_shapes=[(B, Hq, L, D), *((B, Hkv, 1, w) for w in words), window, window],
                output_dtypes=[dtype, mx.uint32, mx.uint32, dtype, dtype],
            ),
        )

    return SimpleNamespace(
        fold=fold,
        attend=attend,
        attend_args=attend_args,
        groups=groups,
        splits=groups,
        constants=constants,
        ones=ones,
        zeros=zeros,
        no_starts=no_starts,
        merge=merge_kernel,
        merge_args=merge_args,
        rt_t=unrotation,
        counters=counters,
    )


def _switches():
    return (MMA, MMA_MERGE, FOLD, MMA_WARPS, MMA_TARGET_WARPS, MMA_MIN_KEYS, TARGET_GROUPS)


def _plan_for(queries, keys, values, scale, causal):
    """`_fused_plan` of these inputs, the recent rows checked (`_recent_offset`)."""
    B, Hq, L, D = queries.shape
    recent = keys.recent is not None
    p = _fused_plan(
        queries.dtype, B, Hq, keys.data.shape[1], L, D, keys.bits, values.bits,
        (keys.seed, values.seed), causal, keys.channel_scale is not None, float(scale),
        keys.window if recent else 0, _switches(),
    )  # fmt: skip
    if recent:
        _recent_offset(keys, L)
    return p


def _fused_attention(queries, keys, values, scale, causal, starts=None):
    """The split-K kernel, then the merge kernel that also rotates back; (B, Hq, L, D).
    `starts`: (B,) int32, the first key each batch row sees (left padding), else 0."""
    p = _plan_for(queries, keys, values, scale, causal)
    return _fused_launch(p, queries, keys, values, starts)


def fused_step(queries, keys, values, scale, cache=None):
    """`_fused_attention(queries, keys, values, scale, False)` of a cache's decode step (keys
    the cache built, queries checked: patch.py), as a function of (queries, keys, values,
    scale, cache) that the cache keeps: it repeats the launch for queries of the same shape,
    dtype and float scale over keys of the same cache (or a copy of it), and returns None for
    others. With `cache` (a `TurboQuantKVCache`), the merge launch also quantises the step's
    token where the plan allows (`fold`; the closure's `folds`): the cache then leaves its
    steps' tokens to it (`take_step`). The cache is an argument of each call, not held: a
    cache keeps the closure, and its deep copies share it."""
    shape, dtype = queries.shape, queries.dtype
    p = _plan_for(queries, keys, values, scale, False)
    fold = p.fold if cache is not None and keys.dtype == dtype else None
    if fold is not None:
        offset, channel_scale = cache.step_stats()
        stats = (offset, p.ones.reshape(1, -1) if channel_scale is None else channel_scale)
        mx.eval(stats)

    def attend(q, k, v, s, cache=None):
        if type(q) is mx.array and q.shape == shape and q.dtype == dtype and s == scale:
            step = None if fold is None or cache is None else cache.take_step()
            if step is None:
                return _fused_launch(p, q, k, v, None)
            out, *rows = _fold_launch(p, fold, q, k, v, step, stats)
            cache.step_done(*rows[:2], rows[2:])
            return out
        return None

    attend.folds = fold is not None
    return attend if type(scale) is float else None


def _fold_launch(p, fold, queries, keys, values, step, stats):
    """`_fused_launch` of a decode step whose merge launch also quantises its token: step =
    (keys, values, window before them) of the token, stats = (offset, channel scale) of
    the keys as merge_quantize reads them. Returns (output, packed key row, packed value
    row, window keys, window values)."""
    S = max(keys.data.shape[2] - keys.window, 0)
    inputs = _attend_inputs(p, queries, keys, values, None)
    o, ml = p.attend(inputs=inputs, **p.attend_args(p.groups(S)))
    k, v, window = step
    merge_inputs = [o, ml, queries, *window, stats[0], k, v, fold.qc, stats[1]]
    return fold.kernel(inputs=merge_inputs, **fold.args)


def _attend_inputs(p, queries, keys, values, starts):
    """The split-K launch's inputs (SIGNATURES["decode_attention"]) with plan p."""
    return [
        queries,
        keys.data,
        values.data,
        *p.constants,
        p.ones if keys.channel_scale is None else keys.channel_scale,  # with its strides
        p.no_starts if starts is None else starts.astype(mx.int32),
    ]


def _fused_launch(p, queries, keys, values, starts):
    """The launches of `_fused_attention` with its plan p, the inputs checked."""
    S = keys.data.shape[2]
    recent = keys.recent is not None
    if recent:  # the kernel reads the packed rows before the last `window` (_recent_offset)
        S = max(S - keys.window, 0)
    inputs = _attend_inputs(p, queries, keys, values, starts)
    # The exact window's keys, values and keys' offset (kr, vr, k_off; not read without one,
    # but of their declared dtypes: k_off float32).
    exact = (queries, queries, p.zeros)
    if recent:
        exact = (keys.recent, values.recent, p.zeros if keys.offset is None else keys.offset)
    args = p.attend_args(p.groups(S))
    if p.counters is not None:  # the launch merges too
        counters = mx.zeros(p.counters, mx.int32)
        return p.attend(inputs=[*inputs, p.rt_t, *exact, counters], **args)[2]
    o, ml = p.attend(inputs=inputs, **args)
    merge_exact = (queries, *exact, p.constants[1]) if recent else (o,) * 5  # (not read)
    return p.merge(inputs=[o, ml, p.rt_t, *merge_exact], **p.merge_args)[0]


def _spoilt(bad, mask, Hq, L):
    """Whether each query sees a bad key row: bad (B, Hkv, S) -> (B, Hkv, G | 1, L | 1, 1)."""
    B, Hkv, S = bad.shape
    if mask is None:
        return mx.any(bad, axis=-1)[:, :, None, None, None]
    if isinstance(mask, str):  # causal: query i sees keys [0, S - L + i]
        first = mx.min(mx.where(bad, mx.arange(S), S), axis=-1)[:, :, None, None, None]
        return first <= mx.arange(S - L, S)[:, None]
    m = mask if mask.dtype == mx.bool_ else mask != -mx.inf
    m = m.reshape((1,) * (4 - m.ndim) + m.shape)
    heads = m.shape[1]
    m = m.reshape(m.shape[0], Hkv if heads > 1 else 1, Hq // Hkv if heads > 1 else 1, *m.shape[2:])
    return (m.astype(mx.float32) @ bad[:, :, None, :, None].astype(mx.float32)) > 0


def _decoded_attention(queries, keys, values, scale, mask):
    """`mx.fast.scaled_dot_product_attention` over keys and values decoded in the rotated
    space, in the queries' dtype: for prefill chunks, where the fused kernel (CUDA cores,
    no tensor cores) is many times slower. Holds one layer's keys and values decoded (as an
    fp16 cache would hold them), not a whole fp16 cache."""
    B, Hq, L, D = queries.shape
    keys, values, mask = _use_recent(keys, values, mask, L)
    Hkv, S = keys.shape[1:3]
    dtype = queries.dtype
    # A rotated coordinate is bounded by the vector's norm, so |z_j| <= 65504 sqrt(D) for
    # float16 vectors: decode divided by a power of two >= sqrt(D) (exact), scale back after.
    shift = math.ceil(math.log2(D) / 2) if dtype == mx.float16 else 0
    q = rotate(_smooth_queries(queries, keys), keys.seed).astype(dtype)
    # Keys without their offset: softmax ignores it.
    k = decode_rotated(keys, dtype, shift)
    v = decode_rotated(values, dtype, shift)
    # A value row with a non-finite scale adds nothing where it is masked (no 0 * NaN in
    # SDPA) and spoils the queries that see it, as in an fp16 cache.
    bad = ~mx.isfinite(values.scales())  # (B, Hkv, S)
    v = mx.where(bad[..., None], 0, v)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale * 2**shift, mask=mask)
    out = (unrotate(out, values.seed) * 2**shift).reshape(B, Hkv, Hq // Hkv, L, D)
    out = mx.where(_spoilt(bad, mask, Hq, L), mx.nan, out).reshape(B, Hq, L, D).astype(dtype)
    # mlx-lm evaluates a prefill chunk's graph of all layers at once; MLX encodes it ahead of
    # the GPU and frees buffers as command buffers complete, so every layer's temporaries can
    # be held together: 9-16 GB above the cache at 8-32K tokens of Llama-3.1-8B's shape on an
    # H100 (fp16 caches: 3-11 GB), 0.6-0.7 GB when each layer's attention is waited for
    # (benchmarks/prefill_memory.py; mx.async_eval alone: 9-12 GB). Waiting for this layer
    # left the GPU idle while the host built the next (17-24 ms of a 2,048-token chunk, 32
    # layers, H200): so this layer is queued and the previous one waited for (two layers'
    # temporaries), through a one-element copy made after it.
    done = out.reshape(-1)[:1] + 0
    mx.async_eval(out, done)
    previous, _queued[:] = list(_queued), [done]
    mx.eval(previous)
    return out


def _path(queries, keys, values, mask) -> str:
    """Which implementation runs: 'fused', 'decoded' or 'reference'."""
    if kernels.backend() is None or keys.data.shape[2] == 0:
        return "reference"
    causal_or_none = mask is None or (isinstance(mask, str) and mask == "causal")
    if (
        causal_or_none
        and queries.shape[2] <= FUSED_MAX_ROWS
        and keys.qjl is None
        and values.qjl is None
        and keys.bits <= 8
        and values.bits <= 4
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
    - up to `FUSED_MAX_ROWS` query rows (decode) with mask None or "causal", 2-8 bit keys,
      2-4 bit values and no QJL sketch: a fused split-K kernel reads the packed data in place
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
    if mask is not None:
        _check_mask(mask, *queries.shape[:3], keys.data.shape[2])
    if path == "decoded":
        return _decoded_attention(queries, keys, values, scale, mask)
    return _fused_attention(queries, keys, values, scale, causal=mask is not None)
