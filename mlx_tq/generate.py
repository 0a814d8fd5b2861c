"""Generate text with a TurboQuant KV cache: `mlx_tq.generate --prompt "..." --kv-bits 4`."""

import argparse
import sys

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from . import tools
from .cache import KEEP, PRESETS, RECENT_TOKENS, capped_cache, make_prompt_cache
from .codebook import SUPPORTED_BITS
from .loading import load
from .patch import patch

DEFAULT_PROMPT = "The capital of France is"
DEFAULT_MAX_TOKENS = 100
DEFAULT_TEMP = 0.0
DEFAULT_TOP_P = 1.0
DEFAULT_KV_BITS = 4


def setup_arg_parser():
    parser = argparse.ArgumentParser(
        description="Generate text with a TurboQuant KV cache.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    tools.add_model_arguments(parser, dtype=False)
    arg, count = parser.add_argument, tools.positive_int
    arg("--prompt", "-p", default=DEFAULT_PROMPT, help="Prompt ('-' for stdin)")
    arg("--max-tokens", "-m", type=count, default=DEFAULT_MAX_TOKENS, help="Tokens to generate")
    arg("--temp", type=tools.non_negative_float, default=DEFAULT_TEMP, help="Sampling temperature")
    arg("--top-p", type=float, default=DEFAULT_TOP_P, help="Nucleus sampling")
    arg("--seed", type=int, help="PRNG seed")
    arg("--system-prompt", help="System prompt for the chat template")
    arg("--ignore-chat-template", action="store_true", help="Feed the prompt as raw text")
    arg("--max-kv-size", type=count, help="Keep at most this many tokens per layer (rotating)")
    arg(
        "--verbose",
        type=lambda s: s.lower() not in ("false", "f"),  # as mlx_lm.generate reads it
        default=True,
        help="Print timing, memory and KV cache figures (false or f: off)",
    )
    arg(
        "--kv-bits",
        type=tools.kv_bits,
        default=DEFAULT_KV_BITS,
        help=f"KV cache budget, one of {tuple(PRESETS)}, or none: mlx-lm's unquantised cache",
    )
    arg("--kv-key-bits", type=int, choices=SUPPORTED_BITS, help="Override the preset's key bits")
    arg("--kv-value-bits", type=int, choices=SUPPORTED_BITS, help="Override its value bits")
    arg(
        "--kv-recent-tokens",
        type=tools.non_negative_int,
        default=RECENT_TOKENS,
        help="Newest positions each decoded token attends exactly (0: none)",
    )
    return parser


def kv_line(cache) -> str:
    """The KV cache figures: tokens, bits per element against an unquantised cache, bytes."""
    f = tools.kv_footprint(cache)
    name = str(f["dtype"]).removeprefix("mlx.core.")
    warming = [c.warmup_tokens for c in cache if getattr(c, "key_bits", 0) and c.key_offset is None]
    note = (
        f" (each layer holds its first {warming[0]} tokens exactly, then quantises them)"
        if warming
        else ""
    )
    return (
        f"KV cache: {f['tokens']} tokens, {f['bits']:.2f} bits per element "
        f"({f['bits'] / (8 * f['dtype'].size):.3f}x an unquantised {name} cache); "
        f"{f['held'] / 1e6:.3f} MB held, {f['allocated'] / 1e6:.3f} MB allocated{note}"
    )


def main():
    parser = setup_arg_parser()
    args = parser.parse_args()
    if args.kv_bits is None and (args.kv_key_bits or args.kv_value_bits):
        parser.error("--kv-key-bits and --kv-value-bits need a --kv-bits budget")
    if args.max_kv_size is not None and args.max_kv_size <= KEEP:
        parser.error(f"--max-kv-size must exceed the {KEEP} first tokens a rotating cache keeps")
    if args.seed is not None:
        mx.random.seed(args.seed)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    prompt = prompt.replace("\\n", "\n").replace("\\t", "\t")
    if not prompt.strip():
        raise SystemExit("error: the prompt is empty: give some text with --prompt")
    tools.blas_hint()
    with tools.user_errors():
        model, tokenizer = load(args.model)
        if args.kv_bits is None:
            cache = capped_cache(model, args.max_kv_size)
        else:
            cache = make_prompt_cache(
                model,
                kv_bits=args.kv_bits,
                key_bits=args.kv_key_bits,
                value_bits=args.kv_value_bits,
                max_kv_size=args.max_kv_size,
                recent_tokens=args.kv_recent_tokens,
            )
    patch()

    if not args.ignore_chat_template and tokenizer.has_chat_template:
        messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        messages.append({"role": "user", "content": prompt})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    else:
        if args.system_prompt:
            print(
                "warning: --system-prompt ignored: the model has no chat template", file=sys.stderr
            )
        prompt = tokenizer.encode(prompt)

    sampler = make_sampler(args.temp, args.top_p)
    response = None
    for response in stream_generate(
        model, tokenizer, prompt, max_tokens=args.max_tokens, sampler=sampler, prompt_cache=cache
    ):
        print(response.text, end="", flush=True)
    print()
    if args.verbose and response is not None:
        print("=" * 10)
        print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec")
        print(
            f"Generation: {response.generation_tokens} tokens, "
            f"{response.generation_tps:.3f} tokens-per-sec"
        )
        print(f"Peak memory: {response.peak_memory:.3f} GB")
        print(kv_line(cache))


if __name__ == "__main__":
    main()
