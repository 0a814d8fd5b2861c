"""TQ4 decode-attention calls at S keys (default 131,072; 32/8 heads, D 128), for Nsight
Compute. Launch statistics:

    ncu --kernel-name regex:tq_decode --launch-skip 1 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section LaunchStats \
        python3 benchmarks/ncu_decode.py [--keys S]

Stalls per SASS instruction (`benchmarks/ncu_stalls.py` sums them):

    ncu --cache-control none -k regex:tq_decode --launch-skip 2 --launch-count 1 \
        --section SourceCounters --section WarpStateStats -o attn \
        python3 benchmarks/ncu_decode.py --keys 8192
    ncu --import attn.ncu-rep --page source --csv --print-source sass | gzip > attn.csv.gz
"""

import argparse

import mlx.core as mx

from mlx_tq import quantize, scaled_dot_product_attention

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--keys", type=int, default=131072)
S, HKV, D = parser.parse_args().keys, 8, 128
q = mx.random.normal((1, 32, 1, D)).astype(mx.float16)
offset = mx.random.normal((1, HKV, 1, D))
# Views of a longer buffer, as a cache hands its rows over.
k = quantize(mx.random.normal((1, HKV, S + 256, D)), 4, 0, offset=offset, check_finite=False)
v = quantize(mx.random.normal((1, HKV, S + 256, D)), 4, 1, check_finite=False)
mx.eval(k.data, v.data)
k, v = k.tokens(0, S), v.tokens(0, S)
for _ in range(4):
    mx.eval(scaled_dot_product_attention(q, k, v, D**-0.5))
