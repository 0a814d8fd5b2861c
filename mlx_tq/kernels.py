"""Builds the kernel bodies of `metal/` for Metal (`mx.fast.metal_kernel`) or CUDA
(`mx.fast.cuda_kernel`). Each body is written once in a small dialect (TID, LANE, WARP,
TGID, SHARED, BARRIER, WARP_SUM, ...) that a per-backend prelude defines."""

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


@cache
def source(name: str) -> str:
    """The code of `metal/<name>` from the installed package or a source checkout, without
    comment lines, blank lines and indentation: MLX copies a kernel's text into every call
    and hashes it at every launch, so a decode step pays for each byte (~35% fewer)."""
    try:
        root = resources.files("mlx_tq.metal")
    except ModuleNotFoundError:
        # mlx_tq imported from a source tree on PYTHONPATH: metal/ sits beside the package.
        root = Path(__file__).resolve().parent.parent / "metal"
    lines = (line.strip() for line in root.joinpath(name).read_text().splitlines())
    return "".join(f"{line}\n" for line in lines if line and not line.startswith("//"))


def program(name: str, kind: str) -> tuple[str, str]:
    """(header, body) of kernel `name` for backend `kind`."""
    prelude = source(f"prelude_{kind}.h") + source("common.h")
    body = source(f"{name}.metal")
    # MLX adds the Metal attributes named in the body to the signature, so the Metal
    # prelude goes in the body; CUDA device helpers must sit outside the kernel.
    return ("", prelude + body) if kind == "metal" else (prelude, body)


@cache
def kernel(name: str, inputs: tuple[str, ...], outputs: tuple[str, ...], contiguous: bool = True):
    """The kernel `name` for the current backend, built once."""
    kind = backend()
    header, body = program(name, kind)
    make = mx.fast.metal_kernel if kind == "metal" else mx.fast.cuda_kernel
    return make(
        name=f"tq_{name}",
        input_names=list(inputs),
        output_names=list(outputs),
        source=body,
        header=header,
        ensure_row_contiguous=contiguous,
    )
