"""TurboQuant KV caches following mlx-lm's cache protocol.

Keys and values are stored as packed rows (B, H, capacity, W + 1) uint32 (see `quant.py`),
so mlx-lm's own growth and sliding-window logic (`KVCache`, `RotatingKVCache`) runs
unchanged on them: the subclasses only encode on the way in and wrap on the way out.
"""

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx_lm.models.cache as lm_cache
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.cache import KVCache, RotatingKVCache

from .codebook import SUPPORTED_BITS
from .patch import is_patched, uses_base_attention
from .quant import TurboQuantized, _quantize_rows, check_bits, check_input, dequantize
from .rotation import check_head_dim

FILE_FORMAT = "mlx_tq.prompt_cache/1"
# kv_bits budget -> (key_bits, value_bits, smooth_keys, exact_sink). On Gemma-3-270M key
# smoothing 0.5 beat every key/value split at the same bits (K4/V4-s0.5 KL 0.026 vs K5/V3
# 0.038; K3/V3-s0.5 0.113 vs K4/V2 0.151: benchmarks/RESULTS.md, issue 5), and 2-4 bits run
# on the fused kernel. The exact sink stays off: over all of WikiText-2 it lowers KL by 4-12%,
# but pass-key retrieval falls from 50 to 42 of 60 at 4 bits (fp16: 44) and 39 to 21 at 3.
PRESETS = {b: (b, b, 0.5, False) for b in SUPPORTED_BITS}


