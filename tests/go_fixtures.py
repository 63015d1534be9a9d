"""Fixtures for the Go engine tests: a SentencePiece vocab trained on the spot and
small random llama GGUFs written with gguf-py (the same files llama.cpp reads)."""
from __future__ import annotations

import http.client
import json
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np

import gguf
import native

GO_DIR = Path(__file__).resolve().parents[1] / "go"


def go_bin() -> str:
    go = shutil.which("go")
    assert go, "the Go toolchain is required: run `bash scripts/setup.sh test`"
    return go


def build_engine(out_dir: Path) -> Path:
    """`go build` of the engine into out_dir/nanollama."""
    out = Path(out_dir) / "nanollama"
    subprocess.run([go_bin(), "build", "-o", str(out), "."], cwd=GO_DIR, check=True)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The engine's HTTP server on a free 127.0.0.1 port, returned once /health answers 200."""

    def __init__(self, engine: Path, model: Path, *args: str):
        self.model = model
        self.port = free_port()
        self.proc = subprocess.Popen(
            [str(engine), "--model", str(model), "--serve", "--host", "127.0.0.1", "--port", str(self.port), *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(100):  # up to ~10 s
            if self.proc.poll() is not None:
                raise AssertionError(native.exit_failure("the Go engine's server", model, self.proc.returncode,
                                                         self.proc.stderr.read().decode()) or "server exited")
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.close()
        raise AssertionError("server did not come up")

    def request(self, method, path, body=None, headers=None, timeout=30):
        """(status, headers, body bytes) of one JSON request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers={"Content-Type": "application/json", **(headers or {})})
            r = conn.getresponse()
            return r.status, dict(r.getheaders()), r.read()
        finally:
            conn.close()

    def open_stream(self, body, headers=None):
        """Starts a streamed request and returns the connection once the first
        token has arrived (so the request holds its session)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                     headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        assert r.status == 200
        assert r.read1(65536).startswith(b"data: ")
        return conn, r

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


# The vocab is trained on text with spaces, digits, punctuation and some
# non-ASCII so that merges, byte fallback and the space prefix all matter.
WORDS = ("the a of and to in is was for on with as by at from that this it be are "
         "model token layer weight train data value small large quick brown fox jumps "
         "over lazy dog river mountain cloud light music number")
EXTRA = ["café", "naïve", "über", "Straße", "日本語", "привет", "3.14", "2026", "(x)", "a-b", "!?"]


def sp_corpus(n_lines: int = 1200, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = WORDS.split()
    lines = []
    for _ in range(n_lines):
        k = rng.randint(4, 14)
        toks = [rng.choice(words) if rng.random() < 0.85 else rng.choice(EXTRA) for _ in range(k)]
        if rng.random() < 0.3:
            toks.append(str(rng.randint(0, 99999)))
        line = " ".join(toks)
        line = line[0].upper() + line[1:] + rng.choice([".", ",", "!", "?", ";", ":"])
        lines.append(line)
    return "\n".join(lines) + "\n"


def train_sp(workdir: Path, vocab_size: int = 600):
    """Trains a SentencePiece BPE model like nanollama's (byte fallback, identity
    normalisation, ids unk 0 / <s> 1 / </s> 2) and returns the processor."""
    import sentencepiece as spm

    workdir.mkdir(parents=True, exist_ok=True)
    corpus = workdir / "corpus.txt"
    corpus.write_text(sp_corpus(), encoding="utf-8")
    prefix = workdir / "sp"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=str(prefix) + ".model")


def sp_vocab(sp):
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            t = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            t = gguf.TokenType.CONTROL
        elif sp.is_byte(i):
            t = gguf.TokenType.BYTE
        elif sp.is_unused(i):
            t = gguf.TokenType.UNUSED
        else:
            t = gguf.TokenType.NORMAL
        types.append(int(t))
    return tokens, scores, types


def random_params(*, vocab: int, dim: int = 256, n_layer: int = 2, n_head: int = 4, n_kv: int = 2,
                  head_dim: int = 64, ffn: int = 512, tied: bool = False, seed: int = 0) -> dict:
    """Random weights by GGUF tensor name, numpy [out, in] layout."""
    rng = np.random.default_rng(seed)

    def mat(rows, cols, scale=1.0):
        return (rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    p = {"token_embd.weight": rng.standard_normal((vocab, dim)).astype(np.float32),
         "output_norm.weight": norm(dim)}
    if not tied:
        p["output.weight"] = mat(vocab, dim, 2.0)
    for i in range(n_layer):
        b = f"blk.{i}."
        p[b + "attn_norm.weight"] = norm(dim)
        p[b + "attn_q.weight"] = mat(n_head * head_dim, dim)
        p[b + "attn_k.weight"] = mat(n_kv * head_dim, dim)
        p[b + "attn_v.weight"] = mat(n_kv * head_dim, dim)
        p[b + "attn_output.weight"] = mat(dim, n_head * head_dim)
        p[b + "ffn_norm.weight"] = norm(dim)
        p[b + "ffn_gate.weight"] = mat(ffn, dim)
        p[b + "ffn_up.weight"] = mat(ffn, dim)
        p[b + "ffn_down.weight"] = mat(dim, ffn)
    return p


def write_model(path: Path, params: dict, vocab=None, *, qtype=gguf.GGMLQuantizationType.F32,
                n_head: int = 4, n_kv: int = 2, ctx: int = 512, rope_base: float = 10000.0,
                raw: dict | None = None, tokenizer: bool = True, metadata: dict | None = None) -> Path:
    """Writes a llama GGUF. Matrices are stored as qtype (norms stay F32);
    `raw` maps names to (bytes uint8 array, GGMLQuantizationType) written as is;
    `metadata` adds keys (str values as strings, int values as uint32)."""
    dim = params["token_embd.weight"].shape[1]
    n_layer = sum(1 for k in params if k.endswith("attn_q.weight"))
    ffn = params["blk.0.ffn_gate.weight"].shape[0]
    head_dim = params["blk.0.attn_q.weight"].shape[0] // n_head
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("go-engine-test")
    w.add_context_length(ctx)
    w.add_embedding_length(dim)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(rope_base)
    if tokenizer and vocab is not None:
        tokens, scores, types = vocab
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
    for key, value in (metadata or {}).items():
        (w.add_string if isinstance(value, str) else w.add_uint32)(key, value)
    raw = raw or {}
    for name, arr in params.items():
        if name in raw:
            data, t = raw[name]
            w.add_tensor(name, data, raw_dtype=t)
        elif arr.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, arr.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_kquant_blocks(rows: int, cols: int, qtype, rng) -> np.ndarray:
    """Random bytes for a K-quant tensor with sane fp16 scales (so the weights
    are finite and of order 1/sqrt(cols))."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    nb = rows * cols // block
    b = rng.integers(0, 256, size=(nb, size), dtype=np.uint8)
    scale = 1.0 / np.sqrt(cols)
    if qtype == gguf.GGMLQuantizationType.Q6_K:
        b[:, 208:210] = np.full(nb, scale / 32 / 64, np.float16).view(np.uint8).reshape(nb, 2)
        b[:, 192:208] = rng.integers(-64, 64, size=(nb, 16), dtype=np.int8).view(np.uint8)
    else:  # Q4_K, Q5_K: d, dmin
        b[:, 0:2] = np.full(nb, scale / 16 / 32, np.float16).view(np.uint8).reshape(nb, 2)
        b[:, 2:4] = np.full(nb, scale / 64, np.float16).view(np.uint8).reshape(nb, 2)
    return b.reshape(rows, cols // block * size)
