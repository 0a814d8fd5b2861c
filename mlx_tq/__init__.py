"""mlx_tq: a TurboQuant KV cache for mlx-lm."""

from .attention import scaled_dot_product_attention
from .codebook import SUPPORTED_BITS, SUPPORTED_DIMS
from .quant import TurboQuantized, dequantize, quantize

__version__ = "0.1.0"
