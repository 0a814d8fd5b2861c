"""mlx-lm's OpenAI-compatible server with TurboQuant KV caches: `mlx_tq.server --kv-bits 4`.

Everything but the caches is mlx-lm's: its HTTP handler, model provider, batching, prompt-cache
reuse and flags. `--kv-bits`, `--kv-key-bits`, `--kv-value-bits` and `--quantized-kv-start`
(the warm-up) configure the TurboQuant cache in place of mlx-lm's affine one, and `--model`
defaults to `mlx_tq.generate`'s.
"""

import argparse
import copy
import sys
from functools import partial
from pathlib import Path

import mlx_lm
import mlx_lm.server as lm_server
from huggingface_hub.constants import HF_HUB_CACHE

from . import tools
from .cache import PRESETS, WARMUP_TOKENS, make_prompt_cache
from .codebook import SUPPORTED_BITS
from .loading import resolve
from .patch import patch

DEFAULT_KV_BITS = 4


def setup_arg_parser():
    parser = argparse.ArgumentParser(
        prog="mlx_tq.server",
        description="mlx_lm.server with TurboQuant KV caches. These flags take precedence; "
        "all others are mlx_lm.server's (listed next), whose --kv-group-size has no effect here.",
        add_help=False,
    )
    arg = parser.add_argument
    arg("--model", help="HF repo, local mlx folder or .gguf (default: Gemma-3-270M)")
    arg(
        "--kv-bits",
        type=tools.kv_bits,
        default=DEFAULT_KV_BITS,
        help=f"Bit budget of the TurboQuant KV cache, one of {tuple(PRESETS)}, or none: "
        f"mlx-lm's unquantised cache (default: {DEFAULT_KV_BITS})",
    )
    arg("--kv-key-bits", type=int, choices=SUPPORTED_BITS, help="Override key bits")
    arg("--kv-value-bits", type=int, choices=SUPPORTED_BITS, help="Override value bits")
    arg(
        "--quantized-kv-start",
        type=int,
        default=WARMUP_TOKENS,
        help="Tokens each layer holds exactly before it freezes its key statistics on them "
        f"and quantises (default: {WARMUP_TOKENS})",
    )
    return parser


class ModelProvider(lm_server.ModelProvider):
    """mlx-lm's model provider; the models it loads build TurboQuant caches.

    Args:
        cli_args: mlx-lm's server arguments.
        **cache_options: Keyword arguments of `mlx_tq.make_prompt_cache` (kv_bits, ...).
    """

    def __init__(self, cli_args: argparse.Namespace, **cache_options):
        super().__init__(cli_args)
        self.cache_options = cache_options

    def _load(self, *args, **kwargs):
        super()._load(*args, **kwargs)
        try:
            caches = make_prompt_cache(self.model, **self.cache_options)
        except ValueError:
            self.reset()  # so that the next request loads again instead of using fp16 caches
            raise
        # mlx-lm builds every cache (single requests, BatchGenerator) through model.make_cache.
        self.model.make_cache = partial(copy.deepcopy, caches)
        self.is_batchable = self.is_batchable and all(hasattr(c, "merge") for c in caches)


class LRUPromptCache(lm_server.LRUPromptCache):
    """mlx-lm's prompt cache, reusing a TurboQuant cache only down to the tokens its key
    statistics came from: trimmed below them it differs from a fresh cache of its tokens."""

    def fetch_nearest_cache(self, model, tokens):
        cache, rest = super().fetch_nearest_cache(model, tokens)
        kept = len(tokens) - len(rest)
        if cache is not None and any(getattr(c, "stats_tokens", 0) > kept for c in cache):
            return None, tokens
        return cache, rest


class ResponseGenerator(lm_server.ResponseGenerator):
    """mlx-lm's, answering bad requests with an error that mlx-lm 0.32.2 does not catch: an
    empty prompt or one that is not text (a list: BatchGenerator and the prompt cache raise,
    which ends the generation thread) and a `logit_bias` token id outside the vocabulary (the
    process dies of a segmentation fault)."""

    def _tokenize(self, tokenizer, request, args):
        tokenized = super()._tokenize(tokenizer, request, args)
        if not tokenized[0] or not all(isinstance(t, int) for t in tokenized[0]):
            raise ValueError("the prompt must be non-empty text")
        vocab = getattr(getattr(self.model_provider.model, "args", None), "vocab_size", None)
        if vocab and any(not 0 <= t < vocab for t in args.logits.logit_bias or {}):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
        return tokenized


def main():
    parser = setup_arg_parser()
    args, rest = parser.parse_known_args()
    if args.kv_bits is None and (args.kv_key_bits or args.kv_value_bits):
        parser.error("--kv-key-bits and --kv-value-bits need a --kv-bits budget")
    options = dict(kv_bits=args.kv_bits, key_bits=args.kv_key_bits, value_bits=args.kv_value_bits)
    options["warmup_tokens"] = args.quantized_kv_start
    if {"-h", "--help"} & set(rest):
        setup_arg_parser().print_help()
        print()
    else:
        try:
            model = resolve(args.model)
            # Fails here, not in the server's generation thread, for a model we cannot serve.
            if args.kv_bits is not None:
                make_prompt_cache(mlx_lm.load(model, lazy=True)[0], **options)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}") from e
        rest = ["--model", model, *rest]
    # mlx-lm's /v1/models fails while the Hugging Face cache does not exist (a fresh install).
    Path(HF_HUB_CACHE).mkdir(parents=True, exist_ok=True)
    # mlx-lm's main parses its flags and builds these by name (--kv-bits none: its own caches).
    if args.kv_bits is not None:
        patch()
        lm_server.ModelProvider = partial(ModelProvider, **options)
    lm_server.LRUPromptCache = LRUPromptCache
    lm_server.ResponseGenerator = ResponseGenerator
    sys.argv = ["mlx_tq.server", *rest]
    lm_server.main()


if __name__ == "__main__":
    main()
