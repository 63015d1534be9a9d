"""The Go engine (go/) against llama.cpp on GGUF files written here with gguf-py:
logits for every position, greedy generation, tokenizer ids, the HTTP server,
gamma / LoRA personalities and clear failures on bad input.

llama.cpp (from llama-cpp-python) and the Go binary run in child processes (tests/native.py): a
native crash is one failed test naming the file, its tensor types and the signal."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gguf

sys.path.insert(0, str(Path(__file__).parent))
import go_fixtures as F  # noqa: E402
import native  # noqa: E402
import quant_error  # noqa: E402

Q = gguf.GGMLQuantizationType

PROMPT = ("The quick brown fox jumps over the lazy dog 12345 times! Café, naïve über 日本語; "
          "привет 🦊 (x) a-b 3.14 -- the model's weights: 0.5, 1e-3 & 42%. ")


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    return F.build_engine(tmp_path_factory.mktemp("gobin"))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("goengine")


@pytest.fixture(scope="module")
def sp(work):
    return F.train_sp(work / "sp")


@pytest.fixture(scope="module")
def vocab(sp):
    return F.sp_vocab(sp)


@pytest.fixture(scope="module")
def params(vocab):
    return F.random_params(vocab=len(vocab[0]), dim=256, n_layer=2, n_head=4, n_kv=2, head_dim=64,
                           ffn=512, seed=1)


@pytest.fixture(scope="module")
def f32_model(work, params, vocab) -> Path:
    return F.write_model(work / "f32.gguf", params, vocab)


@pytest.fixture(scope="module")
def prompt_ids(f32_model):
    [ids] = native.llama_cpp_tokenize(f32_model, [PROMPT])
    assert len(ids) >= 64
    return ids


def run(engine, *args, input=None, check=True, timeout=120):
    return native.run_go(engine, *args, input=input, check=check, timeout=timeout)


def go_logits(engine, model, ids, tmp: Path, *extra) -> np.ndarray:
    np.save(tmp / "ids.npy", np.asarray(ids, np.int32))
    run(engine, "--model", model, "--tokens", tmp / "ids.npy", "--dump-logits", tmp / "out.npy", *extra)
    return np.load(tmp / "out.npy")


def cpp_logits(model, ids, kv="f16", **kw) -> np.ndarray:
    return native.llama_cpp_logits(model, ids, kv=kv, **kw)


# ---- Go's own checks -------------------------------------------------------

def test_go_vet_and_unit_tests():
    for cmd in (["vet", "./..."], ["test", "./..."]):
        r = subprocess.run([F.go_bin(), *cmd], cwd=F.GO_DIR, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"go {' '.join(cmd)}:\n{r.stdout}\n{r.stderr}"


# ---- logits parity with llama.cpp ---------------------------------------------

def test_f32_logits_match_llama_cpp(engine, f32_model, prompt_ids, tmp_path):
    # Same arithmetic on both sides (F32 weights, fp32 KV cache): equal but for fp32 evaluation order.
    ref = cpp_logits(f32_model, prompt_ids, kv="f32")
    got = go_logits(engine, f32_model, prompt_ids, tmp_path, "--kv-type", "f32")
    assert got.shape == ref.shape and got.shape[0] == len(prompt_ids)
    diff = np.abs(got - ref).max()
    print(f"F32 (fp32 KV) max|diff| = {diff:.2e}")
    assert diff <= 1e-5  # README: ~3e-6
    # and both equal the error model's float64 reference, which the quantised comparisons build on
    b = quant_error.bound(f32_model, prompt_ids, kv="f32")
    assert not b.sigma.any() and b.excess(got) <= 1 and b.excess(ref) <= 1
    # Both defaults: fp16 KV cache, whose roundings the error model bounds.
    b16 = quant_error.bound(f32_model, prompt_ids, kv="f16")
    ref16 = cpp_logits(f32_model, prompt_ids)
    got16 = go_logits(engine, f32_model, prompt_ids, tmp_path)
    print("F32 (fp16 KV):", b16.describe("Go", got16), "|", b16.describe("llama.cpp", ref16),
          f"| Go vs llama.cpp {np.abs(got16 - ref16).max():.2e}")
    assert b16.excess(got16) <= 1 and b16.excess(ref16) <= 1
    sure = b16.sure_argmax()
    assert (got16.argmax(1)[sure] == ref16.argmax(1)[sure]).all()


def check_quantized(engine, model, prompt_ids, tmp_path, tag):
    """The Go engine and llama.cpp each within the error model's bound (tests/quant_error.py) of the float64
    reference on the file's own dequantised weights, first with an fp32 KV cache on both sides, then with
    both defaults (fp16 cache, whose roundings the model includes); they then differ from each other by at
    most twice the bound, and pick the same token wherever the reference's lead exceeds it."""
    for kv, extra in (("f32", ("--kv-type", "f32")), ("f16", ())):
        b = quant_error.bound(model, prompt_ids, kv=kv)
        cpp = cpp_logits(model, prompt_ids, kv=kv)
        go = go_logits(engine, model, prompt_ids, tmp_path, *extra)
        assert go.shape == cpp.shape == b.reference.shape
        print(f"{tag} ({kv} KV):", b.describe("Go", go), "|", b.describe("llama.cpp", cpp),
              f"| Go vs llama.cpp {np.abs(go - cpp).max():.2e}; logit std {b.reference.std():.2f}")
        assert b.excess(go) <= 1 and b.excess(cpp) <= 1, (tag, kv)
        sure = b.sure_argmax()
        assert (go.argmax(1)[sure] == cpp.argmax(1)[sure]).all(), f"{sure.sum()} positions decided"


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0, Q.Q4_0, Q.BF16, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_quantized_logits_match_llama_cpp(engine, work, params, vocab, prompt_ids, tmp_path, qtype):
    model = F.write_model(work / f"{qtype.name}.gguf", params, vocab, qtype=qtype)
    check_quantized(engine, model, prompt_ids, tmp_path, qtype.name)


