"""Runs mlx_tq's kernel bodies on the CPU: each is compiled as C++20 with `emu_prelude.h`
(threads, barriers and SIMD-group exchanges emulated), so the kernels' logic is tested
where there is no GPU. `emulate()` makes `mlx_tq.kernels` hand these out.

Differences from a GPU, by design: every float input and output is float32 (T = float);
float inputs are copied to float32 (their strides describe that copy), integer ones (packed
rows) keep their strides unless the kernel asks for contiguous inputs; one threadgroup runs
at a time. Small sizes only (a threadgroup costs ~1 ms of thread start-up).
"""

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections import defaultdict
from functools import cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_tq import attention, kernels, quant

HERE = Path(__file__).resolve().parent
# MLX_TQ_EMULATOR_SANITIZE=1: kernels built with AddressSanitizer and UBSan, so a read past
# an input (which a GPU would not report either) aborts the test.
SANITIZE = os.environ.get("MLX_TQ_EMULATOR_SANITIZE") == "1"
FLAGS = ["-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"] if SANITIZE else []
BUILD = Path(tempfile.gettempdir()) / ("mlx_tq_emulator" + ("_asan" if SANITIZE else ""))
CTYPES = {mx.uint32: "uint32_t", mx.int32: "int32_t"}
# A C++20 compiler (tests/run.sh installs clang++ on Linux when missing).
COMPILER = shutil.which("g++") or shutil.which("clang++")


def _ctype(dtype):
    return CTYPES.get(dtype, "float")


def _npdtype(dtype):
    return {mx.uint32: np.uint32, mx.int32: np.int32}.get(dtype, np.float32)


def _source(name, inputs, outputs, in_dtypes, out_dtypes, template):
    body = kernels.body(name)
    # Every float dtype runs as float here.
    consts = kernels.constants(template, defaultdict(lambda: "float"))
    params = []
    for arg, dtype in zip(inputs, in_dtypes, strict=True):
        params += [f"const {_ctype(dtype)}* {arg}", f"const int* {arg}_shape"]
        params.append(f"const int64_t* {arg}_strides")
    params += [f"{_ctype(d)}* {arg}" for arg, d in zip(outputs, out_dtypes, strict=True)]
    # main(): argv = threads per group, groups x/y/z, then one file per input and output.
    loads = []
    call = []
    for i, dtype in enumerate(in_dtypes):
        loads.append(f"  auto a{i} = read<{_ctype(dtype)}>(argv[5 + {i}]);")
        call += [f"a{i}.data.data()", f"a{i}.shape.data()", f"a{i}.strides.data()"]
    n_in = len(inputs)
    for j, dtype in enumerate(out_dtypes):
        loads.append(f"  auto o{j} = read<{_ctype(dtype)}>(argv[5 + {n_in + j}]);")
        call.append(f"o{j}.data.data()")
    writes = "".join(f"  write(argv[5 + {n_in + j}], o{j});\n" for j in range(len(outputs)))
    return f"""#include "emu_prelude.h"
#include "common.h"
#include <fstream>
#include <thread>
#include <vector>
template <typename X> struct Arr {{ std::vector<int> shape; std::vector<int64_t> strides;
  std::vector<X> data; }};
template <typename X> Arr<X> read(const char* path) {{
  std::ifstream f(path, std::ios::binary); int nd; f.read((char*)&nd, 4); Arr<X> a;
  a.shape.resize(8); a.strides.resize(8); f.read((char*)a.shape.data(), 4 * nd);
  f.read((char*)a.strides.data(), 8 * nd); int64_t n; f.read((char*)&n, 8);
  a.data.resize(n); f.read((char*)a.data.data(), sizeof(X) * n); return a; }}
template <typename X> void write(const char* path, const Arr<X>& a) {{
  std::ofstream f(path, std::ios::binary); int nd = 0; f.write((char*)&nd, 4);
  f.write((const char*)a.data.data(), sizeof(X) * a.data.size()); }}
void kernel_fn({", ".join(params)}) {{
{consts}{body}
}}
int main(int argc, char** argv) {{
  const unsigned n = std::atoi(argv[1]);
  tq_ntg = {{unsigned(std::atoi(argv[2])), unsigned(std::atoi(argv[3])),
            unsigned(std::atoi(argv[4]))}};
{chr(10).join(loads)}
  std::barrier<> block(n);
  for (unsigned w = 0; w < (n + 31) / 32; ++w) tq_warps[w] = new std::barrier<>(32);
  tq_block = &block;
  std::vector<std::thread> threads;  // the group's threads, one threadgroup after another
  for (unsigned t = 0; t < n; ++t) threads.emplace_back([&, t] {{
    tq_tid = t;
    for (unsigned z = 0; z < tq_ntg.z; ++z) for (unsigned y = 0; y < tq_ntg.y; ++y)
      for (unsigned x = 0; x < tq_ntg.x; ++x) {{
        tq_tgid = {{x, y, z}};
        kernel_fn({", ".join(call)});
        block.arrive_and_wait();
      }}
  }});
  for (auto& th : threads) th.join();
{writes}  return 0;
}}
"""


