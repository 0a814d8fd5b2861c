"""Bad input, one row per case: the error class and a message that says what is supported."""

import sys
from functools import partial
from unittest import mock

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import tiny_model
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.models.cache import save_prompt_cache as lm_save_prompt_cache

import mlx_tq
from mlx_tq import (
    TurboQuantized,
    TurboQuantKVCache,
    TurboQuantRotatingKVCache,
    dequantize,
    quantize,
)
from mlx_tq import generate as cli_module
from mlx_tq import scaled_dot_product_attention as tq_attention

HEAD_DIMS = "supported head dims are (64, 80, 96, 112, 128, 192, 256)"
BITS = "is not supported: choose one of (2, 3, 4, 5, 6, 7, 8)"
DTYPES = "supported dtypes are float16, bfloat16, float32"
CLI_BITS = "(choose from 2, 3, 4, 5, 6, 7, 8)"
F64 = mx.float64
MASK = "does not broadcast to (B, H, L, S) = (1, 4, 1, 10)"


def tiny_llama(head_dim=64):
    return tiny_model("llama", head_dim=head_dim, num_hidden_layers=1)


class OwnAttention(nn.Module):
    """A model whose module never calls mlx_lm.models.base.scaled_dot_product_attention."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64)

    def __call__(self, q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0)


def attention(q_shape=(1, 4, 1, 64), mask=None, q_dtype=mx.float32):
    kv = quantize(mx.ones((1, 2, 10, 64)), 4)
    return tq_attention(mx.zeros(q_shape, q_dtype), kv, kv, 1.0, mask)


def update(keys, values=None, cache=None):
    cache = cache or TurboQuantKVCache(warmup_tokens=0)
    return cache.update_and_fetch(keys, keys if values is None else values)


def fed_cache():
    cache = TurboQuantKVCache(warmup_tokens=0)
    update(mx.ones((1, 1, 2, 64)), cache=cache)
    return cache


def saved(tmp, sliding=False, **options):
    cls = partial(TurboQuantRotatingKVCache, 16) if sliding else TurboQuantKVCache
    cache = [cls(**options, warmup_tokens=0)]
    update(mx.random.normal((1, 1, 8, 64), key=mx.random.key(0)), cache=cache[0])
    mlx_tq.save_prompt_cache(tmp / "tq.safetensors", cache)
    return tmp / "tq.safetensors"


def truncated(tmp, n):
    path = saved(tmp)
    (tmp / "cut.safetensors").write_bytes(path.read_bytes()[:n])
    return tmp / "cut.safetensors"


def mlx_lm_file(tmp):
    cache = [KVCache()]
    cache[0].update_and_fetch(mx.ones((1, 1, 4, 64)), mx.ones((1, 1, 4, 64)))
    lm_save_prompt_cache(str(tmp / "lm.safetensors"), cache)
    return tmp / "lm.safetensors"


def renamed_class(tmp, name):
    arrays, header = mx.load(str(saved(tmp)), return_metadata=True)
    mx.save_safetensors(
        str(tmp / "renamed.safetensors"), arrays, {**header, "classes": f'["{name}"]'}
    )
    return tmp / "renamed.safetensors"


def gguf_file(tmp, arch):
    w = gguf.GGUFWriter(str(tmp / f"{arch}.gguf"), arch)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tmp / f"{arch}.gguf"


def cli(*argv):
    with mock.patch.object(sys, "argv", ["mlx_tq.generate", *argv]):
        cli_module.main()


nan_offset = mx.full((1, 1, 1, 64), np.nan)
bad_query_shape = "queries (1, 4, 1, 128) and keys (1, 2, 10, 64) must share B and D"

# (case, call(tmp_path), error, message)
CASES = [
    # head_dim
    ("quantize head_dim 72", lambda t: quantize(mx.zeros((2, 72)), 4), ValueError, HEAD_DIMS),
    ("model head_dim 72", lambda t: mlx_tq.make_prompt_cache(tiny_llama(72)),
     ValueError, HEAD_DIMS),
    ("cache head_dim 72", lambda t: update(mx.ones((1, 1, 3, 72))), ValueError, HEAD_DIMS),
    ("cache head_dim changes", lambda t: update(mx.ones((1, 1, 1, 128)), cache=fed_cache()),
     ValueError, "do not fit this cache of (B, H, D) = (1, 1, 64)"),
    ("cache heads change", lambda t: update(mx.ones((1, 2, 1, 64)), cache=fed_cache()),
     ValueError, "do not fit this cache of (B, H, D) = (1, 1, 64)"),
    # bits
    ("quantize bits 9", lambda t: quantize(mx.zeros((2, 64)), 9), ValueError, BITS),
    ("quantize bits 1", lambda t: quantize(mx.zeros((2, 64)), 1), ValueError, BITS),
    ("cache key_bits 9", lambda t: TurboQuantKVCache(key_bits=9), ValueError, "key_bits=9 " + BITS),
    ("rotating value_bits 1", lambda t: TurboQuantRotatingKVCache(16, value_bits=1), ValueError,
     "value_bits=1 " + BITS),
    ("kv_bits 9", lambda t: mlx_tq.make_prompt_cache(tiny_llama(), kv_bits=9), ValueError,
     "kv_bits=9 " + BITS),
    ("key_bits 1", lambda t: mlx_tq.make_prompt_cache(tiny_llama(), key_bits=1), ValueError,
     "key_bits=1 " + BITS),
    # (the parameter given is named, not the sliding layers' key bits it also sets)
    ("kv_bits 4 key_bits 9", lambda t: mlx_tq.make_prompt_cache(tiny_llama(), kv_bits=4,
     key_bits=9), ValueError, "ValueError: key_bits=9 " + BITS),
    ("recent_tokens -1", lambda t: mlx_tq.make_prompt_cache(tiny_llama(), recent_tokens=-1),
     ValueError, "recent_tokens=-1 is not supported: give an int >= 0"),
    ("recent_tokens 2.5", lambda t: TurboQuantKVCache(recent_tokens=2.5), ValueError,
     "recent_tokens=2.5 is not supported: give an int >= 0"),
    ("recent_tokens '8'", lambda t: mlx_tq.make_prompt_cache(tiny_llama(), recent_tokens="8"),
     ValueError, "recent_tokens='8' is not supported: give an int >= 0"),
    ("key_bits 0", lambda t: mlx_tq.make_prompt_cache(tiny_llama(), key_bits=0), ValueError,
     "key_bits=0 " + BITS),
    ("value_bits 9", lambda t: mlx_tq.make_prompt_cache(tiny_llama(), value_bits=9), ValueError,
     "value_bits=9 " + BITS),
    ("cli --kv-bits 9", lambda t: cli("--kv-bits", "9"),
     SystemExit, "--kv-bits: invalid choice: 9 " + CLI_BITS),
    ("cli --kv-recent-tokens -1", lambda t: cli("--kv-recent-tokens", "-1"), SystemExit,
     "--kv-recent-tokens: -1 is not >= 0"),
    ("cli --kv-key-bits 1", lambda t: cli("--kv-key-bits", "1"), SystemExit,
     "--kv-key-bits: invalid choice: 1 " + CLI_BITS),
    ("cli --kv-value-bits 16", lambda t: cli("--kv-value-bits", "16"), SystemExit,
     "--kv-value-bits: invalid choice: 16 " + CLI_BITS),
    # dtypes and non-finite values
    ("quantize int32", lambda t: quantize(mx.zeros((2, 64), mx.int32), 4), TypeError, DTYPES),
    ("quantize float64", lambda t: quantize(mx.zeros((2, 64), mx.float64), 4), TypeError, DTYPES),
    ("cache int32 keys", lambda t: update(mx.ones((1, 1, 2, 64), mx.int32)), TypeError,
     "keys has dtype mlx.core.int32: " + DTYPES),
    ("cache float64 values", lambda t: update(mx.ones((1, 1, 2, 64)), mx.ones((1, 1, 2, 64), F64)),
     TypeError, "values has dtype mlx.core.float64: " + DTYPES),
    ("int32 queries", lambda t: attention(q_dtype=mx.int32),
     TypeError, "queries has dtype mlx.core.int32"),
    ("quantize NaN", lambda t: quantize(mx.full((2, 64), np.nan), 4),
     ValueError, "x contains NaN or inf"),
    ("quantize NaN offset", lambda t: quantize(mx.ones((1, 1, 4, 64)), 4, offset=nan_offset),
     ValueError, "offset contains NaN or inf"),
    # shapes
    ("query head_dim", lambda t: attention((1, 4, 1, 128)), ValueError, bad_query_shape),
    ("3-D queries", lambda t: attention((4, 1, 64)),
     ValueError, "queries must have shape (B, Hq, L, D)"),
    ("Hq % Hkv", lambda t: attention((1, 3, 1, 64)), ValueError,
     "3 query heads are not a multiple of 2 key/value heads"),
    ("cache keys/values length", lambda t: update(mx.ones((1, 1, 2, 64)), mx.ones((1, 1, 3, 64))),
     ValueError, "must be (B, H, L, D) with the same B, H and L"),
    ("cache 3-D keys", lambda t: update(mx.ones((1, 2, 64))), ValueError, "must be (B, H, L, D)"),
    ("cache MLA", lambda t: update(mx.ones((1, 1, 2, 192)), mx.ones((1, 1, 2, 128))), ValueError,
     "different key and value sizes (e.g. MLA) is not supported"),
    # masks: (B, Hq, L, S) = (1, 4, 1, 10)
    ("mask heads", lambda t: attention(mask=mx.ones((1, 3, 1, 10), mx.bool_)), ValueError, MASK),
    ("mask batch", lambda t: attention(mask=mx.ones((2, 1, 1, 10), mx.bool_)), ValueError, MASK),
    ("mask keys", lambda t: attention(mask=mx.ones((11,), mx.bool_)), ValueError, MASK),
    ("mask queries", lambda t: attention(mask=mx.ones((2, 10))), ValueError, MASK),
    ("mask 5-D", lambda t: attention(mask=mx.ones((1, 1, 1, 1, 10))), ValueError, MASK),
    ("mask string", lambda t: attention(mask="upper"),
     ValueError, "use None, 'causal' or an array"),
    # models and the CLI
    ("attention outside mlx-lm", lambda t: mlx_tq.make_prompt_cache(OwnAttention()), ValueError,
     "does not reach mlx_lm.models.base.scaled_dot_product_attention"),
    ("empty prompt", lambda t: cli("--prompt", ""), SystemExit,
     "the prompt is empty: give some text with --prompt"),
    ("blank prompt", lambda t: cli("--prompt", " \\n "), SystemExit, "the prompt is empty"),
    ("cli missing model", lambda t: cli("--model", str(t / "nope"), "--prompt", "hi"),
     SystemExit, "No such model file or folder"),
    ("missing model", lambda t: mlx_tq.load(str(t / "nope")),
     FileNotFoundError, "No such model file or folder"),
    ("missing gguf", lambda t: mlx_tq.load(str(t / "nope.gguf")), FileNotFoundError, "nope.gguf"),
    ("folder without model", lambda t: mlx_tq.load(str(t)),
     ValueError, "is not a model folder: it has no config.json"),
    ("file not gguf", lambda t: mlx_tq.load(str(saved(t))),
     ValueError, "give a GGUF file or a model folder"),
    ("gguf phi3", lambda t: mlx_tq.load(str(gguf_file(t, "phi3"))), ValueError,
     "GGUF architecture 'phi3' is not supported; supported: llama, qwen2, gemma3"),
    # prompt-cache files
    ("missing cache file", lambda t: mlx_tq.load_prompt_cache(t / "nope.safetensors"),
     FileNotFoundError, "no prompt cache file at"),
    ("cache file is a folder", lambda t: mlx_tq.load_prompt_cache(t),
     FileNotFoundError, "no prompt cache file at"),
    ("truncated header", lambda t: mlx_tq.load_prompt_cache(truncated(t, 100)), ValueError,
     "is not a readable safetensors file (truncated?)"),
    ("truncated data", lambda t: mlx_tq.load_prompt_cache(truncated(t, -40)), ValueError,
     "is not a readable safetensors file (truncated?)"),
    ("empty file", lambda t: mlx_tq.load_prompt_cache(truncated(t, 0)), ValueError,
     "is not a readable safetensors file (truncated?)"),
    ("mlx-lm cache file", lambda t: mlx_tq.load_prompt_cache(mlx_lm_file(t)), ValueError,
     "not an mlx_tq prompt cache (format None); files from mlx-lm load with "
     "mlx_lm.models.cache.load_prompt_cache"),
    ("other key_bits", lambda t: mlx_tq.load_prompt_cache(saved(t, key_bits=3), key_bits=4),
     ValueError, "was written with key_bits=3, expected 4"),
    ("unknown cache class", lambda t: mlx_tq.load_prompt_cache(renamed_class(t, "Foo")),
     ValueError, "layer 0 is a 'Foo', a cache class neither mlx_tq nor mlx-lm has"),
    ("other key_bits, sliding layer", lambda t: mlx_tq.load_prompt_cache(
        saved(t, sliding=True, key_bits=5), key_bits=4), ValueError,
     "key_bits=5, expected 4 (layer 0, TurboQuantRotatingKVCache: the 3- and 4-bit presets "
     "give sliding-window layers one more key bit)"),
    ("other value_bits", lambda t: mlx_tq.load_prompt_cache(saved(t, value_bits=2), value_bits=4),
     ValueError, "was written with value_bits=2, expected 4"),
    ("other head_dim", lambda t: mlx_tq.load_prompt_cache(saved(t), head_dim=128), ValueError,
     "was written with head_dim=64, expected 128"),
    ("other seed", lambda t: mlx_tq.load_prompt_cache(saved(t, seed=1), seed=0), ValueError,
     "was written with seed=1, expected 0"),
    ("unknown setting", lambda t: mlx_tq.load_prompt_cache(saved(t), bits=4), TypeError,
     "expected settings are key_bits, value_bits, seed and head_dim"),
]  # fmt: skip


@pytest.mark.parametrize("call, error, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(call, error, message, tmp_path, capsys):
    with pytest.raises(error) as info:
        call(tmp_path)
    # argparse prints its message and exits with status 2.
    text = f"{type(info.value).__name__}: {info.value}" + capsys.readouterr().err
    assert message in text


def test_rotating_decode_mask_is_accepted():
    # mlx-lm's RotatingKVCache.make_mask gives a 1-D (S,) mask for one token when the
    # window is shorter than the cache: mx.fast.scaled_dot_product_attention accepts it.
    cache = TurboQuantRotatingKVCache(max_size=32, key_bits=8, value_bits=8, warmup_tokens=0)
    ref = RotatingKVCache(max_size=32)
    kv = mx.random.normal((1, 2, 40, 64), key=mx.random.key(1))
    q = mx.random.normal((1, 4, 1, 64), key=mx.random.key(2))
    for t in range(40):
        mask = cache.make_mask(1, window_size=8)
        assert np.array_equal(np.array(mask), np.array(ref.make_mask(1, window_size=8)))
        cache.update_and_fetch(kv[:, :, t : t + 1], kv[:, :, t : t + 1])
        ref.update_and_fetch(kv[:, :, t : t + 1], kv[:, :, t : t + 1])
    assert mask.shape == (32,) and cache.keys.shape[2] == 32
    kq = TurboQuantized(cache.keys, 8, 64, offset=cache.key_offset)
    vq = TurboQuantized(cache.values, 8, 64)
    out = tq_attention(q, kq, vq, 0.125, mask)
    expected = mx.fast.scaled_dot_product_attention(
        q, dequantize(kq), dequantize(vq), scale=0.125, mask=mask
    )
    np.testing.assert_allclose(np.array(out), np.array(expected), rtol=1e-4, atol=1e-5)
