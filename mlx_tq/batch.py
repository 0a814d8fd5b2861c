"""Batched TurboQuant caches, for mlx-lm's `BatchGenerator` (continuous batching).

mlx-lm's `BatchKVCache` and `BatchRotatingKVCache` hold the left-padded rows of many
requests; merge, extract, filter, extend, prepare/finalize and the masks move whole rows
along the sequence axis, so they run unchanged on our rows. What a batch adds:
- key statistics per request, (B, H, 1, D), each frozen as that request alone would freeze
  them: once its own tokens (never padding) reach `warmup_tokens`, from all of them;
- while some row still warms up, the batch holds plain rows (exact for warming rows, the
  TurboQuant reconstruction for frozen ones) attended by mlx-lm's own attention; once every
  row is frozen it quantises them in place (a reconstruction quantises back to its own
  indices but at level midpoints, its scales within 1e-6 in float32, 2e-4 in float16) and
  attends packed rows. The cost: meanwhile every row is held in the model's dtype, so a
  warming request joining packed ones (a prompt under `warmup_tokens`) decodes them all.

Padded rows need a mask: on a GPU, packed `TurboQuantBatchKVCache` decode runs the fused
kernel with each row's left padding as its first visible key (`patch.py`); sliding-window
batches take the decoded path (each layer's keys and values decoded every step), a CPU the
plain-ops reference.
"""

import copy

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache

from .cache import WARMUP_TOKENS, TurboQuantKVCache, TurboQuantRotatingKVCache, _TurboQuantMixin


def _config(c):
    return (c.key_bits, c.value_bits, c.seed, c.center_keys, c.smooth_keys, c.warmup_tokens)


def _stack(rows):
    """Per-row (offset, scale) statistics, None for a warming row (offset 0, scale 1 in its
    place), concatenated along the batch axis; (None, None) if no row has any."""
    some = next((r for r in rows if r is not None), None)
    if some is None:
        return None, None
    neutral = tuple(
        None if s is None else f(s)
        for s, f in zip(some, (mx.zeros_like, mx.ones_like), strict=True)
    )
    rows = [neutral if r is None else r for r in rows]
    return tuple(
        None if s is None else mx.concatenate([r[i] for r in rows]) for i, s in enumerate(some)
    )


