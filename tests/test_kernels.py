import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_tq import attention, dequantize, kernels, quantize, scaled_dot_product_attention
from mlx_tq.attention import _decode_template, scaled_dot_product_attention_ops
from mlx_tq.codebook import SUPPORTED_BITS, SUPPORTED_DIMS
from mlx_tq.quant import (
    decode_rotated,
    decode_rotated_ops,
    dequantize_template,
    quantize_kv,
    quantize_kv_ops,
    quantize_template,
    words_per_row,
)

ROOT = Path(__file__).resolve().parent.parent
GPU = kernels.backend() is not None
FLOATS = (mx.float32, mx.float16, mx.bfloat16)
METAL_TYPES, CUDA_TYPES = kernels.TYPE_NAMES["metal"], kernels.TYPE_NAMES["cuda"]
# Elements of the inputs shorter than 8, which the Metal check passes in the constant address
# space (the others: device).
SMALL_INPUTS = {"scale": 1, "starts": 2}


def variants():
    """Every template the dispatchers build for the supported head dims and 2-4 bits."""
    for D in SUPPORTED_DIMS:
        for bits in SUPPORTED_BITS:
            for dtype in FLOATS:
                value_bits = SUPPORTED_BITS[-1 - SUPPORTED_BITS.index(bits)]
                scaled, window = dtype == mx.float32, 4 * (dtype == mx.float16)
                yield "quantize", quantize_template(dtype, D, bits, value_bits, scaled, window)
        for bits in (2, 3, 4, 5, 8):
            for value_bits in (2, 3, 4):
                for GL, causal, dtype in ((1, False, mx.float16), (32, True, mx.bfloat16)):
                    args = (dtype, D, bits, value_bits, GL, causal, causal, 4 * causal)
                    yield "decode_attention", _decode_template(*args)[0]
        for dtype, window, causal in zip(FLOATS, (0, 4, 16), (False, True, False), strict=True):
            pow2 = D & (D - 1) == 0
            template = [("T", dtype), ("D", D), ("POW2", pow2), ("RECENT", window > 0)]
            yield "merge", template + [("WINDOW", window), ("CAUSAL", causal), ("QUANT", False)]
            if window:  # a decode step's merge that quantises its token
                for bits in ((4, 3), (3, 3)):
                    yield (
                        "merge_quantize",
                        attention.merge_quantize_template(dtype, D, window, *bits, causal),
                    )
        for bits in SUPPORTED_BITS:
            for dtype, shift in ((mx.float16, 4), (mx.bfloat16, 0)):
                yield "dequantize", dequantize_template(dtype, D, bits, shift)


def metal_source(i, name, template):
    """The kernel as MLX's metal_kernel generates it (without the host_name attribute): the
    template constants are in the body (`kernels.program`), so no template parameters."""
    inputs, outputs = kernels.SIGNATURES[name]
    header, body = kernels.program(name, "metal", template)
    dtype = dict(template).get("T")
    params = []
    for arg, t in inputs:
        space = "constant" if SMALL_INPUTS.get(arg, 1024) < 8 else "device"
        params.append(f"const {space} {METAL_TYPES[t or dtype]}* {arg}")
        for suffix, ctype in (("shape", "int"), ("strides", "size_t")):
            if f"{arg}_{suffix}" in body:
                params.append(f"const constant {ctype}* {arg}_{suffix}")
    params += [f"device {METAL_TYPES[t or dtype]}* {arg}" for arg, t in outputs]
    for attr, ctype in (
        ("threadgroups_per_grid", "uint3"),
        ("simdgroup_index_in_threadgroup", "uint"),
        ("thread_index_in_simdgroup", "uint"),
        ("thread_index_in_threadgroup", "uint"),
        ("threadgroup_position_in_grid", "uint3"),
    ):
        if attr in body:
            params.append(f"{ctype} {attr}")
    return f"{header}void kernel_{i}(\n  " + ",\n  ".join(params) + f") {{\n{body}\n}}\n"


