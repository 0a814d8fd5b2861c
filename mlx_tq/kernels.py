"""Builds the kernel bodies of `metal/` for Metal (`mx.fast.metal_kernel`) or CUDA
(`mx.fast.cuda_kernel`). Each body is written once in a small dialect (TID, LANE, WARP,
TGID, SHARED, BARRIER, WARP_SUM, ...) that a per-backend prelude defines."""

import hashlib
import re
from functools import cache
from importlib import resources
from pathlib import Path

import mlx.core as mx


def backend() -> str | None:
    """'metal' or 'cuda' when the default device is a GPU that runs custom kernels, else None."""
    return _gpu_backend() if mx.default_device() == mx.gpu else None


@cache
def _gpu_backend() -> str | None:
    if mx.metal.is_available():
        return "metal"
    return "cuda" if mx.cuda.is_available() else None


def _root():
    try:
        return resources.files("mlx_tq.metal")
    except ModuleNotFoundError:
        # mlx_tq imported from a source tree on PYTHONPATH: metal/ sits beside the package.
        return Path(__file__).resolve().parent.parent / "metal"


@cache
def source(name: str) -> str:
    """The code of `metal/<name>` from the installed package or a source checkout, minified
    (`minify`): MLX copies a kernel's whole text (header and body) into every call and
    hashes it at every launch, so a decode step pays for each byte."""
    return minify(_root().joinpath(name).read_text())


@cache
def include_path(name: str) -> str | None:
    """The absolute path of `metal/<name>` as a CUDA `#include` can name it, or None (not a
    plain file, e.g. inside a zip, or a path with a quote, backslash or line break)."""
    path = _root().joinpath(name)
    if not isinstance(path, Path) or not path.is_file():
        return None
    text = str(path.resolve())
    return None if set(text) & set('"\\\n') else text