class _BatchMixin(_TurboQuantMixin):
    _base = _single = None  # the mlx-lm batch class and our one-request class

    def _init_batch(
        self,
        B,
        key_bits=4,
        value_bits=4,
        seed=0,
        center_keys=True,
        smooth_keys=0.0,
        warmup_tokens=WARMUP_TOKENS,
    ):
        self._setup(key_bits, value_bits, seed, center_keys, smooth_keys, warmup_tokens)
        self._set_rows([None] * B, [0] * B)
        self.packed = False  # rows packed (every row frozen), else plain
        self._lengths = getattr(self, "_lengths", None)

    def _row(self, b):
        """Row b's (offset, scale), or None while it warms up."""
        return (
            tuple(None if s is None else s[b : b + 1] for s in self._stats())
            if self.stats_tokens[b]
            else None
        )

    def _set_rows(self, rows, tokens):
        self._set_stats(*_stack(rows), list(tokens))  # stats_tokens: per row, 0 while warming

    @classmethod
    def merge(cls, caches):
        """Batches one-request TurboQuant caches of the same settings, left-padded."""
        if len({_config(c) for c in caches}) > 1:
            raise ValueError("only TurboQuant caches with the same settings can be batched")
        if any(getattr(c, "keep", 0) for c in caches):
            raise ValueError("rotating caches with keep > 0 cannot be batched (as in mlx-lm)")
        rows = [None if c.key_offset is None else c._stats() for c in caches]
        packed = all(r is not None for r in rows)
        if not packed:  # plain rows for all: frozen ones decoded
            caches = [c if r is None else copy.copy(c) for c, r in zip(caches, rows, strict=True)]
            for c, r in zip(caches, rows, strict=True):
                if r is not None:
                    c.keys, c.values = c._decode(c.keys, c.values)
        batch = cls._base.merge.__func__(cls, caches)
        if not isinstance(batch, cls):  # mlx-lm's BatchKVCache.merge of empty caches
            batch = cls([0] * len(caches))
        batch._setup(*_config(caches[0]))
        batch._set_rows(
            rows, [c.stats_tokens or int(r is not None) for c, r in zip(caches, rows, strict=True)]
        )
        batch.packed = packed
        head = next((c for c in caches if c.head_dim is not None), batch)
        batch.head_dim, batch.dtype = head.head_dim, head.dtype
        return batch

    def _freeze_rows(self, keys):
        """Freezes the statistics of each warming row whose own tokens reach warmup_tokens with
        `keys` (B, H, L, D), from all of them, as the row alone would."""
        B, _, L, _ = keys.shape
        mx.eval(self.offset)
        start = self.offset.tolist()
        end = [s + L for s in start] if self._lengths is None else self._lengths.tolist()
        rows, tokens = [self._row(b) for b in range(B)], list(self.stats_tokens)
        for b in range(B):
            lo, hi = max(0, -start[b]), min(L, end[b] - start[b])  # left, right padding
            if tokens[b] or hi <= lo or max(start[b], 0) + hi - lo < self.warmup_tokens:
                continue
            k = keys[b : b + 1, :, lo:hi]
            if self.keys is not None:
                k = mx.concatenate([self._base.extract(self, b).keys, k], axis=2)
            one = TurboQuantKVCache(*_config(self)[:-1], warmup_tokens=0)
            one._freeze(k, None)
            rows[b], tokens[b] = one._stats(), one.stats_tokens
        newly = [t and not n for t, n in zip(tokens, self.stats_tokens, strict=True)]
        self._set_rows(rows, tokens)
        if any(newly) and self.keys is not None:  # held rows quantised, as alone at its freeze
            self.keys, self.values = self._read_back(self.keys, self.values, newly)

    def update_and_fetch(self, keys, values):
        if not self.packed:
            self._check(keys, values)
            if not all(self.stats_tokens):
                self._freeze_rows(keys)
            if all(self.stats_tokens):
                if self.keys is not None:
                    self.keys, self.values = self._encode(self.keys, self.values, self._stats())
                self.packed = True
        if self.packed:
            return super().update_and_fetch(keys, values)
        if any(self.stats_tokens):  # frozen rows hold what their packed rows would read back
            keys, values = self._read_back(keys, values, self.stats_tokens)
        return self._base.update_and_fetch(self, keys, values)

    def _read_back(self, keys, values, rows):
        """keys, values (B, H, L, D) with the given rows quantised and decoded."""
        k, v = self._decode(*self._encode(keys, values, self._stats()))
        mask = mx.array([bool(r) for r in rows])[:, None, None, None]
        return mx.where(mask, k, keys), mx.where(mask, v, values)

    def _unpack(self):
        if self.packed and self.keys is not None:
            self.keys, self.values = self._decode(self.keys, self.values)
        self.packed = False

    def filter(self, batch_indices):
        rows = [self._row(b) for b in batch_indices]
        tokens = [self.stats_tokens[b] for b in batch_indices]
        super().filter(batch_indices)
        self._set_rows(rows, tokens)

    def extend(self, other):
        # A warming row joining packed ones: all go plain until it freezes.
        if self.packed != other.packed:
            self._unpack()
            other._unpack()
        rows = [c._row(b) for c in (self, other) for b in range(len(c.stats_tokens))]
        tokens = self.stats_tokens + other.stats_tokens
        head = self if self.head_dim is not None else other
        self.head_dim, self.dtype = head.head_dim, head.dtype
        super().extend(other)
        self._set_rows(rows, tokens)

    def extract(self, idx):
        """Row `idx` as a one-request TurboQuant cache (its tokens and its statistics)."""
        plain = super().extract(idx)
        one = self._single.__new__(self._single)
        one.__dict__.update(plain.__dict__)
        one._setup(*_config(self))
        one.head_dim, one.dtype = self.head_dim, self.dtype
        row = self._row(idx)
        if row is not None:
            if not self.packed:
                one.keys, one.values = self._encode(one.keys, one.values, row)
            one._set_stats(*row, self.stats_tokens[idx])
        return one


class TurboQuantBatchKVCache(_BatchMixin, BatchKVCache):
    """A `BatchKVCache` of TurboQuant rows, with per-request key statistics and warm-up.

    Args:
        left_padding: Padding tokens before each row's first token, (B,) ints.
        key_bits, value_bits, seed, center_keys, smooth_keys, warmup_tokens: As for
            `TurboQuantKVCache`.
    """

    _base, _single = BatchKVCache, TurboQuantKVCache

    def __init__(self, left_padding, *config, **options):
        BatchKVCache.__init__(self, left_padding)
        self._init_batch(len(left_padding), *config, **options)

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
    """A `BatchRotatingKVCache` (sliding window) of TurboQuant rows.

    Args:
        max_size: Tokens kept (the window).
        left_padding: Padding tokens before each row's first token, (B,) ints.
        key_bits, value_bits, seed, center_keys, smooth_keys, warmup_tokens: As for
            `TurboQuantKVCache`.
    """

    _base, _single = BatchRotatingKVCache, TurboQuantRotatingKVCache

    def __init__(self, max_size, left_padding, *config, **options):
        BatchRotatingKVCache.__init__(self, max_size, left_padding)
        self._init_batch(len(left_padding), *config, **options)
