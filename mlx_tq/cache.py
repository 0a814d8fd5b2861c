"""TurboQuant KV caches following mlx-lm's cache protocol.

Keys and values are stored as packed rows (B, H, capacity, W + 1) uint32 (see `quant.py`),
so mlx-lm's own growth and sliding-window logic (`KVCache`, `RotatingKVCache`) runs
unchanged on them: the subclasses only encode on the way in and wrap on the way out.
"""

import json
import os
import weakref
from pathlib import Path

import mlx.core as mx
import mlx_lm.models.cache as lm_cache
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.cache import KVCache, RotatingKVCache

from . import kernels
from .attention import FUSED_MAX_ROWS
from .codebook import SUPPORTED_BITS
from .patch import check_routing, is_patched
from .quant import (
    FLOAT_DTYPES,
    TurboQuantized,
    check_bits,
    check_input,
    dequantize,
    quantize_kv,
    quantize_kv_launch,
    quantize_kv_ops,
    quantize_kv_rows,
)

FILE_FORMAT = "mlx_tq.prompt_cache/4"
# kv_bits budget -> (key_bits, value_bits, smooth_keys, key bits of sliding-window layers). On
# Gemma-3-270M key smoothing 0.5 beat every key/value split at the same bits (K4/V4-s0.5 KL 0.026
# vs K5/V3 0.038; K3/V3-s0.5 0.113 vs K4/V2 0.151: benchmarks/RESULTS.md, issue 5). A sliding
# layer holds at most its window, so a bit more for its keys is a fixed cost: 0.52x the 4-bit KL
# and 0.42x the 3-bit KL for +0.29 bits/elem at 2,048 tokens, less beyond (issue 18).
PRESETS = {b: (b, b, 0.5, b + 1 if b in (3, 4) else b) for b in SUPPORTED_BITS}
# Tokens a cache holds exactly before it freezes its key statistics on them and quantises. On
# Gemma-3-270M with a first update of 1-8 tokens, KL is 2.8-22x that of statistics from the whole
# 512-token window with none, 1.2-1.3x with 128, 0.99-1.06x with 256 (benchmarks/RESULTS.md).
WARMUP_TOKENS = 256
# Newest tokens a TurboQuantKVCache also holds exactly: each query attends the keys and
# values of the last RECENT_TOKENS positions exactly and older ones packed. On Gemma-3-270M
# 4 exact recent tokens cut the 4-bit KL to 0.32x, 16 to 0.19x (benchmarks/RESULTS.md):
# the quantisation error hurts most in attention to the last few tokens.
RECENT_TOKENS = 4


def check_recent_tokens(n):
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"recent_tokens={n!r} is not supported: give an int >= 0 (0: none)")


class _StepRows(TurboQuantized):
    """A decode step's packed keys or values (`TurboQuantKVCache`'s fast path) whose exact
    window (`recent`) is the cache's once the step's token is shifted into it: the step's
    attention launch does that (merge_quantize.metal), else the first read of `recent`
    makes the cache do it (`_settle`)."""

    _cache = None  # the cache, until the window is known
    _index = 0  # 0: keys, 1: values
    _recent = None

    @property
    def recent(self):
        if self._cache is not None:
            self._cache._settle()
        return self._recent

    @recent.setter
    def recent(self, value):
        self._recent = value


