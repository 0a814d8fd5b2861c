"""Generate text with a TurboQuant KV cache: `mlx_tq.generate --prompt "..." --kv-bits 4`."""

import argparse
import sys

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from .cache import PRESETS, make_prompt_cache
from .codebook import SUPPORTED_BITS
from .loading import load
from .patch import patch

DEFAULT_PROMPT = "The capital of France is"
DEFAULT_MAX_TOKENS = 100
DEFAULT_TEMP = 0.0
DEFAULT_TOP_P = 1.0
DEFAULT_KV_BITS = 4


def setup_arg_parser():
    parser = argparse.ArgumentParser(description="Generate text with a TurboQuant KV cache.")
    parser.add_argument(
        "--model", default=None, help="HF repo, local mlx folder or .gguf (default: Gemma-3-270M)"
    )
    parser.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help="Prompt ('-' for stdin)")
    parser.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--temp", type=float, default=DEFAULT_TEMP, help="Sampling temperature")
    parser.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help="Nucleus sampling")
    parser.add_argument("--seed", type=int, default=None, help="PRNG seed")
    parser.add_argument("--system-prompt", default=None, help="System prompt for the chat template")
    parser.add_argument(
        "--ignore-chat-template", action="store_true", help="Feed the prompt as raw text"
    )
    parser.add_argument(
        "--max-kv-size", type=int, default=None, help="Keep at most this many tokens (rotating)"
    )
    parser.add_argument(
        "--verbose",
        type=lambda s: s.lower() in ("1", "true", "yes"),
        default=True,
        help="Print timing and memory figures (true/false)",
    )
    parser.add_argument(
        "--kv-bits",
        type=int,
        default=DEFAULT_KV_BITS,
        choices=PRESETS,
        help=f"Bit budget of the KV cache, one of {tuple(PRESETS)}",
    )
    # Checked here, before a model is loaded.
    parser.add_argument(
        "--kv-key-bits", type=int, default=None, choices=SUPPORTED_BITS, help="Override key bits"
    )
    parser.add_argument(
        "--kv-value-bits",
        type=int,
        default=None,
        choices=SUPPORTED_BITS,
        help="Override value bits",
    )
    parser.add_argument(
        "--kv-exact-sink",
        action="store_true",
        help="Keep each layer's first token (the attention sink, e.g. BOS) exact",
    )
    return parser


def fp16_kv_bytes(cache) -> int:
    """Bytes mlx-lm's fp16 caches would hold for the same buffers (same tokens, same steps)."""
    total = 0
    for c in cache:
        if getattr(c, "keys", None) is not None:
            B, H, S, width = c.keys.shape
            total += 2 * B * H * S * (getattr(c, "head_dim", None) or width) * 2
    return total


def main():
    args = setup_arg_parser().parse_args()
    if args.seed is not None:
        mx.random.seed(args.seed)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    prompt = prompt.replace("\\n", "\n").replace("\\t", "\t")
    if not prompt.strip():
        raise SystemExit("error: the prompt is empty: give some text with --prompt")
    model, tokenizer = load(args.model)
    try:
        cache = make_prompt_cache(
            model,
            kv_bits=args.kv_bits,
            key_bits=args.kv_key_bits,
            value_bits=args.kv_value_bits,
            max_kv_size=args.max_kv_size,
            exact_sink=args.kv_exact_sink or None,
        )
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    patch()

    if not args.ignore_chat_template and tokenizer.has_chat_template:
        messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        messages.append({"role": "user", "content": prompt})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    else:
        prompt = tokenizer.encode(prompt)

    sampler = make_sampler(args.temp, args.top_p)
    response = None
    for response in stream_generate(
        model, tokenizer, prompt, max_tokens=args.max_tokens, sampler=sampler, prompt_cache=cache
    ):
        print(response.text, end="", flush=True)
    print()
    if args.verbose and response is not None:
        held = sum(c.nbytes for c in cache)
        fp16 = fp16_kv_bytes(cache)
        print("=" * 10)
        print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec")
        print(
            f"Generation: {response.generation_tokens} tokens, "
            f"{response.generation_tps:.3f} tokens-per-sec"
        )
        print(f"Peak memory: {response.peak_memory:.3f} GB")
        print(
            f"KV cache: {held / 1e6:.3f} MB held vs {fp16 / 1e6:.3f} MB for an fp16 cache of "
            f"the same tokens ({held / max(fp16, 1):.3f}x)"
        )


if __name__ == "__main__":
    main()