def cuda_source(i, name, template):
    """The kernel as MLX's cuda_kernel generates it (constants in the body, none passed)."""
    dtype = dict(template).get("T")
    typed = [[(arg, CUDA_TYPES[t or dtype]) for arg, t in x] for x in kernels.SIGNATURES[name]]
    return kernels.cuda_text(name, template, *typed, f"kernel_{i}")


CUDA_SHIM = """#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
#include <cuda/std/limits>
namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, 8>;
using Strides = cuda::std::array<int64_t, 8>;
}
"""


def test_template_constants_make_valid_kernel_names():
    """MLX's CUDA backend names each kernel after its template constants
    (custom_kernel.cpp: "_{int}", "_t"/"_f", "_{dtype}"): a negative int there is a
    compile error on the GPU only (found on the H200, 2026-12-01)."""
    for name, template in variants():
        for key, value in template:
            if isinstance(value, int) and not isinstance(value, bool):
                assert value >= 0, f"{name}: template constant {key}={value}"


@pytest.mark.skipif(shutil.which("clang++") is None, reason="needs clang++ (apt: clang)")
def test_metal_sources_compile(tmp_path):
    src = tmp_path / "kernels.cpp"
    src.write_text(
        '#include "metal_shim.h"\n'
        + "\n".join(metal_source(i, n, t) for i, (n, t) in enumerate(variants()))
    )
    cmd = ["clang++", "-fsyntax-only", "-x", "c++", "-std=c++17", "-Wall", "-Werror"]
    # (A variant may not use every constant, e.g. the dtype T: as in MLX's own CUDA source.)
    cmd += ["-Wno-unused-variable", "-Wno-unused-local-typedef", "-I", str(ROOT / "tests")]
    result = subprocess.run([*cmd, str(src)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_sources_compile(tmp_path):
    src = tmp_path / "kernels.cu"
    picked = list(variants())[::8]  # nvcc takes ~2 s a variant
    # The matrix units' kernel (CUDA only): 2-4 bits, aligned and mid-word lane segments.
    for D, bits, causal in ((128, 4, False), (128, 3, True), (64, 3, False), (112, 2, True)):
        template = attention._mma_template(mx.float16, D, bits, causal, causal, 4 * causal)
        picked.append(("decode_attention_mma", template))
        # (and merging in the same launch: recent window or none, pow2 D or not)
        template = attention._mma_template(mx.float16, D, bits, causal, causal, 4 * causal, False)
        picked.append(("decode_attention_mma_merge", template))
    src.write_text(CUDA_SHIM + "\n".join(cuda_source(i, n, t) for i, (n, t) in enumerate(picked)))
    cmd = ["nvcc", "-std=c++17", "-arch=sm_90", "--ptx", "-o", str(tmp_path / "k.ptx"), str(src)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


def test_wheel_ships_kernel_sources(tmp_path):
    cmd = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True)
    (wheel,) = tmp_path.glob("mlx_tq-*.whl")
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    sources = {p.name for p in (ROOT / "metal").iterdir() if p.suffix in (".metal", ".h")}
    shipped = {p.name for p in (tmp_path / "site" / "mlx_tq" / "metal").iterdir()}
    assert sources <= shipped
    # The loader reads them from the unpacked wheel, not from this checkout; CUDA sources
    # #include them from there.
    code = (
        "from mlx_tq import kernels; print(len(kernels.source('merge.metal'))); "
        "print(kernels.program('merge', 'cuda')[1].splitlines()[-1])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path / "site"), "PATH": ""},
    )
    assert out.returncode == 0, out.stderr
    size, include = out.stdout.splitlines()
    assert int(size) == len(kernels.source("merge.metal")) > 1000
    site = (tmp_path / "site" / "mlx_tq" / "metal" / "merge.metal").resolve()
    assert include == f'#include "{site}"'


def rows(shape, dtype, seed):
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(dtype)


@pytest.mark.parametrize("D", [64, 80, 128, 256])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_kv(D, bits):
    # (B, L, H, D) transposed to (B, H, L, D), as mlx-lm hands keys over.
    k = rows((2, 9, 3, D), mx.bfloat16, D + bits).swapaxes(1, 2)
    v = rows((2, 9, 3, D), mx.bfloat16, D - bits).swapaxes(1, 2)
    mu = rows((2, 3, 1, D), mx.float32, bits)
    s = mx.exp(rows((2, 3, 1, D), mx.float32, bits + 1))
    value_bits = 2 if bits > 2 else 4
    for offset, channel_scale in ((None, None), (mu, None), (mu, s)):
        got = quantize_kv(k, v, bits, value_bits, 0, offset, channel_scale)
        refs = (
            quantize(k, bits, offset=offset, channel_scale=channel_scale, check_finite=False),
            quantize(v, value_bits, check_finite=False),
        )
        for a, ref in zip(got, (r.data for r in refs), strict=True):
            assert a.shape == ref.shape and a.dtype == mx.uint32
            if not GPU:
                assert mx.array_equal(a, ref)
                continue
            # The kernel sums in another order: a coordinate on a midpoint may round either way.
            assert (np.array(a[..., :-1]) != np.array(ref[..., :-1])).mean() < 1e-3
            scales = (x[..., -1:].view(mx.float32) for x in (a, ref))
            assert mx.allclose(*scales, rtol=1e-5, atol=0)


def test_quantize_kv_ops_is_quantize():
    x = rows((4, 5, 128), mx.float16, 0)
    k, v = quantize_kv_ops(x, x * 2, 3, 4, seed=2)
    assert mx.array_equal(k, quantize(x, 3, seed=2).data)
    assert mx.array_equal(v, quantize(x * 2, 4, seed=2).data)


@pytest.mark.parametrize("S", [1, 127, 128, 129, 1000, 5000])
@pytest.mark.parametrize("G, L", [(1, 1), (4, 1), (8, 3), (4, 20)])
def test_attention_dispatch(S, G, L):
    L = min(L, S)
    q = rows((1, 2 * G, L, 128), mx.float16, S)
    # Views of a larger buffer, as a cache hands them over.
    # Smoothed keys (for odd S) and offset-free values, as the cache stores them.
    smooth = mx.exp(rows((1, 2, 1, 128), mx.float32, 3)) if S % 2 else None
    keys = quantize(rows((1, 2, S + 50, 128), mx.float16, S + 1), 4, channel_scale=smooth)
    keys = keys.tokens(0, S)
    values = quantize(rows((1, 2, S + 50, 128), mx.float16, S + 2), 3, 1)
    values = values.tokens(0, S)
    mask = "causal" if L > 1 else None
    out = scaled_dot_product_attention(q, keys, values, 0.1, mask)
    ref = scaled_dot_product_attention_ops(q, keys, values, 0.1, mask)
    assert out.shape == q.shape and out.dtype == q.dtype
    if not GPU:
        assert mx.array_equal(out, ref)
    else:  # both rounded to float16; L > 8 goes through float16 SDPA on decoded keys/values
        out, ref = out.astype(mx.float32), ref.astype(mx.float32)
        assert (mx.abs(out - ref).max() / mx.abs(ref).max()).item() < (2e-3 if L <= 8 else 6e-3)


@pytest.mark.parametrize("D", [64, 80, 128, 256])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_decode_rotated(D, bits):
    # A view of a larger buffer with an offset, as the prefill path decodes keys.
    offset = rows((2, 3, 1, D), mx.float32, bits)
    t = quantize(rows((2, 3, 40, D), mx.float16, D), bits, offset=offset).tokens(3, 37)
    for dtype, shift in ((mx.float16, 4), (mx.bfloat16, 0)):
        got = decode_rotated(t, dtype, shift)
        ref = decode_rotated_ops(t, dtype, shift)
        assert got.shape == t.shape and got.dtype == dtype
        if not GPU:
            assert mx.array_equal(got, ref)
        else:  # one rounding of dtype apart at most (fused multiply-add)
            got, ref = got.astype(mx.float32), ref.astype(mx.float32)
            assert mx.allclose(got, ref, rtol=2.0**-7, atol=0)
    # In the original space, with the offset added back: the dequantised vectors.
    from mlx_tq.rotation import unrotate

    back = unrotate(decode_rotated_ops(t, mx.float32, 0), t.seed) + offset
    assert mx.allclose(back, dequantize(t).astype(mx.float32), atol=2e-3, rtol=2e-3)


class RecordingKernel:
    """Stands in for a built kernel on the CPU: records each call, returns zeros."""

    calls = []

    def __init__(self, name, template):
        self.name, self.template = name, template

    @staticmethod
    def make(name, contiguous=True, template=()):
        return RecordingKernel(name, template)

    def __call__(self, inputs, grid, threadgroup, output_shapes, output_dtypes, **_):
        RecordingKernel.calls.append((self.name, inputs, dict(self.template), grid, threadgroup))
        return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes, strict=True)]