class _TurboQuantMixin:
    # mlx-lm re-quantises caches that have `to_quantized`, which does not apply to packed
    # rows, so hide it from hasattr(). (`merge`, for batching: see batch.py.)
    @property
    def to_quantized(self):
        raise AttributeError("TurboQuant caches are already quantised")

    recent_tokens = 0  # (rotating and batch caches hold none)
    # The window: exact keys and values (B, H, W, D) of positions [offset - W, offset) in
    # order (fewer positions: zero rows first), or None.
    _window = None
    _step = None  # a weak reference to the packed keys of the last decode step
    # (quantise launch, keys' shape) of the last decode step: the next one of that shape
    # calls it directly (TurboQuantKVCache.update_and_fetch). Reset with the statistics.
    _step_launch = None
    _step_attention = None  # patch.py's attention launch for the step's keys (reset with it)
    # A decode step's token is quantised and shifted into the window after the step's
    # update, by its attention launch (`take_step`, `step_done`) or else by `_settle`:
    _new = None  # (keys, values, position) of the last step's token, not yet quantised
    _pending = None  # (keys, values, position): its packed rows, not yet in the buffers
    _step_rows = ()  # weak references to the last step's _StepRows

    def _configure(self, key_bits, value_bits, seed, center_keys, smooth_keys, warmup_tokens):
        self._settle()  # (a step pending with the old settings)
        check_bits(key_bits, "key_bits")
        check_bits(value_bits, "value_bits")
        if warmup_tokens < 0:
            raise ValueError(f"warmup_tokens={warmup_tokens} must be >= 0")
        self.key_bits, self.value_bits = key_bits, value_bits
        self.seed, self.center_keys, self.smooth_keys = seed, center_keys, smooth_keys
        self.warmup_tokens = warmup_tokens
        self._step_launch = self._step_attention = None

    def _setup(self, *config):
        self._configure(*config)
        self.head_dim = self.dtype = None
        self._set_stats()

    def _set_stats(self, offset=None, scale=None, tokens=0):
        """The frozen key statistics (None before the warm-up ends) and the number of tokens
        they came from (0: unknown): trimmed below that, it differs from a fresh cache."""
        self.key_offset, self.key_scale = offset, scale
        self.stats_tokens = tokens
        self._rows = self._step_launch = self._step_attention = None

    def _check(self, keys, values):
        for x, name in ((keys, "keys"), (values, "values")):
            check_input(x, name)
            if x.ndim != 4:
                raise ValueError(f"{name} {x.shape} must be (B, H, L, D)")
        if keys.shape[-1] != values.shape[-1]:
            raise ValueError(
                f"key head_dim {keys.shape[-1]} != value head_dim {values.shape[-1]}: "
                "attention with different key and value sizes (e.g. MLA) is not supported"
            )
        if keys.shape != values.shape:
            raise ValueError(
                f"keys {keys.shape} and values {values.shape} must be (B, H, L, D) "
                "with the same B, H and L"
            )
        bhd = None if self.keys is None else (*self.keys.shape[:2], self.head_dim)
        if bhd is not None and (*keys.shape[:2], keys.shape[3]) != bhd:
            raise ValueError(
                f"keys {keys.shape} do not fit this cache of (B, H, D) = {bhd}: "
                "use one cache per layer and sequence batch"
            )
        self.head_dim = keys.shape[3]
        # A dtype name, not an mx.Dtype, so that copy.deepcopy works.
        self.dtype = self.dtype or str(keys.dtype).removeprefix("mlx.core.")

    def _freeze(self, keys, values):
        """Takes the key statistics from the tokens held and the new ones, then quantises
        the held buffer in place (same slots, so mlx-lm's bookkeeping stays valid)."""
        k = keys
        if self.keys is not None:  # the exact keys and values held so far (warm-up)
            n = min(self.offset, self.keys.shape[2])
            held = (self.keys[..., :n, :], self.values[..., :n, :])
            k = mx.concatenate([held[0], k], 2)
        k = k.astype(mx.float32)
        # Finite, so that a NaN key spoils its own token only, as in an fp16 cache.
        finite = mx.isfinite(k)
        count = mx.maximum(finite.sum(axis=2, keepdims=True), 1)
        # Softmax ignores a per-head shift of the keys: store k - mean(k), spend the bits on
        # what differs between keys.
        mean = mx.where(finite, k, 0).sum(axis=2, keepdims=True) / count
        scale = None
        if self.smooth_keys:
            # Store (k - mean) / s with s = std^smooth per channel (unit mean), and attend
            # with q * s: the bits go less to the loudest key channels.
            var = mx.where(finite, k - mean, 0) ** 2
            s = (mx.sqrt(var.sum(axis=2) / count[:, :, 0]) + 1e-6)[:, :, None] ** self.smooth_keys
            scale = s / mx.mean(s, axis=-1, keepdims=True)
        offset = mean if self.center_keys else mx.zeros_like(mean)
        self._set_stats(offset, scale, k.shape[2])
        if self.keys is not None:
            if self.recent_tokens:
                self._set_window(*held)
            self.keys, self.values = self._encode(self.keys, self.values, self._stats())

    def update_and_fetch(self, keys, values):
        if self.key_offset is None:
            self._check(keys, values)
            if self.offset + keys.shape[2] < self.warmup_tokens:
                return super().update_and_fetch(keys, values)
            self._freeze(keys, values)
        elif (
            self.keys is None  # statistics set before any row (a batch, see batch.py)
            or keys.shape[:2] != self.keys.shape[:2]
            or keys.shape[3] != self.head_dim
            or values.shape != keys.shape
            or keys.dtype not in FLOAT_DTYPES
        ):
            self._check(keys, values)
        bits = (self.key_bits, self.value_bits, self.seed)
        step = False
        if kernels.backend() is None:
            k, v = quantize_kv_ops(keys, values, *bits, self.key_offset, self.key_scale)
        else:
            if self._rows is None:  # the statistics as the kernel reads them, built once
                self._rows = [a if a is None else a.reshape(-1, a.shape[-1]) for a in self._stats()]
                mx.eval(*self._stat_arrays())
            # A decode step past the first W tokens, the window in the keys' dtype: the
            # quantise launch itself shifts the token into the window (else _hold_recent).
            window = self._window
            step = window is not None and keys.shape[2] == 1 and self.offset >= self.recent_tokens
            step = step and window[0].dtype == keys.dtype
            if step:
                launch = quantize_kv_launch(
                    keys.dtype, keys.shape, *bits, *self._rows, window[0].shape
                )
                self._step_launch = (launch, keys.shape)
                k, v, *window = launch(keys, values, window)
                self._window = tuple(window)
            else:
                k, v = quantize_kv_rows(keys, values, *bits, *self._rows)
        k, v = super().update_and_fetch(k, v)
        if step:
            return self._fetch_step(k, v)
        recent = self._hold_recent(keys, values) if self.recent_tokens else None
        return self._wrap(k, v, recent)

    def _fetch_step(self, k, v, lazy=False):
        """A decode step's packed keys and values, its one query attending the whole window;
        `lazy`: the step's token not yet in the window (`_StepRows`)."""
        if is_patched():  # the patched attention trusts these keys (patch.py)
            self._step = weakref.ref(k)
        if lazy:
            rows = self._packed(k, v, lazy=True)
            self._step_rows = tuple(map(weakref.ref, rows))
            return rows
        return self._wrap(k, v, self._window)

    def _settle(self):
        """Completes the last decode step: quantises its token and shifts it into the window
        if no attention launch did (`step_done`), hands its keys and values their window,
        and writes its packed rows into the buffers. Everything that reads the buffers or
        the window, but a decode step's attention launch, calls this first."""
        new, self._new = self._new, None
        if new is not None:
            k, v, *window = self._step_launch[0](new[0], new[1], self._window)
            self._window = tuple(window)
            self._pending = (k, v, new[2])
        for ref in self._step_rows:
            rows = ref()
            if rows is not None and rows._cache is self:
                rows._recent, rows._cache = self._window[rows._index], None
        self._step_rows = ()
        pending, self._pending = self._pending, None
        if pending is not None:
            k, v, i = pending
            self.keys[:, :, i : i + 1] = k
            self.values[:, :, i : i + 1] = v

    def take_step(self):
        """For a decode step's attention launch (attention.fused_step): (keys, values, the
        window before them) of the step's token if no launch has taken it yet, else None."""
        new = self._new
        return None if new is None else (new[0], new[1], self._window)

    def step_stats(self):
        """The key statistics as the launch reads them: the offset (B, H, 1, D) and the
        channel scale (B * H, D) or None, float32, contiguous."""
        offset, scale = self._rows
        return offset.reshape(*self.keys.shape[:2], 1, -1), scale

    def step_done(self, k, v, window):
        """The launch's packed rows k, v of the step's token and the window with it shifted
        in: written into the buffers by the next update (or `_settle`)."""
        self._pending = (k, v, self._new[2])
        self._new = None
        self._window = tuple(window)

    def _hold_recent(self, keys, values):
        """Holds the update's keys and values in the window; returns the exact rows its
        attention reads: for L <= FUSED_MAX_ROWS the last recent_tokens - 1 + L in order
        (each query its recent_tokens newest); for a longer prefill chunk none."""
        W, L, end = self.recent_tokens, keys.shape[2], self.offset
        rows = (keys, values)
        if self._window is not None:
            rows = tuple(
                mx.concatenate([old, new.astype(old.dtype)], axis=2)
                for old, new in zip(self._window_rows(end - L), rows, strict=True)
            )
        self._set_window(*rows)
        if L > FUSED_MAX_ROWS:
            return None
        n = min(W - 1 + L, end)
        return tuple(r[..., -n:, :] for r in rows)

    def _window_rows(self, end):
        """The window's keys and values of positions [max(0, end - W), end), in order."""
        n = min(end, self.recent_tokens)
        return tuple(r[..., self.recent_tokens - n :, :] for r in self._window)

    def _set_window(self, k, v):
        """Holds the last W rows of keys k and values v (B, H, n, D) as the window."""
        W = self.recent_tokens
        pad = [(0, 0), (0, 0), (max(0, W - k.shape[2]), 0), (0, 0)]
        self._window = tuple(mx.pad(x[..., -W:, :], pad) for x in (k, v))

    def _encode(self, k, v, stats):
        """Plain (B, H, L, D) keys and values as packed rows, keys with `stats` (offset, scale)."""
        return quantize_kv(k, v, self.key_bits, self.value_bits, self.seed, *stats)

    def _decode(self, k, v):
        """Packed rows of this cache, with its key statistics, as plain (B, H, L, D) arrays."""
        return tuple(map(dequantize, self._packed(k, v)))

    def _packed(self, k, v, recent=None, lazy=False):
        """TurboQuantized keys and values of packed rows k, v; `recent`: their window's
        (keys, values); `lazy`: `_StepRows` whose window this cache makes when read."""
        args = (self.head_dim, self.seed, getattr(mx, self.dtype))
        rk, rv, w = (None, None, 0) if recent is None else (*recent, self.recent_tokens)
        cls, w = (_StepRows, self.recent_tokens) if lazy else (TurboQuantized, w)
        k = cls(k, self.key_bits, *args, self.key_offset, None, self.key_scale, rk, w)
        rows = (k, cls(v, self.value_bits, *args, None, None, None, rv, w))
        if lazy:
            for i, r in enumerate(rows):
                r._cache, r._index = self, i
        return rows

    def _wrap(self, k, v, recent=None):
        """Packed keys and values for the patched attention, else dequantised for any (the
        recent rows then exact for every query of the update)."""
        packed = self._packed(k, v, recent)
        return packed if is_patched() else tuple(map(dequantize, packed))

    def _stats(self):
        return (self.key_offset, self.key_scale)

    def _stat_arrays(self):
        return tuple(a for a in self._stats() if a is not None)

    def trim(self, n):
        if n < 0:
            raise ValueError(f"cannot trim {n} tokens: n must be >= 0")
        if not self.is_trimmable():
            return 0  # a wrapped window: the tokens to drop are no longer at its end
        self._settle()
        n = super().trim(n)
        if self._window is not None and n:
            # The window again: its rows still held, then the older ones decoded.
            end, W = self.offset, self.recent_tokens
            first = max(0, end + n - W)  # the oldest position the window held
            k, v = (r[..., : max(0, end - first), :] for r in self._window_rows(end + n))
            lo, hi = max(0, end - W), min(end, first)
            if hi > lo:
                dk, dv = self._decode(self.keys[..., lo:hi, :], self.values[..., lo:hi, :])
                k, v = mx.concatenate([dk, k], axis=2), mx.concatenate([dv, v], axis=2)
            self._set_window(k, v)
        return n

    @property
    def meta_state(self):
        mine = (self.key_bits, self.value_bits, self.seed, int(self.center_keys), self.head_dim)
        mine += (self.dtype, self.smooth_keys, self.warmup_tokens, self.recent_tokens)
        return tuple(map(str, (*(getattr(self, a) for a in self._META), *mine)))

    @meta_state.setter
    def meta_state(self, v):
        kb, vb, seed, center, head_dim, dtype, smooth, warmup, recent = v[len(self._META) :]
        self._configure(int(kb), int(vb), int(seed), bool(int(center)), float(smooth), int(warmup))
        if int(recent):
            self.recent_tokens = int(recent)
        self.head_dim = None if head_dim == "None" else int(head_dim)
        self.dtype = None if dtype == "None" else dtype
        for a, x in zip(self._META, v, strict=False):
            setattr(self, a, int(x))

    @classmethod
    def merge(cls, caches):
        from . import batch

        for c in caches:
            c._settle()
        return getattr(batch, cls._batch).merge(caches)

    @classmethod
    def from_state(cls, state, meta_state):
        obj = cls.__new__(cls)
        obj.state = state
        obj.meta_state = meta_state
        return obj

    @property
    def nbytes(self):
        self._settle()
        if self.keys is None:
            return 0
        extra = sum(a.nbytes for a in (*self._stat_arrays(), *(self._window or ())))
        return self.keys.nbytes + self.values.nbytes + extra


