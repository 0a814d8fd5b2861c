"""Route mlx-lm's `scaled_dot_product_attention` to mlx_tq when the cache is ours.

Model modules import the function by name from `mlx_lm.models.base`, so we replace that
name in `base` (which modules imported later pick up) and in every loaded model module.
"""

import sys
import threading

import mlx.core as mx
import mlx_lm.models.base as base

from . import attention
from .quant import TurboQuantized

_original = None  # mlx-lm's function while patched


class _Probe(threading.local):
    # A class default, so that reading it outside a probe raises (and costs) no AttributeError.
    reached = None  # ids of the caches a routing probe saw attended


_probe = _Probe()
_probe_lock = threading.Lock()


def is_patched() -> bool:
    return _original is not None


def _attention(queries, keys, values, cache, scale, mask, sinks=None):
    if not isinstance(keys, TurboQuantized):
        return _original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    if sinks is not None:
        raise NotImplementedError("attention sinks are not supported with a TurboQuant cache")
    reached = _probe.reached
    if reached is not None:
        reached.add(id(cache))
    step = getattr(cache, "_step", None)
    plain = mask is None or not isinstance(mask, mx.array)
    if step is not None and step() is keys.data and plain:
        # The keys the cache built for a decode step: only the queries need a check, once
        # per shape, dtype and scale (the cache then keeps the launch; reset with its own).
        attend = cache._step_attention
        out = None if attend is None else attend(queries, keys, values, scale, cache)
        if out is not None:
            return out
        attention.check_queries(queries, keys)
        if queries.shape[2] == 1 and attention._path(queries, keys, values, None) == "fused":
            cache._step_attention = attention.fused_step(queries, keys, values, scale, cache)
            return attention._fused_attention(queries, keys, values, scale, False)
    # A batch of left-padded rows (not a sliding window): its mask is causal from each row's
    # first token, which the fused kernel applies itself instead of decoding for an array mask.
    pads = None if hasattr(cache, "max_size") else getattr(cache, "left_padding", None)
    if pads is not None and attention._path(queries, keys, values, "causal") == "fused":
        attention._check_inputs(queries, keys, values)
        causal = queries.shape[2] > 1
        return attention._fused_attention(queries, keys, values, scale, causal, starts=pads)
    return attention.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


def _swap(old, new):
    for name, module in list(sys.modules.items()):
        if name.startswith("mlx_lm.models.") and module is not None:
            if getattr(module, "scaled_dot_product_attention", None) is old:
                module.scaled_dot_product_attention = new


def patch():
    """Routes mlx-lm attention over TurboQuant caches to mlx_tq's attention. Idempotent."""
    global _original
    if _original is None:
        _original = base.scaled_dot_product_attention
        _swap(_original, _attention)


def unpatch():
    """Restores mlx-lm's own attention, also in model modules loaded after `patch`."""
    global _original
    if _original is not None:
        _swap(_attention, _original)
        _original = None


def check_routing(model, make_cache):
    """Raises ValueError unless a 1-token forward pass of `model`, patched, reaches mlx_tq's
    attention for every TurboQuant layer of `make_cache()` (other packages' wrappers that
    call on to it are fine); the error names what the model's attention calls instead."""
    with _probe_lock:
        was_patched = is_patched()
        patch()
        _probe.reached, ours = set(), set()
        try:
            caches = make_cache()
            ours = {id(c) for c in caches if hasattr(c, "key_bits")}
            model(mx.zeros((1, 1), mx.int32), cache=caches)
            error = None
        except ValueError:  # the caches' own, already clear
            raise
        except Exception as e:  # a bypass fails on the packed keys somewhere in the model
            error = e
        finally:
            reached, _probe.reached = _probe.reached, None
            if not was_patched:
                unpatch()
    if error is None and ours and ours <= reached:
        return
    called = {
        getattr(sys.modules.get(type(m).__module__), "scaled_dot_product_attention", None)
        for m in model.modules()
    } - {None, _attention}
    names = sorted(f"{f.__module__}.{f.__qualname__}" for f in called if callable(f))
    cause = f" ({type(error).__name__}: {error})" if error is not None else ""
    raise ValueError(
        f"{type(model).__module__}: the model's attention does not reach "
        f"mlx_lm.models.base.scaled_dot_product_attention as patched by mlx_tq"
        + (f"; its modules call {', '.join(names)}" if names else "")
        + f"{cause}, so it cannot use a TurboQuant cache"
    ) from error