# Source text: string and character literals, // comments, identifier or number runs,
# whitespace, or any other character (punctuation).
_TOKENS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|//.*|[A-Za-z0-9_.]+|\s+|.')
# /* */ comments (each one space, as in C), not inside a literal or a // comment.
_BLOCK = re.compile(r'"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'|//[^\n]*|/\*.*?\*/', re.S)
_WORD = re.compile(r"[A-Za-z0-9_]")
# Punctuation that may fuse with a neighbour into another token (a - -b, a / *p, x < <y).
_FUSES = set("+-*/%<>=!&|^:.#?~")


def minify(text: str) -> str:
    """C/C++/Metal source without comments, blank lines, indentation and the spaces that no
    token needs (kept: inside string literals, between two identifier characters, between
    punctuation that could fuse, and after a #define's name). Lines stay lines, so that
    preprocessor directives and backslash continuations keep their meaning."""
    lines = []
    text = _BLOCK.sub(lambda m: " " if m.group().startswith("/*") else m.group(), text)
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#define"):  # `#define F(x) y` and `#define N (x)` differ
            head = re.match(r"#define\s+\w+(\([^)]*\))?", line).group(0)
            lines.append(f"{head} {_squeeze(line[len(head) :])}".rstrip())
        elif line.startswith("#"):
            lines.append(line)
        else:
            lines.append(_squeeze(line))
    return "".join(f"{line}\n" for line in lines if line)


def _squeeze(line: str) -> str:
    out = []
    for token in _TOKENS.findall(line):
        if token.startswith("//"):
            break  # (a continued line's backslash is not inside a comment here)
        if token.isspace():
            out.append(" ")
        else:
            out.append(token)
    text = []
    for i, token in enumerate(out):
        if token == " ":
            prev = text[-1][-1] if text and text[-1] != " " else ""
            nxt = out[i + 1][0] if i + 1 < len(out) else ""
            word = _WORD.match(prev) and _WORD.match(nxt)
            # (a number runs on through e+, e-, p+, p-: `0x1e - 1` is not `0x1e-1`)
            exponent = prev in "eEpP" and nxt in "+-" and re.match(r"\.?\d", text[-1])
            if not (word or exponent or (prev in _FUSES and nxt in _FUSES)) or not prev or not nxt:
                continue
        text.append(token)
    line = "".join(text).strip()
    # A continued line joins the next one where the backslash was: one space keeps two
    # tokens apart (`return \` + `x`, `a -\` + `-b`).
    return f"{line[:-1].rstrip()} \\" if line.endswith("\\") else line


# A dtype's name in each backend's kernel source (CUDA: as MLX's dtype_to_cuda_type writes
# it; Metal: its native types).
_INTS = {mx.uint32: "uint32_t", mx.int32: "int32_t"}
TYPE_NAMES = {
    "metal": {mx.float16: "half", mx.bfloat16: "bfloat16_t", mx.float32: "float", **_INTS},
    "cuda": {mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.float32: "float", **_INTS},
}


# Each kernel's inputs and outputs, (name, dtype) in the order its dispatcher passes them;
# None: the template dtype T (the queries', keys' or values' dtype).
SIGNATURES = {
    "quantize": (
        (("k", None), ("v", None), ("rt", mx.float32), ("k_levels", mx.float32))
        + (("k_bounds", mx.float32), ("v_levels", mx.float32), ("v_bounds", mx.float32))
        + (("offset", mx.float32), ("scale", mx.float32), ("k_win", None), ("v_win", None)),
        (("k_out", mx.uint32), ("v_out", mx.uint32), ("k_win_out", None), ("v_win_out", None)),
    ),
    "decode_attention": (
        (("q", None), ("k", mx.uint32), ("v", mx.uint32), ("rt", mx.float32))
        + (("scale", mx.float32), ("k_levels", mx.float32), ("v_levels", mx.float32))
        + (("qscale", mx.float32), ("starts", mx.int32)),
        (("o", mx.float32), ("ml", mx.float32)),
    ),
    "merge": (
        (("o", mx.float32), ("ml", mx.float32), ("rt_t", mx.float32), ("q", None))
        + (("kr", None), ("vr", None), ("k_off", mx.float32), ("scale", mx.float32)),
        (("out", None),),
    ),
    "dequantize": ((("data", mx.uint32), ("levels", mx.float32)), (("out", None),)),
}


# The same launch on the matrix units (CUDA only), and that launch also merging the splits.
SIGNATURES["decode_attention_mma"] = SIGNATURES["decode_attention"]
SIGNATURES["decode_attention_mma_merge"] = (
    SIGNATURES["decode_attention"][0]
    + (("rt_t", mx.float32), ("kr", None), ("vr", None), ("k_off", mx.float32))
    + (("counters", mx.int32),),
    SIGNATURES["decode_attention"][1] + (("out", None),),
)
# The merge launch that also quantises a decode step's token (merge_quantize.metal).
SIGNATURES["merge_quantize"] = (
    (("o", mx.float32), ("ml", mx.float32), ("q", None), ("kr", None), ("vr", None))
    + (("k_off", mx.float32), ("k_new", None), ("v_new", None), ("qc", mx.float32))
    + (("qscale", mx.float32),),
    (("out", None),) + SIGNATURES["quantize"][1],
)
# A kernel's body: the files of metal/ it is made of, in order (else `<name>.metal`).
# merge_quantize runs quantize.metal's code in a block (merge_quantize.metal opens it,
# merge_quantize_end.metal closes it), then merge.metal's.
PARTS = {
    "decode_attention_mma_merge": (
        "decode_attention_mma.metal",
        "decode_attention_mma_merge.metal",
    ),
    "quantize": ("quantize_shared.metal", "quantize.metal"),
    "merge_quantize": (
        "quantize_shared.metal",
        "merge_quantize.metal",
        "quantize.metal",
        "merge_quantize_end.metal",
        "merge.metal",
    ),
}


def parts(name: str) -> tuple[str, ...]:
    return PARTS.get(name, (f"{name}.metal",))


def body(name: str) -> str:
    """The minified text of kernel `name`'s body (its `parts`)."""
    return "".join(source(p) for p in parts(name))


def constants(template, types: dict) -> str:
    """Source lines that declare a kernel's template constants: (name, value) pairs, the
    value an mx.Dtype (written as `types[value]`), a bool or an int >= 0."""
    lines = []
    for key, value in template:
        if isinstance(value, mx.Dtype):
            lines.append(f"using {key} = {types[value]};")
        elif isinstance(value, bool):
            lines.append(f"constexpr bool {key} = {'true' if value else 'false'};")
        else:
            lines.append(f"constexpr int {key} = {int(value)};")
    return "".join(f"{line}\n" for line in lines)


def variant_name(name: str, template) -> str:
    """MLX's CUDA name for kernel `name` with `template` (custom_kernel.cpp's
    template_arguments_hash), so that CUDA profiles name each variant as before (Metal's
    wrote bools as 1 / 0); unique per variant, which MLX 0.32.0 needs (it caches a compiled
    CUDA module by name)."""
    dtypes = {mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.float32: "float"}
    parts = [
        dtypes[v] if isinstance(v, mx.Dtype) else ("t" if v else "f") if isinstance(v, bool)
        else str(int(v))
        for _, v in template
    ]  # fmt: skip
    return "".join(f"_{p}" for p in [name, *parts])[1:]


def program(name: str, kind: str, template=()) -> tuple[str, str]:
    """(header, body) of kernel `name` for backend `kind`, its template constants declared
    at the top of the body. CUDA: the prelude, common.h and the body are `#include`d from
    their files where `include_path` names them (NVRTC reads them once, at compile time):
    MLX copies a kernel's text into every call and hashes it at every launch, ~0.3-0.4 us
    per KB a call on the H200's host (benchmarks/RESULTS.md), ~12 KB of text a kernel."""
    files = [f"prelude_{kind}.h", "common.h", *parts(name)]
    paths = [include_path(p) for p in files] if kind == "cuda" else [None]
    declared = constants(template, TYPE_NAMES[kind])
    if all(paths):
        # MLX passes an input's shape, strides or ndim where the body's text names them;
        # the digest keeps the text (MLX's cache key) apart for other file contents.
        names = sorted(set(re.findall(r"\b\w+_(?:shape|strides|ndim)\b", body(name))))
        digest = hashlib.sha1("".join(source(p) for p in files).encode()).hexdigest()[:16]
        include = "".join(f'#include "{path}"\n' for path in paths[2:])
        header = "".join(f'#include "{path}"\n' for path in paths[:2])
        return header, f"{declared}// {' '.join(names)} {digest}\n{include}"
    prelude = source(f"prelude_{kind}.h") + source("common.h")
    text = declared + body(name)
    # MLX adds the Metal attributes named in the body to the signature, so the Metal
    # prelude goes in the body; CUDA device helpers must sit outside the kernel.
    return ("", prelude + text) if kind == "metal" else (prelude, text)


def cuda_text(name: str, template, inputs, outputs, function: str = "kernel") -> str:
    """The CUDA function MLX's `cuda_kernel` compiles for kernel `name` with `template`
    (custom_kernel.cpp's build_kernel, without MLX's default header), for offline checks
    (the tests, benchmarks/kernel_sass.py): inputs and outputs as (name, C type) pairs."""
    header, body = program(name, "cuda", template)
    params = []
    for arg, ctype in inputs:
        params.append(f"const {ctype}* {arg}")
        for suffix, kind in (("shape", "Shape"), ("strides", "Strides")):
            if f"{arg}_{suffix}" in body:
                params.append(f"const __grid_constant__ {kind} {arg}_{suffix}")
    params += [f"{ctype}* {arg}" for arg, ctype in outputs]
    return (
        f"{header}\nnamespace mlx::core::cu {{\n__global__ void {function}(\n    "
        + ",\n    ".join(params)
        + f") {{\n{body}\n}}\n}}\n"
    )


@cache
def kernel(name: str, contiguous: bool = True, template: tuple = ()):
    """The kernel `name` for the current backend (its inputs and outputs: `SIGNATURES`) with
    the template constants `template` ((name, value) pairs; see `constants`), built once per
    variant. The constants are written
    into its source, so a call passes none: MLX formats and hashes each template constant at
    every call (+3-4 us of host time a call for 10 more on the H200's host, 2026-12-01)."""
    kind = backend()
    header, body = program(name, kind, template)
    inputs, outputs = SIGNATURES[name]
    make = mx.fast.metal_kernel if kind == "metal" else mx.fast.cuda_kernel
    return make(
        name=variant_name(f"tq_{name}", template),
        input_names=[arg for arg, _ in inputs],
        output_names=[arg for arg, _ in outputs],
        source=body,
        header=header,
        ensure_row_contiguous=contiguous,
    )