class TurboQuantKVCache(_TurboQuantMixin, KVCache):
    """A `KVCache` holding TurboQuant-packed keys and values.

    The first `warmup_tokens` tokens are held exactly (fetched as plain arrays, attended by
    mlx-lm's own attention); once that many have arrived, the key statistics are taken from
    all of them and what is held is quantised in place.

    Args:
        key_bits, value_bits: Bits per element of keys and values (2-8).
        seed: Seed of the rotation's random signs.
        center_keys: Store keys minus their per-head mean (free at attention time).
        smooth_keys: If > 0, divide centred keys by std^smooth_keys per channel (frozen with
            the mean) before quantising; attention multiplies the queries by the same scale.
        warmup_tokens: Tokens held exactly before the statistics are frozen (0: from the
            first update, whatever its size).
        recent_tokens: After the warm-up, each query of an update of at most
            FUSED_MAX_ROWS tokens (decode) attends the keys and values of its
            `recent_tokens` newest positions exactly, held beside the packed rows; older
            positions, and every query of a longer (prefill) chunk, read packed rows.
            0: none.
    """

    _META = ("offset",)  # mlx-lm's attributes in meta_state, before ours
    _batch = "TurboQuantBatchKVCache"  # its class in batch.py (`merge`)

    def __init__(
        self,
        key_bits: int = 4,
        value_bits: int = 4,
        seed: int = 0,
        center_keys: bool = True,
        smooth_keys: float = 0.0,
        warmup_tokens: int = WARMUP_TOKENS,
        recent_tokens: int = RECENT_TOKENS,
    ):
        super().__init__()
        self._setup(key_bits, value_bits, seed, center_keys, smooth_keys, warmup_tokens)
        check_recent_tokens(recent_tokens)
        self.recent_tokens = recent_tokens

    def update_and_fetch(self, keys, values):
        # A decode step like the last one (a model's every step): what that one checked and
        # built still holds, so only the launch, KVCache's row update and the wrapping remain.
        step = self._step_launch
        if (
            step is not None
            and keys.shape == step[1] == values.shape
            and keys.dtype == values.dtype == self._window[0].dtype
            and self.recent_tokens <= self.offset < self.keys.shape[2]
            and is_patched()
            and kernels.backend() is not None
        ):
            self._settle()  # the last step's rows written
            prev = self.offset
            end = prev + 1
            attend = self._step_attention
            fold = attend is not None and attend.folds
            if fold:
                # Quantised by the step's merge launch (or `_settle`): the token's packed
                # row is not read before W more tokens.
                self._new = (keys, values, prev)
            else:
                k, v, *window = step[0](keys, values, self._window)
                self._window = tuple(window)
                self.keys[:, :, prev:end] = k
                self.values[:, :, prev:end] = v
            self.offset = end
            # KVCache.update_and_fetch without growth (plain slices: `...` costs ~2 us more).
            k, v = self.keys, self.values
            if end < k.shape[2]:
                k, v = k[:, :, :end], v[:, :, :end]
            return self._fetch_step(k, v, lazy=fold)
        self._settle()
        return super().update_and_fetch(keys, values)

    @property
    def state(self):
        self._settle()
        if self.keys is None:
            return []
        n = self.offset
        window = () if self._window is None else (mx.stack(self._window),)
        return self.keys[..., :n, :], self.values[..., :n, :], *self._stat_arrays(), *window

    @state.setter
    def state(self, v):
        self._settle()  # (the fetched keys of a pending step get their window)
        self.keys, self.values, *stats = v if v else (None, None)
        self.offset = 0 if self.keys is None else self.keys.shape[2]
        # The window is stored as one 5-D array: (2, B, H, W, D).
        self._window = tuple(stats.pop()) if stats and stats[-1].ndim == 5 else None
        self._set_stats(*stats)