@pytest.mark.parametrize("mma", [False, True], ids=["cores", "mma"])
def test_split_count_fits_the_merge_kernel(mma, monkeypatch):
    """However many threadgroups the attention aims for, it makes no more splits than the
    merge kernel stages in threadgroup memory (merge.metal's MAX_SPLITS, the same number)."""
    import re

    merge = kernels.source("merge.metal")
    assert int(re.search(r"MAX_SPLITS=(\d+);", merge).group(1)) == attention.MAX_SPLITS
    monkeypatch.setattr(kernels, "backend", lambda: "cuda")
    monkeypatch.setattr(kernels, "kernel", RecordingKernel.make)
    monkeypatch.setattr(attention, "TARGET_GROUPS", 10**6)
    monkeypatch.setattr(attention, "MMA_TARGET_WARPS", 10**6)
    monkeypatch.setattr(attention, "MMA", mma)
    plan = attention._fused_plan.__wrapped__(
        mx.float16, 1, 4, 1, 1, 64, 4, 4, (0, 1), False, False, 0.125, 0
    )
    assert plan.splits(10**7) == attention.MAX_SPLITS
    # CUDA cores: one split per tile of 128 keys below the cap; matrix units: one split per
    # threadgroup of MMA_WARPS SIMD-groups, each over at least MMA_MIN_KEYS keys.
    assert plan.splits(300) == (1 if mma else 3)
    assert plan.splits(MMA_KEYS := attention.MMA_MIN_KEYS * attention.MMA_WARPS) == (
        1 if mma else MMA_KEYS // 128
    )
    assert plan.splits(MMA_KEYS + 1) == (2 if mma else MMA_KEYS // 128 + 1)


DISPATCH_SHAPE = dict(B=2, Hq=8, Hkv=2, D=128, S=300)


def stub_decode_step(monkeypatch, cache):
    """Fills `cache` with S tokens on the CPU path, then runs one decode step (quantise the
    new token, attend through mlx-lm's patched attention) with every kernel replaced by a
    `RecordingKernel`. Returns the
    query, the fetched keys and values and the output."""
    import mlx_lm.models.base as base

    from mlx_tq import patch, unpatch

    B, Hq, Hkv, D, S = DISPATCH_SHAPE.values()
    k0, v0 = rows((B, Hkv, S, D), mx.float16, 0), rows((B, Hkv, S, D), mx.float16, 1)
    patch()
    try:
        cache.update_and_fetch(k0, v0)
        monkeypatch.setattr(kernels, "backend", lambda: "cuda")
        monkeypatch.setattr(kernels, "kernel", RecordingKernel.make)
        RecordingKernel.calls.clear()
        new = rows((B, Hkv, 1, D), mx.float16, 2)
        keys, values = cache.update_and_fetch(new, new)
        q = rows((B, Hq, 1, D), mx.float16, 3)
        # As a model calls it: mlx-lm's function, patched, with the cache.
        out = base.scaled_dot_product_attention(q, keys, values, cache, scale=0.1, mask=None)
    finally:
        unpatch()
    return q, keys, values, out


def test_gpu_dispatch_arguments(monkeypatch):
    """What the GPU path hands the kernels, checked here with a recording stub: the decode
    step of a smoothed-key cache (values without offset, as the cache stores them)."""
    from mlx_tq.cache import TurboQuantKVCache

    B, Hq, Hkv, D, S = DISPATCH_SHAPE.values()
    cache = TurboQuantKVCache(4, 3, smooth_keys=0.5, warmup_tokens=0, recent_tokens=0)
    *_, out = stub_decode_step(monkeypatch, cache)
    assert out.shape == (B, Hq, 1, D) and out.dtype == mx.float16
    names = [c[0] for c in RecordingKernel.calls]
    assert names == ["quantize", "decode_attention", "merge"]  # K and V in one launch
    _, q_in, q_t, q_grid, _ = RecordingKernel.calls[0]
    # A decode step's few rows: one per threadgroup.
    assert q_t["SCALE"] and (q_t["KB"], q_t["VB"]) == (4, 3) and q_t["ROWS"] == 1
    assert (q_t["WK"], q_t["WV"]) == (words_per_row(D, 4) - 1, words_per_row(D, 3) - 1)
    assert mx.array_equal(q_in[7], cache.key_offset.reshape(-1, D))  # offset rows
    assert mx.array_equal(q_in[8], cache.key_scale.reshape(-1, D))  # scale rows
    assert q_grid[0] == 128 * 2 * B * Hkv  # key blocks, then as many value blocks
    _, a_in, a_t, a_grid, a_tg = RecordingKernel.calls[1]
    assert a_t["SMOOTH"] and a_t["POW2"] and not a_t["CAUSAL"] and (a_t["KB"], a_t["VB"]) == (4, 3)
    assert a_in[1].shape[2] == S + 1 and a_grid[1] == B * Hkv and a_tg == (a_t["TILE"], 1, 1)
    assert a_in[7] is cache.key_scale  # read in place with its strides, no copy
    _, m_in, m_t, _, _ = RecordingKernel.calls[2]
    assert m_t == {"T": mx.float16, "D": D, "POW2": True, "RECENT": False, "WINDOW": 0} | {
        "CAUSAL": False,
        "QUANT": False,
    }
    assert len(m_in) == 8


def test_gpu_dispatch_arguments_with_recent_window(monkeypatch):
    """A decode step over a cache holding its newest tokens exactly: the packed rows before
    the window are a view (no copy), the merge reads the window's rows and the key offset."""
    from mlx_tq.cache import TurboQuantKVCache

    B, Hq, Hkv, D, S = DISPATCH_SHAPE.values()
    cache = TurboQuantKVCache(4, 4, warmup_tokens=0, recent_tokens=4)
    q, keys, values, out = stub_decode_step(monkeypatch, cache)
    assert keys.recent.shape == (B, Hkv, 4, D) and keys.window == 4
    _, a_in, a_t, _, _ = RecordingKernel.calls[1]
    # The packed rows in place; the kernel leaves out the window's (j < S - E + i for i = 0).
    assert a_t["CAUSAL"] and a_t["TAIL"] == 4 and a_in[1].shape[2] == S + 1
    _, m_in, m_t, _, _ = RecordingKernel.calls[2]
    assert m_t["RECENT"] and m_t["WINDOW"] == 4 and m_in[3] is q
    assert m_in[4] is keys.recent is cache._window[0] and m_in[5] is values.recent
    assert m_in[6] is cache.key_offset


@pytest.mark.parametrize("recent", [0, 4], ids=["no-window", "window"])
def test_merging_launch_passes_the_signature_dtypes(recent, monkeypatch):
    """MLX's cuda_kernel declares each input with its array's dtype (not the signature's, which
    the offline compile checks use): an fp16 k_off made `d < D ? k_off[..] : 0.0f` ambiguous
    (__half or float), a compile error on the GPU only."""
    import functools

    from mlx_tq.cache import TurboQuantKVCache

    monkeypatch.setattr(attention, "MMA", True)
    monkeypatch.setattr(attention, "MMA_MERGE", True)
    plan = functools.cache(attention._fused_plan.__wrapped__)
    monkeypatch.setattr(attention, "_fused_plan", plan)
    cache = TurboQuantKVCache(4, 4, warmup_tokens=0, recent_tokens=recent)
    stub_decode_step(monkeypatch, cache)
    name, inputs, template, *_ = RecordingKernel.calls[1]
    assert name == "decode_attention_mma_merge" and len(RecordingKernel.calls) == 2
    for (arg, dtype), a in zip(kernels.SIGNATURES[name][0], inputs, strict=True):
        assert a.dtype == (dtype or template["T"]), (arg, a.dtype)


def test_each_variant_name_has_one_source():
    """Every variant the dispatchers build gets a name of its own: MLX 0.32.0's CUDA backend
    caches a compiled module by the kernel's name alone."""
    for kind in ("cuda", "metal"):
        sources = {}
        for name, template in variants():
            key = kernels.variant_name(f"tq_{name}", template)
            text = kernels.program(name, kind, tuple(template))
            assert sources.setdefault(key, text) == text, key


def test_included_sources_get_the_same_shapes_and_strides():
    """A CUDA kernel #includes its body (kernels.program), so MLX, which passes an input's
    shape, strides or ndim where the body's text names them, reads the names from a comment:
    it must find exactly what it finds in the body's text."""
    for name, (inputs, _) in kernels.SIGNATURES.items():
        _, body = kernels.program(name, "cuda", (("D", 128),))
        assert body.splitlines()[-1].startswith("#include"), body
        text = kernels.body(name)  # (all its parts)
        for arg, _ in inputs:
            for suffix in ("_shape", "_strides", "_ndim"):
                assert (arg + suffix in body) == (arg + suffix in text), (name, arg, suffix)


def test_minify_keeps_every_token_apart():
    text = (
        "// a comment line\n"
        "  int x = a - -b;  // trailing\n"
        "#define N (x)\n"
        "#define F(x, y) ((x) + (y))  \\\n"
        "  + +1\n"
        'asm("mov.b32 %0, %1;" : "=r"(y));\n'
        'return *p; a / *p; x < <y; s = "a // b";\n'
    )
    assert kernels.minify(text) == (
        "int x=a- -b;\n"
        "#define N (x)\n"
        "#define F(x, y) ((x)+(y)) \\\n"
        "+ +1\n"
        'asm("mov.b32 %0, %1;":"=r"(y));\n'
        'return*p;a/ *p;x< <y;s="a // b";\n'
    )


def test_minify_keeps_literals_numbers_and_block_comments():
    """What no kernel has yet but C allows: a /* */ comment holding `//` (or over lines), a
    character literal ' ', and a hex number ending in e before + or - (a pp-number runs on
    through e+: `0x1e-1` is one invalid token)."""
    text = (
        "float y = x /* see a // b */ + 1; /* two\n"
        "   lines */ char c = ' ';\n"
        "int z = 0x1e - 1 + 0xE + x;\n"
    )
    assert kernels.minify(text) == "float y=x+1;char c=' ';\nint z=0x1e -1+0xE +x;\n"


def test_template_constants_are_written_into_the_source():
    """A kernel variant carries its constants in its source (a call passes none) and keeps
    the name MLX's CUDA backend gave it from them, so that CUDA profiles read as before."""
    template = _decode_template(mx.float16, 128, 4, 4, 4, True, True, 4)[0]
    name = kernels.variant_name("tq_decode_attention", template)
    # (the name Nsight Compute showed for this variant, 2026-12-01)
    assert name == "tq_decode_attention_float16_t_128_4_4_16_16_128_4_t_t_t_4"
    header, body = kernels.program("decode_attention", "cuda", template)
    assert body.startswith("using T = __half;\nconstexpr int D = 128;\n")
    assert "constexpr bool CAUSAL = true;\n" in body and "constexpr int TAIL = 4;\n" in body
    _, metal = kernels.program("decode_attention", "metal", template)
    declared = "using T = half;\nconstexpr int D = 128;\n"
    assert declared in metal and metal.endswith(kernels.source("decode_attention.metal"))