class _TurboQuantMixin:
    # mlx-lm re-quantises caches that have `to_quantized`, which does not apply to packed
    # rows, so hide it from hasattr().
    @property
    def to_quantized(self):
        raise AttributeError("TurboQuant caches are already quantised")

    def _setup(self, key_bits, value_bits, seed, center_keys, smooth_keys=0.0, exact_sink=False):
        check_bits(key_bits, "key_bits")
        check_bits(value_bits, "value_bits")
        self.key_bits, self.value_bits = key_bits, value_bits
        self.seed, self.center_keys, self.smooth_keys = seed, center_keys, smooth_keys
        self.exact_sink = exact_sink
        self.sink_keys = self.sink_values = None
        self._set_key_stats(None)
        self.head_dim = None
        self.dtype = None
        self._pending = False
        # Tokens the key statistics came from (0: none yet, or unknown after loading): a
        # prompt cache trimmed below them no longer equals a fresh cache of its tokens.
        self.stats_tokens = 0

    def _encode(self, keys, values):
        check_input(keys, "keys")
        check_input(values, "values")
        if keys.shape[-1] != values.shape[-1]:
            raise ValueError(
                f"key head_dim {keys.shape[-1]} != value head_dim {values.shape[-1]}: "
                "attention with different key and value sizes (e.g. MLA) is not supported"
            )
        if keys.ndim != 4 or keys.shape[:3] != values.shape[:3]:
            raise ValueError(
                f"keys {keys.shape} and values {values.shape} must be (B, H, L, D) "
                "with the same B, H and L"
            )
        if self.key_offset is None:
            self._init_key_stats(keys)
        elif keys.shape[:2] != self.key_offset.shape[:2] or keys.shape[-1] != self.head_dim:
            B, H = self.key_offset.shape[:2]
            raise ValueError(
                f"keys {keys.shape} do not fit this cache of (B, H, D) = {(B, H, self.head_dim)}: "
                "use one cache per layer and sequence batch"
            )
        if is_patched() and self._pending:
            raise RuntimeError(
                "the last keys/values this cache returned never reached "
                "mlx_lm.models.base.scaled_dot_product_attention: this model's attention "
                "does not go through it, so it cannot use a TurboQuant cache"
            )
        # Inputs and bits are checked above and in _setup.
        k = _quantize_rows(keys, self.key_bits, self.seed, self.key_offset, self.key_scale)
        v = _quantize_rows(values, self.value_bits, self.seed)
        return k, v

    def _init_key_stats(self, keys):
        # A dtype name, not an mx.Dtype, so that copy.deepcopy works.
        self.head_dim, self.dtype = keys.shape[-1], str(keys.dtype).removeprefix("mlx.core.")
        self.stats_tokens = keys.shape[2]
        # Softmax ignores a per-head shift of the keys, so store k - mean(k) (frozen
        # after the first update) and spend the bits on what differs between keys.
        k = keys.astype(mx.float32)
        # Finite, so that a NaN key spoils its own token only, as in an fp16 cache.
        mean = mx.mean(mx.where(mx.isfinite(k), k, 0), axis=2, keepdims=True)
        scale = None
        if self.smooth_keys:
            # Store (k - mean) / s with s = std^smooth per channel (unit mean), and
            # attend with q * s: the bits go less to the loudest key channels.
            std = mx.sqrt(mx.mean(mx.where(mx.isfinite(k), k - mean, 0) ** 2, axis=2))
            s = (std[:, :, None] + 1e-6) ** self.smooth_keys
            scale = s / mx.mean(s, axis=-1, keepdims=True)
        self._set_key_stats(mean if self.center_keys else mx.zeros_like(mean), scale)

    def _set_key_stats(self, offset, scale=None):
        self.key_offset, self.key_scale = offset, scale

    def _key_stats(self):
        return (self.key_offset,) if self.key_scale is None else (self.key_offset, self.key_scale)

    def _wrap(self, k, v):
        dtype = getattr(mx, self.dtype)
        keys = TurboQuantized(
            k,
            self.key_bits,
            self.head_dim,
            self.seed,
            dtype,
            self.key_offset,
            None,
            self.key_scale,
            self.sink_keys,
        )
        values = TurboQuantized(
            v, self.value_bits, self.head_dim, self.seed, dtype, sink=self.sink_values
        )
        if is_patched():
            self._pending = True
            return keys, values
        return dequantize(keys), dequantize(values)

    def _capture_sink(self, keys, values):
        """Keeps the first token's key and value exact, in the stored space (the key
        centred and smoothed as the packed rows are): attention reads them for row 0."""
        k = keys[:, :, :1].astype(mx.float32) - self.key_offset
        self.sink_keys = k if self.key_scale is None else k / self.key_scale
        self.sink_values = values[:, :, :1].astype(mx.float32)

    def _sink_held(self, prev_offset: int) -> bool:
        """Whether the first token is still row 0 after an update that started at prev_offset."""
        return True

    def update_and_fetch(self, keys, values):
        prev = self.offset
        k, v = self._encode(keys, values)
        if self.exact_sink and prev == 0:
            self._capture_sink(keys, values)
        k, v = super().update_and_fetch(k, v)
        if self.sink_keys is not None and not self._sink_held(prev):
            self.sink_keys = self.sink_values = None  # the first token left the window
        return self._wrap(k, v)

    def _sinks(self):
        return () if self.sink_keys is None else (self.sink_keys, self.sink_values)

    def _set_stats_and_sinks(self, rest):
        n = 2 if self.smooth_keys else 1  # key offset, and the channel scale when smoothing
        self._set_key_stats(*rest[:n])
        self.sink_keys, self.sink_values = rest[n:] if len(rest) > n else (None, None)

    def _meta(self):
        return (
            str(self.key_bits),
            str(self.value_bits),
            str(self.seed),
            str(int(self.center_keys)),
            str(self.head_dim),
            str(self.dtype),
            str(self.smooth_keys),
            str(int(self.exact_sink)),
        )

    def _set_meta(self, v):
        kb, vb, seed, center, head_dim, dtype, *more = v
        smooth = float(more[0]) if more else 0.0
        sink = bool(int(more[1])) if len(more) > 1 else False
        self._setup(int(kb), int(vb), int(seed), bool(int(center)), smooth, sink)
        self.head_dim = None if head_dim == "None" else int(head_dim)
        self.dtype = None if dtype == "None" else dtype

    @classmethod
    def from_state(cls, state, meta_state):
        obj = cls.__new__(cls)
        obj.meta_state = meta_state
        obj.state = state
        return obj

    @property
    def nbytes(self):
        if self.keys is None:
            return 0
        extra = sum(a.nbytes for a in (self.key_scale, *self._sinks()) if a is not None)
        return self.keys.nbytes + self.values.nbytes + self.key_offset.nbytes + extra