class TurboQuantRotatingKVCache(_TurboQuantMixin, RotatingKVCache):
    """A `RotatingKVCache` (sliding window) holding TurboQuant-packed keys and values.

    Args:
        max_size: Tokens kept (the window).
        keep: Leading tokens never evicted.
        key_bits, value_bits, seed, center_keys, smooth_keys, warmup_tokens: As for
            `TurboQuantKVCache`.
    """

    _META = ("keep", "max_size", "offset", "_idx")
    _batch = "TurboQuantBatchRotatingKVCache"

    def __init__(
        self,
        max_size: int,
        keep: int = 0,
        key_bits: int = 4,
        value_bits: int = 4,
        seed: int = 0,
        center_keys: bool = True,
        smooth_keys: float = 0.0,
        warmup_tokens: int = WARMUP_TOKENS,
    ):
        super().__init__(max_size, keep)
        self._setup(key_bits, value_bits, seed, center_keys, smooth_keys, warmup_tokens)

    @property
    def state(self):
        if self.keys is None:
            return []
        return self.keys, self.values, *self._stat_arrays()

    @state.setter
    def state(self, v):
        self.keys, self.values, *stats = v if v else (None, None)
        self._set_stats(*stats)


def make_prompt_cache(
    model,
    kv_bits: int = 4,
    key_bits: int | None = None,
    value_bits: int | None = None,
    max_kv_size: int | None = None,
    quantize_sliding: bool = True,
    seed: int = 0,
    center_keys: bool = True,
    smooth_keys: float | None = None,
    warmup_tokens: int = WARMUP_TOKENS,
    sliding_key_bits: int | None = None,
    recent_tokens: int = RECENT_TOKENS,
) -> list:
    """Builds the model's cache with TurboQuant layers, like mlx-lm's `make_prompt_cache`.

    Respects `model.make_cache()`. Plain `KVCache` layers become `TurboQuantKVCache`;
    `RotatingKVCache` (sliding-window) layers become `TurboQuantRotatingKVCache`, or stay
    fp16 with `quantize_sliding=False`; other caches (SSM, arrays) are left alone.

    Args:
        model: An mlx-lm model whose attention calls
            `mlx_lm.models.base.scaled_dot_product_attention` (checked with a 1-token probe).
        kv_bits: The bit budget; picks the recommended (key_bits, value_bits, smooth_keys,
            sliding_key_bits).
        key_bits, value_bits: Override the preset.
        max_kv_size: Every layer keeps at most this many tokens (at most its own window), in
            a rotating cache that always keeps the first 4, as mlx-lm's; must be > 4.
        quantize_sliding: Compress sliding-window layers too.
        seed: Rotation seed.
        center_keys: Store keys minus their per-head mean.
        smooth_keys: Per-channel key smoothing exponent (0: off; default: the preset).
        warmup_tokens: Tokens each layer holds exactly before it freezes its key statistics.
        sliding_key_bits: Key bits of the model's sliding-window layers (default: the preset's,
            or `key_bits` when that is given).
        recent_tokens: Newest positions each query attends exactly in the non-sliding layers
            (`TurboQuantKVCache`); 0: none.

    Returns:
        A list with one cache per layer.

    Raises:
        ValueError: For unsupported bits, head dims or max_kv_size, and for a model whose
            attention does not reach mlx_tq's.
    """
    if kv_bits not in PRESETS:
        raise ValueError(f"kv_bits={kv_bits} is not supported: choose one of {tuple(PRESETS)}")
    kb, vb, smooth, sliding_kb = PRESETS[kv_bits]
    if sliding_key_bits is None:
        sliding_key_bits = sliding_kb if key_bits is None else key_bits
    kb = kb if key_bits is None else key_bits
    vb = vb if value_bits is None else value_bits
    smooth_keys = smooth if smooth_keys is None else smooth_keys
    check_bits(kb, "key_bits")
    check_bits(vb, "value_bits")
    check_bits(sliding_key_bits, "sliding_key_bits")
    if max_kv_size is not None and max_kv_size <= KEEP:
        raise ValueError(
            f"max_kv_size={max_kv_size} is too small: it must exceed the {KEEP} first tokens "
            "a rotating cache always keeps"
        )
    # The probe's caches (warm-up 0) check the bits, and the head dim on its keys.
    options = dict(key_bits=kb, value_bits=vb, seed=seed, center_keys=center_keys)
    options.update(smooth_keys=smooth_keys)
    check_recent_tokens(recent_tokens)
    layers = (model, max_kv_size, quantize_sliding, options, sliding_key_bits, recent_tokens)
    check_routing(model, lambda: _layers(*layers, 0))
    return _layers(*layers, warmup_tokens)


