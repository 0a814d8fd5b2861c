"""How much per-channel smoothing (divide by std^0.5, multiply back) would cut the MSE of
Gemma-3-270M's values and keys before the rotation (issue 5, a screen, not a package option).

For a vector quantised after a rotation, the error is spread evenly over the rotated
coordinates and proportional to ||x / s||^2; multiplied back by s it becomes
(sum s_c^2 / D) * (sum var_c / s_c^2), minimised by s_c = std_c^0.5 at (sum std_c)^2 / D
against sum var_c without smoothing. Prints that ratio per layer for one 512-token window of
WikiText-2 test (keys and values centred per head first, as the cache centres keys).

    python benchmarks/value_smoothing.py
"""

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from mlx_tq.loading import load
from mlx_tq.perplexity import default_data_path


def main():
    model, tokenizer = load(None)[:2]
    text = default_data_path().read_text()[:20000]
    ids = [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)[:511]
    cache = make_prompt_cache(model)
    model(mx.array([ids]), cache=cache)
    for name in ("values", "keys"):
        ratios = []
        for c in cache:
            x = np.array(getattr(c, name)[..., : min(c.offset, 512), :].astype(mx.float32))[0]
            x = x - x.mean(1, keepdims=True)  # (H, S, D), centred per head and channel
            var = x.var(1)
            ratios.append(float((np.sqrt(var).sum(-1) ** 2 / (x.shape[-1] * var.sum(-1))).mean()))
        print(f"{name}: MSE with smoothing 0.5 / without, per layer:", np.round(ratios, 3))


if __name__ == "__main__":
    main()
