"""A tiny mlx-lm model folder and `mlx_tq.server` in a subprocess, for the server tests."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import mlx.core as mx
import openai
from conftest import lively, tiny_model
from mlx.utils import tree_flatten
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<bos>", "<eos>", "<|user|>", "<|assistant|>"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Small prefill steps, so that prompts span several chunks; a warm-up of one chunk, so that
# caches quantise and freeze their statistics on the same tokens with and without reuse.
WARMUP = 16
SERVER_ARGS = ["--kv-bits", "4", "--prefill-step-size", "16", "--max-tokens", "12"]
SERVER_ARGS += ["--quantized-kv-start", str(WARMUP)]
STARTUP_S = 120
REQUEST_S = 60


def save_model(path, family="llama"):
    """Writes a tiny random mlx-lm model with a byte-level tokenizer and a chat template."""
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(SPECIAL)}, []))
    tok.add_tokens(sorted(pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(SPECIAL)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", chat_template=TEMPLATE
    ).save_pretrained(path)
    model = lively(tiny_model(family, vocab_size=tok.get_vocab_size()))
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config = {k: v for k, v in vars(model.args).items() if v is not None}
    (path / "config.json").write_text(json.dumps(config))
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m mlx_tq.server` on a free loopback port (model None: the default), started
    through `launch` (e.g. mlx.launch and its flags) if given."""

    def __init__(self, model, tmp, *args, launch=()):
        self.port = free_port()
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf"))
        # One BLAS thread: multithreaded OpenBLAS (0.3.21) rounds a product differently
        # with its shape, so a cached turn (the new tokens only) and an uncached one (the
        # whole conversation) moved a quantised key to another code (logprobs 2.6e-3 apart).
        env["OPENBLAS_NUM_THREADS"] = "1"
        cmd = [*launch, sys.executable, "-m", "mlx_tq.server"]
        cmd += ["--model", str(model)] if model else []
        # mlx.launch would take --host for its --hosts; 127.0.0.1 is the server's default.
        cmd += [] if launch else ["--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), *SERVER_ARGS, *args]
        self.log = open(tmp / f"server-{self.port}.log", "w")
        # A session of its own, so that stop() ends mlx.launch's ranks too.
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + STARTUP_S
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start: {open(self.log.name).read()}")
            time.sleep(0.5)
        self.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1",
            api_key="none",
            timeout=REQUEST_S,
            max_retries=0,
        )

    def healthy(self):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def post(self, path, body: bytes):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_S)
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()

    def stop(self):
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()