# mlx-lm's rotating caches for max_kv_size keep the first tokens (attention sinks).
KEEP = 4


def capped_cache(model, max_kv_size: int | None = None) -> list:
    """mlx-lm's unquantised caches of `model`, each layer (sliding ones too) capped at
    min(its window, `max_kv_size`) tokens; mlx-lm's own `make_prompt_cache` leaves the
    layers of models that make their caches uncapped."""
    caches = lm_cache.make_prompt_cache(model, max_kv_size=max_kv_size)
    if max_kv_size is None:
        return caches
    return [
        RotatingKVCache(max_kv_size, keep=KEEP)
        if type(c) is KVCache or (type(c) is RotatingKVCache and c.max_size > max_kv_size)
        else c
        for c in caches
    ]


def _layers(model, max_kv_size, quantize_sliding, options, sliding_key_bits, recent, warmup_tokens):
    # The model's own sliding layers, not those that max_kv_size caps.
    own = lm_cache.make_prompt_cache(model)
    out = []
    for c, o in zip(capped_cache(model, max_kv_size), own, strict=True):
        layer = dict(options, warmup_tokens=warmup_tokens)
        if type(o) is RotatingKVCache:
            layer["key_bits"] = sliding_key_bits
        if type(c) is KVCache:
            c = TurboQuantKVCache(**layer, recent_tokens=recent)
        elif type(c) is RotatingKVCache and quantize_sliding:
            # A window shorter than the warm-up would never quantise: freeze when it is full.
            layer["warmup_tokens"] = min(warmup_tokens, c.max_size)
            c = TurboQuantRotatingKVCache(c.max_size, c.keep, **layer)
        out.append(c)
    if not any(isinstance(c, _TurboQuantMixin) for c in out):
        raise ValueError("the model has no KV cache layer that TurboQuant can compress")
    return out