def test_quantization_error_model_is_calibrated(work, params, vocab, prompt_ids, f32_model):
    """ggml's roundings applied exactly (the quantised arithmetic itself, in float64) fall within the bound
    and fill it as a Gaussian would (the median |diff|/sigma is 0.67 for a Gaussian); and the bound rejects
    the unquantised model's logits: weight rounding is no part of it."""
    model = F.write_model(work / "calib-Q4_0.gguf", params, vocab, qtype=Q.Q4_0)
    b = quant_error.bound(model, prompt_ids, kv="f16")
    z = np.abs(b.rounded - b.reference) / b.sigma
    print(f"|diff|/sigma quantiles 50/99/100 %: {np.quantile(z, [0.5, 0.99, 1]).round(2)}")
    assert b.excess(b.rounded) <= 1
    assert 0.5 <= np.median(z) <= 0.85
    unquantised = cpp_logits(f32_model, prompt_ids)
    print(b.describe("llama.cpp on the F32 file", unquantised))
    assert b.excess(unquantised) > 2


def test_kquant_logits_match_llama_cpp(engine, work, params, vocab, prompt_ids, tmp_path):
    # gguf-py cannot quantise K-quants, so the matrices are random K-quant blocks.
    rng = np.random.default_rng(7)
    raw = {}
    kinds = [Q.Q4_K, Q.Q5_K, Q.Q6_K]
    for i, (name, arr) in enumerate(sorted(params.items())):
        if arr.ndim == 2:
            qt = kinds[i % 3]
            raw[name] = (F.random_kquant_blocks(arr.shape[0], arr.shape[1], qt, rng), qt)
    model = F.write_model(work / "kquants.gguf", params, vocab, raw=raw)
    check_quantized(engine, model, prompt_ids, tmp_path, "Q4_K/Q5_K/Q6_K")


def test_greedy_generation_matches_llama_cpp(engine, f32_model, prompt_ids):
    out, want = native.llama_cpp_greedy(f32_model, prompt_ids, 32)
    assert len(out) >= 8, "fixture model stopped too early to be a meaningful check"
    r = run(engine, "--model", f32_model, "--prompt", PROMPT, "--temp", "0", "--rep-penalty", "1",
            "--max-tokens", 32)
    assert r.stdout.rstrip("\n") == want
    assert "tok/s" in r.stderr


# ---- tokenizer parity -------------------------------------------------------------

TEXTS = [
    PROMPT,
    "Hello world",
    "  leading and trailing spaces  ",
    "multiple   spaces\tand\ttabs\nnew\n\nlines",
    "digits 0123456789 and 3.14159, 2026-02-01",
    "punctuation!?.,;:'\"()[]{}<>@#$%^&*_+=|\\/~`",
    "emoji 🦊🚀👍🏽 and CJK 日本語の文章 and Cyrillic Привет, мир",
    "accents: café naïve über Straße façade",
    "<s> looks like a control token </s>",
    "",
    "x",
]


