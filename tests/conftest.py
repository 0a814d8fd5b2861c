import mlx.core as mx
import pytest
from hypothesis import settings
from mlx.utils import tree_flatten
from mlx_lm.models import gemma3_text, llama, qwen2

import mlx_tq
from mlx_tq.patch import is_patched

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.load_profile("ci")

FAMILIES = {"llama": llama, "qwen2": qwen2, "gemma3": gemma3_text}


def tiny_model(family="llama", **overrides):
    """A small random mlx-lm model (head_dim 64 unless overridden), seeded for repeatability."""
    mx.random.seed(0)
    args = dict(
        model_type="gemma3_text" if family == "gemma3" else family,
        hidden_size=128,
        intermediate_size=256,
        vocab_size=128,
        rms_norm_eps=1e-5,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    )
    if family == "qwen2":  # no head_dim argument: hidden_size / heads
        args.update(num_attention_heads=2, num_key_value_heads=1)
    if family == "gemma3":
        args.update(
            num_hidden_layers=3,
            num_key_value_heads=1,
            sliding_window=16,
            sliding_window_pattern=3,
        )
    args.update(overrides)
    module = FAMILIES[family]
    model = module.Model(module.ModelArgs.from_dict(args))
    mx.eval(model.parameters())
    return model


def lively(model, std=0.5):
    """Gives `model` random weights larger than mlx-lm's initialisation (seeded), so that its
    greedy text does not repeat one token: a wrong cache then changes the tokens."""
    params = tree_flatten(model.parameters())
    keys = mx.random.split(mx.random.key(0), len(params))
    model.load_weights(
        [(k, std * mx.random.normal(v.shape, key=keys[i])) for i, (k, v) in enumerate(params)]
    )
    mx.eval(model.parameters())
    return model


class ByteTokenizer:
    """Bytes as token ids, BOS 1: a tokenizer for text fed to a tiny model."""

    bos_token_id = 1

    def encode(self, text, add_special_tokens=True):
        ids = list(text.encode())
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


@pytest.fixture
def restore_patch():
    """Leaves mlx_tq's patch of mlx-lm as the test found it (the CLIs' mains patch)."""
    was_patched = is_patched()
    yield
    if not was_patched:
        mlx_tq.unpatch()