def save_prompt_cache(path: str, cache: list, metadata: dict[str, str] | None = None):
    """Saves a prompt cache (TurboQuant and mlx-lm layers mixed) to a safetensors file.

    The file is written to a temporary name and renamed, so a crash never leaves a
    partial file under `path`.
    """
    arrays, leaves = {}, {}
    for i, c in enumerate(cache):
        for key, value in tree_flatten(c.state):
            (arrays if isinstance(value, mx.array) else leaves)[f"{i}.{key}"] = value
    header = {
        "format": FILE_FORMAT,
        "classes": json.dumps([type(c).__name__ for c in cache]),
        "meta_states": json.dumps([getattr(c, "meta_state", None) for c in cache]),
        "leaves": json.dumps(leaves),
        "metadata": json.dumps(metadata or {}),
    }
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.safetensors")
    try:
        mx.save_safetensors(str(tmp), arrays, header)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_prompt_cache(path: str, return_metadata: bool = False, **expected):
    """Loads a prompt cache written by `save_prompt_cache`.

    Args:
        path: The .safetensors file.
        return_metadata: Also return the metadata dict given at save time.
        **expected: Settings the caller relies on in every layer (key_bits, value_bits, seed,
            head_dim; the 3- and 4-bit presets give sliding-window layers one more key bit);
            a file written with others raises ValueError.
    """
    unknown = set(expected) - {"key_bits", "value_bits", "seed", "head_dim"}
    if unknown:
        raise TypeError(
            f"cannot check {sorted(unknown)}: expected settings are key_bits, value_bits, "
            "seed and head_dim"
        )
    if not Path(path).is_file():
        raise FileNotFoundError(f"no prompt cache file at {path}")
    try:
        arrays, header = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated?): {e}") from e
    fmt = header.get("format") or ""
    if fmt.startswith("mlx_tq.prompt_cache/") and fmt != FILE_FORMAT:
        raise ValueError(
            f"{path} was written in format {fmt!r}; this mlx_tq reads {FILE_FORMAT!r}: "
            "prefill the prompt again and save a new file"
        )
    if fmt != FILE_FORMAT:
        raise ValueError(
            f"{path} is not an mlx_tq prompt cache (format {header.get('format')!r}); "
            "files from mlx-lm load with mlx_lm.models.cache.load_prompt_cache"
        )
    classes = json.loads(header["classes"])
    metas = json.loads(header["meta_states"])
    flat = {**arrays, **json.loads(header["leaves"])}
    cache = []
    for i, (name, meta) in enumerate(zip(classes, metas, strict=True)):
        items = [(k[len(str(i)) + 1 :], v) for k, v in flat.items() if k.split(".")[0] == str(i)]
        state = tree_unflatten(items) if items else []
        ours = name.startswith("TurboQuant")
        cls = globals().get(name) if ours else getattr(lm_cache, name, None)
        if not hasattr(cls, "from_state"):
            raise ValueError(
                f"{path}: layer {i} is a {name!r}, a cache class neither mlx_tq nor mlx-lm has"
            )
        c = cls.from_state(state, meta) if meta is not None else cls.from_state(state)
        for key, want in expected.items():
            have = getattr(c, key, want)
            if have is not None and have != want:
                why = "the 3- and 4-bit presets give sliding-window layers one more key bit"
                sliding = key == "key_bits" and "Rotating" in name
                raise ValueError(
                    f"{path} was written with {key}={have}, expected {want} (layer {i}, {name}"
                    + (f": {why})" if sliding else ")")
                )
        cache.append(c)
    return (cache, json.loads(header["metadata"])) if return_metadata else cache
