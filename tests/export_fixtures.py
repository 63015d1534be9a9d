"""Shared fixtures and helpers of the export tests (test_export_*.py): a SentencePiece tokenizer trained
on built-in text, a tiny random model and its run folder and F32 GGUF, our logits vs llama.cpp's, and the
CLI/GGUF-rewriting helpers of the bad-input tests."""
import itertools
import subprocess
import sys

import jax
import numpy as np
import pytest

from nanollama_jax import checkpoint
from nanollama_jax import model as M
from nanollama_jax.config import LlamaConfig

import quant_error
from native import llama_cpp_logits as native_logits

VOCAB = 500  # not a multiple of 64: the padded rows (500..511) are exercised
TEXTS = [
    "Hello world, this is a test.",
    "  two leading spaces, then   runs of   spaces",
    "digits 0123456789 and 3.14159, 2**10 = 1024",
    "punctuation!? (brackets) [x] {y} <z> --- ... ; : 'quotes' \"double\"",
    "non-ASCII: Ünïcödé, naïve café, Grüße, Ελληνικά, русский, 日本語, emoji ☃🙂",
    "tabs\tand\nnewlines\n\nend",
    "",
    "markup that is not special here: <s> a </s> <unk> <0x41>",
    "trailing spaces   ",
]
PROMPT = (" The quick brown fox, 12345 jumps over the lazy dog. Ünïcödé ☃ text!  Leading  spaces and more "
          "words to fill the prompt: def foo(x): return x * 2  # a comment about the function")


@pytest.fixture(scope="session")
def corpus():
    from data import builtin

    return list(itertools.islice(builtin.documents(), 150))


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory, corpus):
    from data import tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    path.write_bytes(tokenizer.train(corpus, VOCAB))
    return path


@pytest.fixture(scope="session")
def sp(tokenizer_file):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tokenizer_file))


@pytest.fixture(scope="session")
def config():
    return LlamaConfig(n_layer=2, n_embd=128, n_head=4, n_kv_head=2, vocab_size=VOCAB, sequence_len=128)


def random_params(config, seed=0):
    """nanollama's init with the zero-initialised projections, the norms and the output head filled
    with random values of a realistic scale, so every weight moves the logits."""
    p = jax.tree_util.tree_map(np.array, M.init_params(config, seed))
    rng = np.random.default_rng(seed)
    lay = p["layers"]
    for mod, name in (("attn", "c_proj"), ("ffn", "down_proj")):
        k = lay[mod][name]["kernel"]
        lay[mod][name]["kernel"] = (rng.uniform(-1, 1, k.shape) * np.sqrt(3 / k.shape[1])).astype(np.float32)
    for name in ("attn_norm", "ffn_norm"):
        lay[name]["scale"] = (1 + 0.2 * rng.standard_normal(lay[name]["scale"].shape)).astype(np.float32)
    p["norm"]["scale"] = (1 + 0.2 * rng.standard_normal(p["norm"]["scale"].shape)).astype(np.float32)
    p["output"]["kernel"] = (0.2 * rng.standard_normal(p["output"]["kernel"].shape)).astype(np.float32)
    return p


@pytest.fixture(scope="session")
def params(config):
    return random_params(config)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, config, params, tokenizer_file):
    path = tmp_path_factory.mktemp("run") / "tiny"
    checkpoint.write_params_run(path, config, params, tokenizer_file, step=7)
    return path


@pytest.fixture(scope="session")
def prompt_ids(sp):
    ids = [sp.bos_id()] + sp.encode(PROMPT)
    assert 64 <= len(ids) <= 128
    return ids


# F32 files: the same arithmetic as ours but for fp32 evaluation order (measured 4e-6 to 6e-6; README quotes this).
F32_TOL = 2e-5


def our_logits(params, config, ids):
    return np.asarray(M.forward(params, np.asarray([ids], np.int32), config))[0, :, :config.vocab_size]


def llama_cpp_logits(path, ids):
    """llama.cpp's logits (in a child process), F32 KV cache: the same arithmetic as our float forward."""
    return native_logits(path, ids, kv="f32", n_ctx=128)


@pytest.fixture(scope="session")
def f32_gguf(tmp_path_factory, run_dir):
    out = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    r = subprocess.run([sys.executable, "-m", "export.gguf", "--checkpoint", str(run_dir), "--output", str(out),
                        "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "step 7" in r.stdout
    return out



def check_quantised(path, ours, ids, tag):
    """llama.cpp on a quantised file against our logits on the same weights as the file holds them (quantised
    and dequantised as the export does): ours must be the error model's float reference on those weights,
    and llama.cpp within the model's bound of it (its activation rounding; tests/quant_error.py)."""
    b = quant_error.bound(path, ids, kv="f32")
    theirs = llama_cpp_logits(path, ids)
    print(tag, b.describe("llama.cpp", theirs), f"| ours vs reference {np.abs(ours - b.reference).max():.1e}")
    assert np.abs(ours - b.reference).max() <= quant_error.FLOOR  # our dequantisation is the file's
    assert b.excess(theirs) <= 1, tag



def assert_params_equal_on_real_rows(got, want, config):
    """Bit-exact on every tensor; the vocab padding rows (masked by the model) come back as zeros."""
    flat_got = jax.tree_util.tree_leaves_with_path(got)
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
    assert len(flat_got) == len(flat_want)
    for path, g in flat_got:
        g, w = np.asarray(g), np.asarray(flat_want[path])
        assert g.shape == w.shape and g.dtype == np.float32, path
        name = jax.tree_util.keystr(path)
        if "tok_embeddings" in name:
            np.testing.assert_array_equal(g[:config.vocab_size], w[:config.vocab_size], err_msg=name)
            assert not g[config.vocab_size:].any()
        elif "output" in name:
            np.testing.assert_array_equal(g[:, :config.vocab_size], w[:, :config.vocab_size], err_msg=name)
            assert not g[:, config.vocab_size:].any()
        else:
            np.testing.assert_array_equal(g, w, err_msg=name)


def rewrite_gguf(src, dst, fields=None, tensor=None, drop=()):
    """Copy a GGUF, overriding metadata (`fields`: key -> (value, type[, sub_type]), None to drop),
    passing each tensor through `tensor(name, data) -> data` and leaving out the tensors in `drop`."""
    from gguf import GGUFReader, GGUFValueType as V, GGUFWriter

    r = GGUFReader(str(src))
    fields = dict(fields or {})
    arch = fields.pop("general.architecture", (r.fields["general.architecture"].contents(),))[0]
    w = GGUFWriter(str(dst), arch)
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key in fields:
            continue
        sub = f.types[-1] if f.types[0] == V.ARRAY else None
        w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    for key, spec in fields.items():
        if spec is not None:
            w.add_key_value(key, *spec)
    for t in r.tensors:
        if t.name in drop:
            continue
        data = np.array(t.data)
        if tensor:
            data = tensor(t.name, data)
        w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True)


def assert_one_line_error(r, *words):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{r.args[2]}: "), r.stderr  # `<command>: …`
    for w in words:
        assert w in lines[0], lines[0]
