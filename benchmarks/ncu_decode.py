"""One TQ4 decode-attention call at 131,072 keys (32/8 heads, D 128), for Nsight Compute:

    ncu --kernel-name regex:tq_decode --launch-skip 1 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section LaunchStats \
        python3 benchmarks/ncu_decode.py
"""

import mlx.core as mx

from mlx_tq import quantize, scaled_dot_product_attention

S, HKV, D = 131072, 8, 128
q = mx.random.normal((1, 32, 1, D)).astype(mx.float16)
offset = mx.zeros((1, HKV, 1, D))
k = quantize(mx.random.normal((1, HKV, S, D)), 4, 0, offset=offset, check_finite=False)
v = quantize(mx.random.normal((1, HKV, S, D)), 4, 1, check_finite=False)
mx.eval(k.data, v.data)
for _ in range(3):
    mx.eval(scaled_dot_product_attention(q, k, v, D**-0.5))