class TurboQuantKVCache(_TurboQuantMixin, KVCache):
    """A `KVCache` holding TurboQuant-packed keys and values.

    Args:
        key_bits, value_bits: Bits per element of keys and values (2-8).
        seed: Seed of the rotation's random signs.
        center_keys: Store keys minus their per-head mean (free at attention time).
        smooth_keys: If > 0, divide centred keys by std^smooth_keys per channel (from the
            first update) before quantising; attention multiplies the queries by the same scale.
        exact_sink: Keep the first token's key and value exact (float32, 2 x D floats per
            head): the attention sink (BOS) most heads attend to is never quantised.
    """

    def __init__(
        self,
        key_bits: int = 4,
        value_bits: int = 4,
        seed: int = 0,
        center_keys: bool = True,
        smooth_keys: float = 0.0,
        exact_sink: bool = False,
    ):
        super().__init__()
        self._setup(key_bits, value_bits, seed, center_keys, smooth_keys, exact_sink)

    @property
    def state(self):
        if self.keys is None:
            return []
        n = self.offset
        return self.keys[..., :n, :], self.values[..., :n, :], *self._key_stats(), *self._sinks()

    @state.setter
    def state(self, v):
        self.keys, self.values, *rest = v if v else (None, None, None)
        self._set_stats_and_sinks(rest)
        self.offset = 0 if self.keys is None else self.keys.shape[2]

    @property
    def meta_state(self):
        return (str(self.offset), *self._meta())

    @meta_state.setter
    def meta_state(self, v):
        self._set_meta(v[1:])
        self.offset = int(v[0])

    @classmethod
    def merge(cls, caches):
        from .batch import TurboQuantBatchKVCache

        return TurboQuantBatchKVCache.merge(caches)


