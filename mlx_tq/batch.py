"""Batched TurboQuant caches, for mlx-lm's `BatchGenerator` (continuous batching).

mlx-lm's `BatchKVCache` and `BatchRotatingKVCache` hold the left-padded rows of many
requests; merge, extract, filter, extend, prepare/finalize and the masks move whole rows
along the sequence axis, so they run unchanged on packed rows. What a batch adds: the key
statistics (offset, channel scale: (B, H, 1, D)) are per request, each taken from that
request's own first tokens (never from padding, as if it ran alone), and follow their rows.

Padded rows need an array mask, so batched attention takes the non-fused paths: on a GPU
each layer's keys and values are decoded every step (`attention._decoded_attention`), on
a CPU the plain-ops reference.
"""

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache

from .cache import TurboQuantKVCache, TurboQuantRotatingKVCache, _TurboQuantMixin

_SETTINGS = ("key_bits", "value_bits", "seed", "center_keys", "smooth_keys")


def _neutral(stats):
    """Offset 0 and scale 1 in the shapes of `stats`: for a row that has no tokens yet."""
    return (mx.zeros_like(stats[0]), *(mx.ones_like(s) for s in stats[1:]))


def _stack(rows):
    """Concatenates per-row statistics (None: no tokens yet) along the batch axis."""
    some = next((r for r in rows if r is not None), None)
    if some is None:
        return None
    rows = [_neutral(some) if r is None else r for r in rows]
    return [mx.concatenate(s) for s in zip(*rows, strict=True)]


class _BatchMixin(_TurboQuantMixin):
    _base = _single = None  # the mlx-lm batch class and our one-request class

    def _init_batch(self, B, *settings):
        self._setup(*settings)
        self.stats_tokens = [0] * B  # per row; 0: no key statistics yet
        self._lengths = getattr(self, "_lengths", None)

    def _settings(self):
        return {k: getattr(self, k) for k in _SETTINGS}

    def _row(self, b):
        return tuple(s[b : b + 1] for s in self._key_stats()) if self.stats_tokens[b] else None

    def _set_rows(self, rows, stats_tokens):
        self.stats_tokens = stats_tokens
        stats = _stack(rows)
        self._set_key_stats(*(stats or (None,)))

    @classmethod
    def merge(cls, caches):
        """Batches one-request TurboQuant caches (same settings) into one, left-padded."""
        settings = [{k: getattr(c, k) for k in _SETTINGS} for c in caches]
        if any(s != settings[0] for s in settings) or any(c.exact_sink for c in caches):
            raise ValueError(
                "only TurboQuant caches with the same bits, seed and key settings, and "
                "without exact_sink, can be batched"
            )
        if any(getattr(c, "keep", 0) for c in caches):
            raise ValueError("rotating caches with keep > 0 cannot be batched (as in mlx-lm)")
        batch = cls._base.merge.__func__(cls, caches)
        if not isinstance(batch, cls):  # mlx-lm's BatchKVCache.merge of empty caches
            batch = cls([0] * len(caches))
        batch._setup(**settings[0])
        rows = [None if c.key_offset is None else c._key_stats() for c in caches]
        # 1 for statistics of unknown origin (a cache loaded from a file).
        batch._set_rows(
            rows, [c.stats_tokens or int(r is not None) for c, r in zip(caches, rows, strict=True)]
        )
        head = next((c for c in caches if c.head_dim is not None), batch)
        batch.head_dim, batch.dtype = head.head_dim, head.dtype
        return batch

    def _init_rows(self, keys):
        """Sets the statistics of rows that get their first tokens in `keys` (B, H, L, D)."""
        B, _, L, D = keys.shape
        mx.eval(self.offset)
        start = self.offset.tolist()
        end = [o + L for o in start] if self._lengths is None else self._lengths.tolist()
        rows, counts = [], list(self.stats_tokens)
        for b in range(B):
            lo, hi = max(0, -start[b]), min(L, end[b] - start[b])  # left, right padding
            if not counts[b] and hi > lo:
                one = TurboQuantKVCache(**self._settings())
                one._init_key_stats(keys[b : b + 1, :, lo:hi])
                rows.append(one._key_stats())
                counts[b] = one.stats_tokens
            else:
                rows.append(self._row(b))
        self.head_dim, self.dtype = D, str(keys.dtype).removeprefix("mlx.core.")
        self._set_rows(rows, counts)

    def update_and_fetch(self, keys, values):
        if not all(self.stats_tokens):
            self._init_rows(keys)
        return super().update_and_fetch(keys, values)

    def filter(self, batch_indices):
        rows = [self._row(b) for b in batch_indices]
        super().filter(batch_indices)
        self._set_rows(rows, [self.stats_tokens[b] for b in batch_indices])

    def extend(self, other):
        rows = [c._row(b) for c in (self, other) for b in range(len(c.stats_tokens))]
        head = self if self.head_dim is not None else other
        self.head_dim, self.dtype = head.head_dim, head.dtype
        super().extend(other)
        self._set_rows(rows, self.stats_tokens + other.stats_tokens)

    def extract(self, idx):
        """Row `idx` as a one-request TurboQuant cache (its tokens and its statistics)."""
        plain = super().extract(idx)
        one = self._single.__new__(self._single)
        one.__dict__.update(plain.__dict__)
        one._setup(**self._settings())
        if self.stats_tokens[idx]:
            one.head_dim, one.dtype = self.head_dim, self.dtype
            one._set_key_stats(*self._row(idx))
            one.stats_tokens = self.stats_tokens[idx]
        return one


class TurboQuantBatchKVCache(_BatchMixin, BatchKVCache):
    """A `BatchKVCache` of TurboQuant-packed rows, with per-row key statistics.

    Args:
        left_padding: Padding tokens before each row's first token, (B,) ints.
        key_bits, value_bits, seed, center_keys, smooth_keys: As for `TurboQuantKVCache`.
    """

    _base, _single = BatchKVCache, TurboQuantKVCache

    def __init__(
        self, left_padding, key_bits=4, value_bits=4, seed=0, center_keys=True, smooth_keys=0.0
    ):
        BatchKVCache.__init__(self, left_padding)
        settings = (key_bits, value_bits, seed, center_keys, smooth_keys)
        self._init_batch(len(left_padding), *settings)

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        super().prepare(left_padding=left_padding, lengths=lengths, right_padding=right_padding)
        # Where each row's tokens end (as BatchRotatingKVCache keeps it): no statistics
        # from right padding.
        if right_padding is not None and max(right_padding) > 0:
            self._lengths = mx.array(lengths) + self.offset

    def finalize(self):
        super().finalize()
        self._lengths = None


class TurboQuantBatchRotatingKVCache(_BatchMixin, BatchRotatingKVCache):
    """A `BatchRotatingKVCache` (sliding window) of TurboQuant-packed rows.

    Args:
        max_size: Tokens kept (the window).
        left_padding: Padding tokens before each row's first token, (B,) ints.
        key_bits, value_bits, seed, center_keys, smooth_keys: As for `TurboQuantKVCache`.
    """

    _base, _single = BatchRotatingKVCache, TurboQuantRotatingKVCache

    def __init__(
        self,
        max_size,
        left_padding,
        key_bits=4,
        value_bits=4,
        seed=0,
        center_keys=True,
        smooth_keys=0.0,
    ):
        BatchRotatingKVCache.__init__(self, max_size, left_padding)
        settings = (key_bits, value_bits, seed, center_keys, smooth_keys)
        self._init_batch(len(left_padding), *settings)