def test_tokenizer_matches_llama_cpp(engine, f32_model):
    for text, want in zip(TEXTS, native.llama_cpp_tokenize(f32_model, TEXTS)):
        r = run(engine, "--model", f32_model, "--tokenize", "--prompt", text) if text else \
            run(engine, "--model", f32_model, "--tokenize", input=text.encode())
        got = [int(x) for x in r.stdout.split()]
        assert got == want, f"{text!r}: go {got} != llama.cpp {want}"


# ---- the HTTP server ------------------------------------------------------------------

import http.client  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402


@pytest.fixture(scope="module")
def server(engine, f32_model):
    s = F.Server(engine, f32_model, "--parallel", "4", "--threads", "2")
    try:
        yield s.port
    finally:
        s.close()


def request(port, method, path, body=None, raw: bytes | None = None, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def sse_events(payload: bytes):
    events = [e for e in payload.decode().split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[6:]) for e in events[:-1]]


def test_server_page_and_health(server):
    status, body = request(server, "GET", "/")
    assert status == 200 and b"<html" in body and b"/v1/chat/completions" in body
    status, body = request(server, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_server_stream_matches_non_stream(server):
    req = {"prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0.9, "top_k": 40,
           "top_p": 0.95, "seed": 1234}
    status, body = request(server, "POST", "/v1/completions", req)
    assert status == 200, body
    full = json.loads(body)
    text = full["choices"][0]["text"]
    assert full["usage"]["completion_tokens"] > 1 and text
    status, body = request(server, "POST", "/v1/completions", {**req, "stream": True})
    assert status == 200
    events = sse_events(body)
    pieces = [e["choices"][0]["text"] for e in events]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == text
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")

    chat = {"messages": [{"role": "user", "content": "Hello there, model!"}], "max_tokens": 16,
            "temperature": 0.7, "seed": 99}
    status, body = request(server, "POST", "/v1/chat/completions", chat)
    assert status == 200, body
    content = json.loads(body)["choices"][0]["message"]["content"]
    status, body = request(server, "POST", "/v1/chat/completions", {**chat, "stream": True})
    events = sse_events(body)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == content


def test_server_concurrent_requests(server):
    reqs = [{"prompt": f"Request number {i}: the", "max_tokens": 12, "temperature": 0.8, "seed": i}
            for i in range(8)]
    want = []
    for r in reqs:
        status, body = request(server, "POST", "/v1/completions", r)
        assert status == 200
        want.append(json.loads(body)["choices"][0]["text"])
    got = [None] * 8

    def worker(i):
        status, body = request(server, "POST", "/v1/completions", reqs[i])
        got[i] = (status, json.loads(body)["choices"][0]["text"] if status == 200 else body)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(g is not None and g[0] == 200 for g in got), got
    assert [g[1] for g in got] == want


def test_server_rejects_bad_requests_and_keeps_serving(server):
    status, body = request(server, "POST", "/v1/completions", raw=b'{"prompt": "unterminated')
    assert status == 400 and json.loads(body)["error"]["message"]
    status, body = request(server, "POST", "/v1/chat/completions", raw=b"not json at all")
    assert status == 400 and "JSON" in json.loads(body)["error"]["message"]
    status, body = request(server, "POST", "/v1/completions",
                           raw=json.dumps({"prompt": "x" * (2 << 20)}).encode())
    assert status == 413
    status, body = request(server, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 10**9})
    assert status == 400
    status, body = request(server, "POST", "/v1/completions", {"prompt": "Still alive?", "max_tokens": 4})
    assert status == 200 and json.loads(body)["choices"][0]["finish_reason"] in ("stop", "length")


# ---- personality: gamma .npz and LoRA adapters -------------------------------------------

N_HEAD, N_KV = 4, 2


def hf_to_gguf_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's HF-converter permutation of Q/K rows (half-split → interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


SD_NAMES = {"attn_norm": "attn_norm.weight", "ffn_norm": "ffn_norm.weight", "attn_q": "attn.c_q.weight",
            "attn_k": "attn.c_k.weight", "attn_v": "attn.c_v.weight", "attn_output": "attn.c_proj.weight",
            "ffn_gate": "ffn.gate_proj.weight", "ffn_up": "ffn.up_proj.weight", "ffn_down": "ffn.down_proj.weight"}


