#!/usr/bin/env bash
# Issue 18, item 3, on a GPU: the whole WikiText-2 test split in 2,048-token windows on
# Gemma-3-270M (float32, as the H100 whole-split tables): fp16 against the new presets (tq4, tq3:
# sliding-window layers with one more key bit) and the old ones (k4v4-s0.5, k3v3-s0.5: every
# layer K4/V4 or K3/V3, smoothed), all in one run so that fp16 runs once (5 caches x 144
# windows; the H100 took ~7 min for 4 caches). Run from the repository root with PYTHONPATH
# set; JSON goes to $OUT. MODEL / MLX_TQ_PPL_DATA override the model and the text.
set -euo pipefail
text=data/wikitext-2-raw/wiki.test.raw
data=${MLX_TQ_PPL_DATA:-$(ls "$(dirname "$0")"/{shared,../shared}/$text 2>/dev/null | head -1)}
python3 -m mlx_tq.perplexity --model "${MODEL:-gemma3-270m}" --dtype float32 --data "$data" \
  --num-windows 0 --window 2048 --kv-bits 4 3 --compare k4v4-s0.5 k3v3-s0.5 \
  --json "${OUT:-.}/gpu_gemma3-270m_ppl_all_2048_sliding_bits.json"
