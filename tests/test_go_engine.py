"""The Go engine (go/) against llama.cpp on GGUF files written here with gguf-py:
logits for every position, greedy generation, tokenizer ids, the HTTP server,
gamma / LoRA personalities and clear failures on bad input.

llama.cpp comes from llama-cpp-python (a test dependency); these tests fail rather
than skip when it is missing."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gguf
import llama_cpp  # noqa: F401  (required: no silent skipping)

sys.path.insert(0, str(Path(__file__).parent))
import go_fixtures as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GO_DIR = ROOT / "go"
Q = gguf.GGMLQuantizationType

PROMPT = ("The quick brown fox jumps over the lazy dog 12345 times! Café, naïve über 日本語; "
          "привет 🦊 (x) a-b 3.14 -- the model's weights: 0.5, 1e-3 & 42%. ")


def go_bin() -> str:
    go = shutil.which("go") or "/usr/lib/go/bin/go"
    assert os.path.exists(go), "the Go toolchain is required (go not found on PATH)"
    return go


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gobin") / "nanollama"
    subprocess.run([go_bin(), "build", "-o", str(out), "."], cwd=GO_DIR, check=True)
    return out


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
    ids = llama_cpp.Llama(model_path=str(f32_model), vocab_only=True, verbose=False).tokenize(
        PROMPT.encode(), add_bos=True, special=False)
    assert len(ids) >= 64
    return ids


def run(engine, *args, input=None, check=True, timeout=120):
    r = subprocess.run([str(engine), *map(str, args)], capture_output=True, input=input,
                       timeout=timeout)
    r.stdout = r.stdout.decode("utf-8", errors="replace")
    r.stderr = r.stderr.decode("utf-8", errors="replace")
    if check:
        assert r.returncode == 0, r.stderr
    return r


def go_logits(engine, model, ids, tmp: Path, *extra) -> np.ndarray:
    np.save(tmp / "ids.npy", np.asarray(ids, np.int32))
    run(engine, "--model", model, "--tokens", tmp / "ids.npy", "--dump-logits", tmp / "out.npy", *extra)
    return np.load(tmp / "out.npy")


def cpp_logits(model, ids, **kw) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(model), logits_all=True, n_ctx=512, n_threads=2, seed=0,
                          verbose=False, **kw)
    try:
        llm.eval(list(ids))
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


# ---- Go's own checks -------------------------------------------------------

def test_go_vet_and_unit_tests():
    for cmd in (["vet", "./..."], ["test", "./..."]):
        r = subprocess.run([go_bin(), *cmd], cwd=GO_DIR, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"go {' '.join(cmd)}:\n{r.stdout}\n{r.stderr}"


# ---- logits parity with llama.cpp ---------------------------------------------

def test_f32_logits_match_llama_cpp(engine, f32_model, prompt_ids, tmp_path):
    # Same arithmetic on both sides: fp32 KV cache.
    ref = cpp_logits(f32_model, prompt_ids, type_k=0, type_v=0)
    got = go_logits(engine, f32_model, prompt_ids, tmp_path, "--kv-type", "f32")
    assert got.shape == ref.shape and got.shape[0] == len(prompt_ids)
    diff = np.abs(got - ref).max()
    print(f"F32 (fp32 KV) max|diff| = {diff:.2e}")
    assert diff <= 1e-3
    # Both defaults: fp16 KV cache (the Go engine copies llama.cpp's roundings).
    ref16 = cpp_logits(f32_model, prompt_ids)
    got16 = go_logits(engine, f32_model, prompt_ids, tmp_path)
    diff16 = np.abs(got16 - ref16).max()
    print(f"F32 (fp16 KV) max|diff| = {diff16:.2e}")
    assert diff16 <= 1e-2
    assert (got16.argmax(1) == ref16.argmax(1)).all()


def check_quantized(engine, model, prompt_ids, tmp_path, tag, tol=5e-2):
    # fp32 KV cache on both sides: the remaining differences are rounding
    # flips of activation quantisation (llama.cpp sums in another order).
    ref = cpp_logits(model, prompt_ids, type_k=0, type_v=0)
    got = go_logits(engine, model, prompt_ids, tmp_path, "--kv-type", "f32")
    per_pos = np.abs(got - ref).max(1)
    diff = per_pos.max()
    # Defaults (fp16 KV cache): more rounding boundaries to flip across.
    ref16 = cpp_logits(model, prompt_ids)
    got16 = go_logits(engine, model, prompt_ids, tmp_path)
    diff16 = np.abs(got16 - ref16).max()
    agree = (got16.argmax(1) == ref16.argmax(1)).mean()
    print(f"{tag}: max|diff| = {diff:.2e}, median over positions {np.median(per_pos):.1e} (fp32 KV); "
          f"{diff16:.2e} (fp16 KV), argmax agreement {agree:.0%}; logit std {ref.std():.2f}")
    # Typical positions agree far better than the worst one.
    assert np.median(per_pos) <= 1e-2
    assert diff <= tol
    assert diff16 <= 0.15 and agree >= 0.95


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0, Q.Q4_0, Q.BF16, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_quantized_logits_match_llama_cpp(engine, work, params, vocab, prompt_ids, tmp_path, qtype):
    model = F.write_model(work / f"{qtype.name}.gguf", params, vocab, qtype=qtype)
    # The acceptance bar is 5e-2 for F16, Q8_0, Q4_0; the others get 0.1.
    tol = 5e-2 if qtype in (Q.F16, Q.Q8_0, Q.Q4_0) else 0.1
    check_quantized(engine, model, prompt_ids, tmp_path, qtype.name, tol)


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
    llm = llama_cpp.Llama(model_path=str(f32_model), n_ctx=512, n_threads=2, seed=0, verbose=False,
                          logits_all=True)
    try:
        ids = list(prompt_ids)
        llm.eval(ids)
        out = []
        for _ in range(32):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if nxt == llm.token_eos():
                break
            out.append(nxt)
            llm.eval([nxt])
        want = llm.detokenize(out).decode("utf-8", errors="replace")
    finally:
        llm.close()
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
    llm = llama_cpp.Llama(model_path=str(f32_model), vocab_only=True, verbose=False)
    for text in TEXTS:
        want = llm.tokenize(text.encode(), add_bos=True, special=False)
        r = run(engine, "--model", f32_model, "--tokenize", "--prompt", text) if text else \
            run(engine, "--model", f32_model, "--tokenize", input=text.encode())
        got = [int(x) for x in r.stdout.split()]
        assert got == want, f"{text!r}: go {got} != llama.cpp {want}"