def write_gamma(path: Path, params: dict, rng, vpad: int) -> dict:
    """A sparse gamma in the reference layout; returns the dense deltas by GGUF
    name (f16-rounded, Q/K permuted, padded vocab rows dropped)."""
    arrays, deltas, names = {}, {}, []
    for name, base in params.items():
        if name == "token_embd.weight":
            key, shape = "tok_embeddings.weight", (vpad, base.shape[1])
        elif name == "output.weight":
            key, shape = "output.weight", (vpad, base.shape[1])
        elif name == "output_norm.weight":
            key, shape = "norm.weight", base.shape
        else:
            _, i, kind, _ = name.split(".")
            key, shape = f"layers.{i}.{SD_NAMES[kind]}", base.shape
        dense = np.zeros(shape, np.float32)
        mask = rng.random(shape) < 0.3
        dense[mask] = (rng.standard_normal(mask.sum()) * 0.05).astype(np.float16).astype(np.float32)
        idx = np.nonzero(dense)
        for d, ix in enumerate(idx):
            arrays[f"{key}.indices_{d}"] = ix.astype(np.int32)
        arrays[f"{key}.values"] = dense[idx].astype(np.float16)
        arrays[f"{key}.shape"] = np.array(shape, np.int64)
        names.append(key)
        delta = dense[: base.shape[0]] if dense.ndim == 2 else dense
        if key.endswith("c_q.weight"):
            delta = hf_to_gguf_rows(delta, N_HEAD)
        elif key.endswith("c_k.weight"):
            delta = hf_to_gguf_rows(delta, N_KV)
        deltas[name] = delta
    arrays["_metadata.layer_names"] = np.array(names)
    arrays["_metadata.total_norm"] = np.array(1.0, np.float32)
    np.savez(path, **arrays)
    return deltas


def test_gamma_matches_injected_model(engine, work, params, vocab, prompt_ids, tmp_path):
    rng = np.random.default_rng(3)
    base = F.write_model(work / "gamma_base.gguf", params, vocab)
    deltas = write_gamma(work / "gamma.npz", params, rng, vpad=640)
    alpha = 0.7
    injected = {k: v + alpha * deltas[k] for k, v in params.items()}
    inj = F.write_model(work / "gamma_injected.gguf", injected, vocab)
    ref = cpp_logits(inj, prompt_ids, kv="f32")
    got = go_logits(engine, base, prompt_ids, tmp_path, "--kv-type", "f32",
                    "--gamma", work / "gamma.npz", "--alpha", alpha)
    plain = go_logits(engine, base, prompt_ids, tmp_path, "--kv-type", "f32")
    diff = np.abs(got - ref).max()
    print(f"gamma: max|diff| vs injected GGUF in llama.cpp = {diff:.2e} (gamma moves logits by "
          f"{np.abs(plain - ref).max():.2f})")
    assert diff <= 1e-3
    assert np.abs(plain - ref).max() > 0.1  # the gamma really changed something


