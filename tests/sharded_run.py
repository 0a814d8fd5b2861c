"""Run by test_sharded.py under `mlx.launch --backend ring -n 2`: a tiny llama, greedy with
TurboQuant caches, unsharded and then tensor-parallel (`model.shard`); rank 0 writes both."""

import json
import sys

import mlx.core as mx
from conftest import lively, tiny_model
from mlx_lm.generate import BatchGenerator, generate_step

import mlx_tq

PROMPTS = [[5, 17, 99, 3, 42, 8, 61, 77, 12, 30, 9, 100, 4, 66, 23, 1, 88], [7, 2, 50, 11]]
MAX_TOKENS = 8
WARMUP = 8  # both prompts reach it: the caches quantise
# Batch caches hold no exact recent window (docs/limits.md): the lone runs hold none either.
OPTIONS = dict(warmup_tokens=WARMUP, recent_tokens=0)


def run(model):
    alone = []
    for p in PROMPTS:
        cache = mlx_tq.make_prompt_cache(model, **OPTIONS)
        out = generate_step(mx.array(p), model, max_tokens=MAX_TOKENS, prompt_cache=cache)
        alone.append([(int(t), lp[t].item()) for t, lp in out])
    gen = BatchGenerator(model, max_tokens=MAX_TOKENS)
    uids = gen.insert(PROMPTS, caches=[mlx_tq.make_prompt_cache(model, **OPTIONS) for _ in PROMPTS])
    batched = {u: [] for u in uids}
    for _ in range(4 * MAX_TOKENS):
        for r in gen.next_generated():
            batched[r.uid].append(r.token)
    gen.close()
    return {"alone": alone, "batched": [batched[u] for u in uids]}


group = mx.distributed.init()
mlx_tq.patch()
model = lively(tiny_model("llama"))
result = {"single": run(model)}
model.shard(group)
result["sharded"] = run(model)
result["kv_heads"] = model.model.layers[0].self_attn.n_kv_heads
if group.rank() == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(dict(result, size=group.size()), f)
