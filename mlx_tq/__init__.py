"""mlx_tq: a TurboQuant KV cache for mlx-lm."""

from .attention import scaled_dot_product_attention
from .cache import (
    TurboQuantKVCache,
    TurboQuantRotatingKVCache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
)
from .codebook import SUPPORTED_BITS, SUPPORTED_DIMS
from .loading import load
from .patch import patch, unpatch
from .quant import TurboQuantized, dequantize, quantize, quantize_kv

__version__ = "0.1.0"