def test_lora_matches_injected_model(engine, work, params, vocab, prompt_ids, tmp_path):
    rng = np.random.default_rng(4)
    base = F.write_model(work / "lora_base.gguf", params, vocab)
    r, lora_alpha, scale = 4, 8.0, 0.5
    w = gguf.GGUFWriter(str(work / "adapter.gguf"), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", lora_alpha)
    injected = dict(params)
    for name in sorted(params):
        if any(t in name for t in ("attn_q", "attn_v", "attn_output", "ffn_down", "ffn_gate")):
            out_dim, in_dim = params[name].shape
            a = (rng.standard_normal((r, in_dim)) / np.sqrt(in_dim)).astype(np.float32)
            b = (rng.standard_normal((out_dim, r)) * 0.1).astype(np.float32)
            w.add_tensor(name + ".lora_a", a)
            w.add_tensor(name + ".lora_b", b)
            injected[name] = params[name] + scale * lora_alpha / r * (b @ a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    inj = F.write_model(work / "lora_injected.gguf", injected, vocab)
    ref = cpp_logits(inj, prompt_ids, kv="f32")
    got = go_logits(engine, base, prompt_ids, tmp_path, "--kv-type", "f32",
                    "--lora", work / "adapter.gguf", "--lora-scale", scale)
    diff = np.abs(got - ref).max()
    print(f"LoRA: max|diff| vs injected GGUF in llama.cpp = {diff:.2e}")
    assert diff <= 1e-3
    # llama.cpp applying the same adapter itself agrees too.
    cpp_lora = cpp_logits(base, prompt_ids, kv="f32", lora=work / "adapter.gguf", lora_scale=scale)
    print(f"LoRA: max|diff| vs llama.cpp --lora = {np.abs(got - cpp_lora).max():.2e}")
    assert np.abs(got - cpp_lora).max() <= 1e-2


# ---- bad input: one clear line, non-zero exit -------------------------------------------

def assert_one_line_error(r, *needles):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_corrupt_inputs_fail_clearly(engine, work, f32_model, params, vocab, tmp_path):
    data = f32_model.read_bytes()
    trunc = tmp_path / "truncated.gguf"
    trunc.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run(engine, "--model", trunc, "--prompt", "hi", check=False), "truncated.gguf", "truncated")
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:100])
    assert_one_line_error(run(engine, "--model", head, "--prompt", "hi", check=False), "head.gguf", "truncated")
    bad = tmp_path / "badmagic.gguf"
    bad.write_bytes(b"GGML" + data[4:])
    assert_one_line_error(run(engine, "--model", bad, "--prompt", "hi", check=False), "badmagic.gguf", "magic")
    # An unknown tensor type id: patch output_norm's type field to 99.
    name = b"output_norm.weight"
    i = data.index(name) + len(name)
    n_dims = int.from_bytes(data[i:i + 4], "little")
    t = i + 4 + 8 * n_dims
    unk = tmp_path / "unknown_type.gguf"
    unk.write_bytes(data[:t] + (99).to_bytes(4, "little") + data[t + 4:])
    assert_one_line_error(run(engine, "--model", unk, "--prompt", "hi", check=False),
                          "unknown_type.gguf", "output_norm.weight", "unknown type 99")
    # A known type this engine does not implement (Q2_K).
    rng = np.random.default_rng(0)
    w = params["blk.0.ffn_up.weight"]
    q2k = F.write_model(tmp_path / "q2k.gguf", params, vocab,
                        raw={"blk.0.ffn_up.weight": (rng.integers(0, 256, (w.shape[0], w.shape[1] // 256 * 84),
                                                                  dtype=np.uint8), Q.Q2_K)})
    assert_one_line_error(run(engine, "--model", q2k, "--prompt", "hi", check=False), "q2k.gguf", "Q2_K", "not support")
    notok = F.write_model(tmp_path / "notok.gguf", params, vocab, tokenizer=False)
    assert_one_line_error(run(engine, "--model", notok, "--prompt", "hi", check=False), "notok.gguf", "tokenizer")
    assert_one_line_error(run(engine, "--model", tmp_path / "missing.gguf", "--prompt", "hi", check=False),
                          "missing.gguf")
    np.save(tmp_path / "bad_ids.npy", np.array([1, 10**6], np.int32))
    assert_one_line_error(run(engine, "--model", f32_model, "--tokens", tmp_path / "bad_ids.npy",
                              "--dump-logits", tmp_path / "o.npy", check=False), "bad_ids.npy", "out of range")
    assert not (tmp_path / "o.npy").exists()
    assert_one_line_error(run(engine, "--model", f32_model, "--gamma", tmp_path / "bad_ids.npy",
                              "--prompt", "hi", check=False), "bad_ids.npy")


def test_cli_modes(engine, f32_model):
    r = run(engine, "--help")
    assert "Example" in r.stderr + r.stdout and "--model" in r.stderr + r.stdout
    r = run(engine, "--model", f32_model, "--list-tensors")
    assert "blk.1.ffn_down.weight" in r.stdout and "tokenizer.ggml.model" in r.stdout
    r = run(engine, "--model", f32_model, "--max-tokens", 8, "--seed", 3, input=b"The quick brown fox")
    assert "tok/s" in r.stderr
    r2 = run(engine, "--model", f32_model, "--max-tokens", 8, "--seed", 3, "--prompt", "The quick brown fox")
    assert r.stdout == r2.stdout  # stdin and --prompt agree; seeded sampling is reproducible
    r = run(engine, "--model", f32_model, "--interactive", "--max-tokens", 4, "--temp", 0,
            input=b"hello\n/reset\nworld\n/quit\n")
    assert r.stderr.count(" tokens in ") == 2
