"""Registers and SASS instruction counts of mlx_tq's CUDA kernels, offline (no GPU).

Builds a kernel as `mx.fast.cuda_kernel` would for one decode-step variant (the template
constants come from the dispatchers), compiles it with NVRTC for sm_90 (the H200) and
disassembles it, so a kernel change can be checked for registers (occupancy) and code size
before any device time is spent: a tile prefetch that looked free took the attention kernel
from 69 to 191-255 registers per thread (benchmarks/RESULTS.md, 2026-12-01).

    pip install nvidia-cuda-nvrtc nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm  # CUDA 13
    python benchmarks/kernel_sass.py decode_attention [--bits 4] [--head-dim 128] [--sass out.sass]

Needs the CUDA headers (cuda_fp16.h, cuda/std; `--cuda-include`, default
$CUDA_HOME/include or /usr/local/cuda/include). MLX's own device header is replaced by a
stand-in for its Shape and Strides types, so the code is MLX's but for that header.
"""

import argparse
import collections
import ctypes
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

import mlx.core as mx

from mlx_tq import attention, kernels, quant

CUDA_TYPES = kernels.TYPE_NAMES["cuda"]
STAND_IN = """#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda/std/array>
#include <cuda/std/cstdint>
#include <cuda/std/limits>
#define MAX_NDIM 10
using cuda::std::int32_t; using cuda::std::int64_t; using cuda::std::uint32_t;
using cuda::std::uint64_t;
namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, MAX_NDIM>;
using Strides = cuda::std::array<int64_t, MAX_NDIM>;
}
"""


def variant(name, dtype, D, bits, G=4, recent=4):
    """(template, inputs, outputs) of one decode-step launch, each input (name, C type)."""
    if name == "decode_attention":
        template = attention._decode_template(dtype, D, bits, bits, G, recent > 0, True, recent)[0]
    elif name == "decode_attention_mma":
        template = attention._mma_template(dtype, D, bits, recent > 0, True, recent)
    elif name == "decode_attention_mma_merge":
        template = attention._mma_template(dtype, D, bits, recent > 0, True, recent, False)
    elif name == "merge":
        template = attention.merge_template(dtype, D, recent, False)
    elif name == "quantize":
        template = quant.quantize_template(dtype, D, bits, bits, True, recent, 1)
    elif name == "merge_quantize":
        template = attention.merge_quantize_template(dtype, D, recent, bits, bits, True)
    else:
        raise SystemExit(
            f"unknown kernel {name!r}: choose decode_attention, decode_attention_mma, "
            "decode_attention_mma_merge, merge, quantize or merge_quantize"
        )
    types = {**CUDA_TYPES, None: CUDA_TYPES[dtype]}
    inputs, outputs = ([(arg, types[t]) for arg, t in x] for x in kernels.SIGNATURES[name])
    return template, inputs, outputs


def source(name, template, inputs, outputs):
    """The kernel's text as MLX's CUDA backend compiles it, its own device header replaced."""
    return STAND_IN + kernels.cuda_text(name, template, inputs, outputs)


def find(pattern, what):
    import nvidia

    for root in nvidia.__path__:
        hits = sorted(glob.glob(os.path.join(root, pattern)))
        if hits:
            return hits[-1]
    raise SystemExit(
        f"{what} not found: pip install nvidia-cuda-nvrtc nvidia-cuda-cuobjdump "
        "nvidia-cuda-nvdisasm"
    )


def compile_cubin(text, arch, include):
    nvrtc = ctypes.CDLL(find("cu*/lib/libnvrtc.so*", "libnvrtc"))
    prog = ctypes.c_void_p()
    nvrtc.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), b"k.cu", 0, None, None)
    opts = [f"--gpu-architecture={arch}", "-std=c++17", f"-I{include}", f"-I{include}/cccl"]
    opts = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
    status = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    if status != 0:
        raise SystemExit(f"NVRTC failed:\n{log.value.decode()}")
    nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    cubin = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetCUBIN(prog, cubin)
    return cubin.raw


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "kernel",
        help="decode_attention, decode_attention_mma, decode_attention_mma_merge, merge or "
        "quantize",
    )
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--bits", type=int, default=4, help="key and value bits")
    parser.add_argument("--recent", type=int, default=4, help="exact window (0: none)")
    parser.add_argument("--arch", default="sm_90")
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    parser.add_argument("--cuda-include", default=os.path.join(home, "include"))
    parser.add_argument("--sass", help="also write the disassembly here")
    args = parser.parse_args()
    dtype = getattr(mx, args.dtype)
    text = source(
        args.kernel, *variant(args.kernel, dtype, args.head_dim, args.bits, recent=args.recent)
    )
    cuobjdump = shutil.which("cuobjdump") or find("cu*/bin/cuobjdump", "cuobjdump")
    if not os.access(cuobjdump, os.X_OK):  # (the wheels install their tools without +x)
        raise SystemExit(f"chmod +x {os.path.dirname(cuobjdump)}/*: cuobjdump and nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compile_cubin(text, args.arch, args.cuda_include))
        usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True)
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True).stdout
    if args.sass:
        with open(args.sass, "w") as f:
            f.write(sass)
    ops = collections.Counter(
        m.group(2).split(".")[0]
        for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass)
    )
    print(
        f"{args.kernel} {args.dtype} D={args.head_dim} bits={args.bits} "
        f"recent={args.recent} ({args.arch})"
    )
    print(" ".join(re.findall(r"REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+", usage.stdout)))
    print(
        f"{sum(ops.values())} instructions:", ", ".join(f"{o} {n}" for o, n in ops.most_common(12))
    )


if __name__ == "__main__":
    sys.exit(main())
