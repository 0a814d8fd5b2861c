"""Route mlx-lm's `scaled_dot_product_attention` to mlx_tq when the cache is ours.

Model modules import the function by name from `mlx_lm.models.base`, so we replace that
name in `base` (which modules imported later pick up) and in every loaded model module.
"""

import sys

import mlx_lm.models.base as base

_original = None  # mlx-lm's function while patched


def is_patched() -> bool:
    return _original is not None


def _attention(queries, keys, values, cache, scale, mask, sinks=None):
    from .attention import scaled_dot_product_attention
    from .quant import TurboQuantized

    if not isinstance(keys, TurboQuantized):
        return _original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    if sinks is not None:
        raise NotImplementedError("attention sinks are not supported with a TurboQuant cache")
    cache._pending = False
    return scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


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


def uses_base_attention(model) -> bool:
    """Whether some module of `model` calls mlx-lm's shared `scaled_dot_product_attention`."""
    shared = (_attention, _original or base.scaled_dot_product_attention)
    return any(
        getattr(sys.modules.get(type(m).__module__), "scaled_dot_product_attention", None) in shared
        for m in model.modules()
    )