def _binary(source: str) -> Path:
    package = Path(kernels.__file__).resolve().parent
    metal = next(p for p in (package / "metal", package.parent / "metal") if p.is_dir())
    # The headers it includes are part of the key: an edit to them builds anew.
    headers = (HERE / "emu_prelude.h").read_text() + (metal / "common.h").read_text()
    key = hashlib.sha256((source + headers).encode()).hexdigest()[:16]
    exe = BUILD / f"k_{key}"
    if not exe.exists():
        BUILD.mkdir(parents=True, exist_ok=True)
        src = BUILD / f"k_{key}.{os.getpid()}.cpp"
        src.write_text(source)
        cmd = [COMPILER, "-std=c++20", "-O1", *FLAGS, "-pthread", "-w", f"-I{HERE}", f"-I{metal}"]
        tmp = f"{exe}.{os.getpid()}.tmp"  # renamed into place: parallel runs never see half
        subprocess.run(cmd + ["-o", tmp, str(src)], check=True, capture_output=True)
        Path(tmp).rename(exe)
    return exe


def _write(path, a: np.ndarray):
    """ndim, shape, strides (elements), then the elements from the first to the last the
    strides reach: a view keeps its layout."""
    strides = [s // a.itemsize for s in a.strides]
    if a.size == 0 or min(strides) < 0 or any(s % a.itemsize for s in a.strides):
        a = np.ascontiguousarray(a)
        strides = [s // a.itemsize for s in a.strides]
    span = 1 + sum((n - 1) * s for n, s in zip(a.shape, strides, strict=True)) if a.size else 0
    with open(path, "wb") as f:
        f.write(np.int32(a.ndim).tobytes())
        f.write(np.array(a.shape, np.int32).tobytes())
        f.write(np.array(strides, np.int64).tobytes())
        f.write(np.int64(span).tobytes())
        f.write(np.lib.stride_tricks.as_strided(a, (span,), (a.itemsize,)).tobytes())


def kernel(name, contiguous=True, template=()):
    """A stand-in for `mlx_tq.kernels.kernel(name, ...)` that runs on the CPU."""

    def call(inputs: list, grid, threadgroup, output_shapes, output_dtypes, **_):
        arrays = [
            np.array(a.astype(mx.float32)) if a.dtype not in CTYPES else np.asarray(memoryview(a))
            for a in inputs
        ]
        if contiguous:  # as MLX copies them for a kernel that asks for row-contiguous inputs
            arrays = [np.ascontiguousarray(a) for a in arrays]
        in_dtypes = [a.dtype for a in inputs]
        src = _source(name, call.inputs, call.outputs, in_dtypes, output_dtypes, template)
        exe = _binary(src)
        n = threadgroup[0] * threadgroup[1] * threadgroup[2]
        groups = [g // t for g, t in zip(grid, threadgroup, strict=True)]
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for i, a in enumerate(arrays):
                paths.append(f"{tmp}/in{i}")
                _write(paths[-1], a)
            for j, (shape, dtype) in enumerate(zip(output_shapes, output_dtypes, strict=True)):
                paths.append(f"{tmp}/out{j}")
                _write(paths[-1], np.zeros(shape, _npdtype(dtype)))
            # (ASan must be the first library loaded: no LD_PRELOAD for the kernel's process.)
            env = {k: v for k, v in os.environ.items() if not (SANITIZE and k == "LD_PRELOAD")}
            cmd = [str(exe), str(n), *map(str, groups), *paths]
            subprocess.run(cmd, check=True, timeout=600, env=env)
            outs = []
            for j, (shape, dtype) in enumerate(zip(output_shapes, output_dtypes, strict=True)):
                raw = np.fromfile(paths[len(arrays) + j], np.uint8)[4:]
                outs.append(mx.array(raw.view(_npdtype(dtype)).reshape(shape)).astype(dtype))
        return outs

    call.inputs, call.outputs = ([arg for arg, _ in x] for x in kernels.SIGNATURES[name])
    return call


def emulate(monkeypatch):
    """Makes mlx_tq dispatch its kernels (as on CUDA) to the CPU emulation. The dispatchers'
    cached plans hold kernel objects: they get fresh caches for the test, so that neither
    side's kernels leak into the other's (a GPU run may hold both)."""
    monkeypatch.setattr(kernels, "backend", lambda: "cuda")
    monkeypatch.setattr(kernels, "kernel", kernel)
    for module, name in ((attention, "_fused_plan"), (quant, "_quantize_call")):
        monkeypatch.setattr(module, name, cache(getattr(module, name).__wrapped__))