class TurboQuantRotatingKVCache(_TurboQuantMixin, RotatingKVCache):
    """A `RotatingKVCache` (sliding window) holding TurboQuant-packed keys and values.

    Args:
        max_size: Tokens kept (the window).
        keep: Leading tokens never evicted.
        key_bits, value_bits, seed, center_keys, smooth_keys, exact_sink: As for
            `TurboQuantKVCache`; the exact sink is dropped once the first token leaves the
            window (unless `keep` holds it).
    """

    def __init__(
        self,
        max_size: int,
        keep: int = 0,
        key_bits: int = 4,
        value_bits: int = 4,
        seed: int = 0,
        center_keys: bool = True,
        smooth_keys: float = 0.0,
        exact_sink: bool = False,
    ):
        super().__init__(max_size, keep)
        self._setup(key_bits, value_bits, seed, center_keys, smooth_keys, exact_sink)

    def _sink_held(self, prev_offset: int) -> bool:
        # mlx-lm keeps the first `keep` tokens; otherwise token 0 is row 0 (slot 0, or the
        # oldest row after a multi-token trim) until an update starts at offset max_size.
        return self.keep >= 1 or prev_offset < self.max_size

    @property
    def state(self):
        if self.keys is None:
            return []
        return self.keys, self.values, *self._key_stats(), *self._sinks()

    @state.setter
    def state(self, v):
        self.keys, self.values, *rest = v if v else (None, None, None)
        self._set_stats_and_sinks(rest)

    @property
    def meta_state(self):
        return (str(self.keep), str(self.max_size), str(self.offset), str(self._idx), *self._meta())

    @meta_state.setter
    def meta_state(self, v):
        self._set_meta(v[4:])
        self.keep, self.max_size, self.offset, self._idx = map(int, v[:4])

    @classmethod
    def merge(cls, caches):
        from .batch import TurboQuantBatchRotatingKVCache

        return TurboQuantBatchRotatingKVCache.merge(caches)


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
    exact_sink: bool | None = None,
) -> list:
    """Builds the model's cache with TurboQuant layers, like mlx-lm's `make_prompt_cache`.

    Respects `model.make_cache()`. Plain `KVCache` layers become `TurboQuantKVCache`;
    `RotatingKVCache` (sliding-window) layers become `TurboQuantRotatingKVCache`, or stay
    fp16 with `quantize_sliding=False`; other caches (SSM, arrays) are left alone.

    Args:
        model: An mlx-lm model.
        kv_bits: The bit budget; picks the recommended (key_bits, value_bits, smooth_keys).
        key_bits, value_bits: Override the preset.
        max_kv_size: Keep only this many tokens (a rotating cache), as in mlx-lm.
        quantize_sliding: Compress sliding-window layers too.
        seed: Rotation seed.
        center_keys: Store keys minus their per-head mean.
        smooth_keys: Per-channel key smoothing exponent (0: off; default: the preset).
        exact_sink: Keep each layer's first token (the attention sink) exact (default: the
            preset).

    Returns:
        A list with one cache per layer.
    """
    if kv_bits not in PRESETS:
        raise ValueError(f"kv_bits={kv_bits} is not supported: choose one of {tuple(PRESETS)}")
    kb, vb, smooth, sink = PRESETS[kv_bits]
    kb = kb if key_bits is None else key_bits
    vb = vb if value_bits is None else value_bits
    smooth_keys = smooth if smooth_keys is None else smooth_keys
    exact_sink = sink if exact_sink is None else exact_sink
    check_bits(kb, "key_bits")
    check_bits(vb, "value_bits")
    if not uses_base_attention(model):
        raise ValueError(
            f"{type(model).__module__}: the model's attention does not call "
            "mlx_lm.models.base.scaled_dot_product_attention, so it cannot use a TurboQuant cache"
        )
    args = getattr(model, "args", None)
    head_dim = getattr(args, "head_dim", None)
    if head_dim is None and hasattr(args, "hidden_size") and hasattr(args, "num_attention_heads"):
        head_dim = args.hidden_size // args.num_attention_heads
    if isinstance(head_dim, int):
        check_head_dim(head_dim)
    caches = lm_cache.make_prompt_cache(model, max_kv_size=max_kv_size)
    if max_kv_size is not None and hasattr(model, "make_cache"):
        caches = [
            RotatingKVCache(max_size=max_kv_size, keep=4) if type(c) is KVCache else c
            for c in caches
        ]
    options = dict(
        key_bits=kb,
        value_bits=vb,
        seed=seed,
        center_keys=center_keys,
        smooth_keys=smooth_keys,
        exact_sink=exact_sink,
    )
    out = []
    for c in caches:
        if type(c) is KVCache:
            c = TurboQuantKVCache(**options)
        elif type(c) is RotatingKVCache and quantize_sliding:
            c = TurboQuantRotatingKVCache(c.max_size, c.keep, **options)
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
        **expected: Settings the caller relies on (key_bits, value_bits, seed, head_dim);
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
    if header.get("format") != FILE_FORMAT:
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
        cls = globals().get(name) if name.startswith("TurboQuant") else getattr(lm_cache, name)
        c = cls.from_state(state, meta) if meta is not None else cls.from_state(state)
        for key, want in expected.items():
            have = getattr(c, key, want)
            if have is not None and have != want:
                raise ValueError(f"{path} was written with {key}={have}, expected {want}")
        cache.append(c)
    return (cache, json.loads(header["metadata"])) if return_metadata else cache
