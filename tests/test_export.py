"""Export: GGUF files that llama.cpp (built by llama-cpp-python) runs exactly like our model, GGUF read
back, nanollama `.pt` checkpoints both ways, and clean failures on bad input."""
import itertools
import subprocess
import sys

import jax
import numpy as np
import pytest

from export import gguf as G
from nanollama_jax import checkpoint
from nanollama_jax import model as M
from nanollama_jax.config import LlamaConfig

import quant_error
from native import llama_cpp_logits as native_logits, llama_cpp_tokenize

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


# ---------------------------------------------------------------- GGUF file contents

def test_gguf_metadata_and_tensors(f32_gguf, config, sp):
    from gguf import GGMLQuantizationType as Q, GGUFReader, GGUFValueType as V

    r = GGUFReader(str(f32_gguf))
    f = r.fields

    def val(key):
        return f[key].contents()

    assert val("general.architecture") == "llama" and val("general.name") == "tiny"
    assert val("general.file_type") == 0
    uint32 = {"llama.context_length": 128, "llama.embedding_length": 128, "llama.block_count": 2,
              "llama.feed_forward_length": config.ffn_hidden, "llama.attention.head_count": 4,
              "llama.attention.head_count_kv": 2, "llama.attention.key_length": 64,
              "llama.attention.value_length": 64, "llama.rope.dimension_count": 64, "llama.vocab_size": VOCAB}
    for key, want in uint32.items():
        assert f[key].types == [V.UINT32], key
        assert val(key) == want, key
    for key, want in {"llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 10000.0}.items():
        assert f[key].types == [V.FLOAT32], key
        assert val(key) == pytest.approx(want)
    assert val("tokenizer.ggml.model") == "llama"
    tokens = val("tokenizer.ggml.tokens")
    assert tokens == [sp.id_to_piece(i) for i in range(VOCAB)]  # exactly the SentencePiece vocab
    types = val("tokenizer.ggml.token_type")
    assert types[0] == 2 and types[1] == 3 and types[2] == 3 and types[3:259] == [6] * 256
    assert set(types[259:-3]) == {1} and types[-3:] == [3, 3, 3]  # the chat tokens (data/chat.py): CONTROL
    assert tokens[-3:] == ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert val("tokenizer.ggml.eot_token_id") == VOCAB - 1
    assert "<|start_header_id|>" in val("tokenizer.chat_template")
    assert val("tokenizer.ggml.scores")[300] == pytest.approx(sp.get_score(300))
    assert (val("tokenizer.ggml.bos_token_id"), val("tokenizer.ggml.eos_token_id"),
            val("tokenizer.ggml.unknown_token_id")) == (1, 2, 0)
    assert "tokenizer.ggml.padding_token_id" not in f  # our tokenizer has no pad piece
    assert val("tokenizer.ggml.add_bos_token") is True and val("tokenizer.ggml.add_eos_token") is False

    tensors = {t.name: t for t in r.tensors}
    names = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in range(2):
        names |= {f"blk.{i}.{n}.weight" for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                                                   "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(tensors) == names
    assert list(tensors["token_embd.weight"].shape) == [128, VOCAB]  # ggml order: ne0 = row length
    assert list(tensors["output.weight"].shape) == [128, VOCAB]  # trimmed to vocab_size rows
    assert list(tensors["blk.0.attn_k.weight"].shape) == [128, 128]
    assert list(tensors["blk.0.ffn_down.weight"].shape) == [config.ffn_hidden, 128]
    assert all(t.tensor_type == Q.F32 for t in r.tensors)


def test_qk_permutation_matches_convert_hf_to_gguf():
    # convert_hf_to_gguf.LlamaModel.permute, verbatim (torch → numpy)
    def permute(weights, n_head, n_head_kv):
        if n_head_kv is not None and n_head != n_head_kv:
            n_head = n_head_kv
        return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
                .swapaxes(1, 2).reshape(weights.shape))

    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(32, 3)
    np.testing.assert_array_equal(G.permute_qk(w, 4), permute(w, 4, 4))
    np.testing.assert_array_equal(G.permute_qk(w, 2), permute(w, 8, 2))
    np.testing.assert_array_equal(G.unpermute_qk(G.permute_qk(w, 4), 4), w)
    # head 0's rows: half-split pairs (0, 4), (1, 5)… become adjacent (0, 1), (2, 3)…
    assert G.permute_qk(np.arange(8.0)[:, None], 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


# ---------------------------------------------------------------- llama.cpp parity

def test_llama_cpp_f32_matches_our_logits(f32_gguf, params, config, prompt_ids):
    ours = our_logits(params, config, prompt_ids)
    theirs = llama_cpp_logits(f32_gguf, prompt_ids)
    assert theirs.shape == ours.shape == (len(prompt_ids), VOCAB)
    assert ours.std() > 1.0  # logits of a realistic scale, so the tolerance means something
    diff = np.abs(theirs - ours).max()
    print(f"F32 max|diff| = {diff:.2e}")
    assert diff <= F32_TOL
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()


def test_negative_control_without_qk_permutation_is_rejected(tmp_path, params, config, tokenizer_file, prompt_ids):
    out = tmp_path / "unpermuted.gguf"
    G.write_gguf(params, config, tokenizer_file, out, "f32", progress=False, _permute=False)
    diff = np.abs(llama_cpp_logits(out, prompt_ids) - our_logits(params, config, prompt_ids)).max()
    print(f"unpermuted F32 max|diff| = {diff:.2e}")
    assert diff > F32_TOL  # the same comparison fails
    assert diff > 0.1  # by far


def check_quantised(path, ours, ids, tag):
    """llama.cpp on a quantised file against our logits on the same weights as the file holds them (quantised
    and dequantised as the export does): ours must be the error model's float reference on those weights,
    and llama.cpp within the model's bound of it (its activation rounding; tests/quant_error.py)."""
    b = quant_error.bound(path, ids, kv="f32")
    theirs = llama_cpp_logits(path, ids)
    print(tag, b.describe("llama.cpp", theirs), f"| ours vs reference {np.abs(ours - b.reference).max():.1e}")
    assert np.abs(ours - b.reference).max() <= quant_error.FLOOR  # our dequantisation is the file's
    assert b.excess(theirs) <= 1, tag


@pytest.mark.parametrize("dtype", ["f16", "q8_0", "q4_0"])
def test_llama_cpp_quantised_matches(tmp_path, params, config, tokenizer_file, prompt_ids, dtype):
    out = tmp_path / f"m-{dtype}.gguf"
    G.write_gguf(params, config, tokenizer_file, out, dtype, progress=False)
    ours = our_logits(G.quantized_params(params, config, dtype), config, prompt_ids)
    check_quantised(out, ours, prompt_ids, dtype)


def test_llama_cpp_tokenizer_matches_sentencepiece(f32_gguf, sp):
    texts = TEXTS + [PROMPT]
    for text, theirs in zip(texts, llama_cpp_tokenize(f32_gguf, texts)):
        assert theirs == [sp.bos_id()] + sp.encode(text), text
    assert any(sp.is_byte(i) for i in sp.encode(TEXTS[4]))  # byte fallback exercised


def test_refuses_models_llama_cpp_cannot_run(tmp_path, config, params, tokenizer_file):
    import dataclasses

    for change, word in (({"use_qk_norm": True}, "QK-norm"), ({"softcap": 15.0}, "softcap")):
        out = tmp_path / "x.gguf"
        with pytest.raises(ValueError, match=word):
            G.write_gguf(params, dataclasses.replace(config, **change), tokenizer_file, out, progress=False)
        assert not out.exists() and not list(tmp_path.iterdir())


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, corpus, tokenizer_file):
    """A CPU model trained 30 steps by `nanollama_jax.train` (pico shape: 2 layers, d 128, GQA 2/1 heads,
    context 128) on built-in text, with the test tokenizer."""
    root = tmp_path_factory.mktemp("trained")
    (root / "corpus.txt").write_text("\n\n".join(corpus))
    r = run_cli("data.prepare", "--input", root / "corpus.txt", "--output", root / "data", "--tokenizer",
                tokenizer_file, "--quiet")
    assert r.returncode == 0, r.stderr
    r = run_cli("nanollama_jax.train", "--size", "pico", "--steps", 30, "--data", root / "data", "--runs-dir",
                root / "runs", "--model-tag", "pico", "--seq-len", 128, "--tokens-per-step", 1024, "--batch-size", 8,
                "--eval-every", 1000, "--sample-every", 1000)
    assert r.returncode == 0, r.stderr[-2000:]
    return root / "runs" / "pico"


def dump_logits(run, ids, tmp_path):
    np.save(tmp_path / "ids.npy", np.asarray(ids, np.int32))
    r = run_cli("nanollama_jax.generate", "--checkpoint", run, "--tokens", tmp_path / "ids.npy", "--dump-logits",
                tmp_path / "logits.npy")
    assert r.returncode == 0, r.stderr
    return np.load(tmp_path / "logits.npy")


def test_llama_cpp_matches_generate_dump_logits_on_a_trained_model(tmp_path, trained_run, prompt_ids):
    """Acceptance 1 and 2 on a trained model: llama.cpp's logits for every position of a 64+ token prompt
    (F32 KV cache) vs `generate --dump-logits`; quantised files vs our model with the same weights
    quantised and dequantised; the unpermuted export is rejected by the same comparison."""
    ours = dump_logits(trained_run, prompt_ids, tmp_path)
    assert ours.shape == (len(prompt_ids), VOCAB) and ours.dtype == np.float32
    run, params = checkpoint.load_params(trained_run)
    assert run.step == 30
    diffs = {}
    for dtype in ("f32", "f16", "q8_0", "q4_0"):
        out = tmp_path / f"pico-{dtype}.gguf"
        if dtype == "f32":  # the CLI once; the library call for the rest (saves a JAX start-up each)
            r = run_cli("export.gguf", "--checkpoint", trained_run, "--output", out, "--dtype", dtype, "--quiet")
            assert r.returncode == 0, r.stderr
            diffs[dtype] = float(np.abs(llama_cpp_logits(out, prompt_ids) - ours).max())
            assert diffs[dtype] <= F32_TOL, diffs
        else:
            G.write_gguf(params, run.config, run.tokenizer_path, out, dtype, progress=False)
            check_quantised(out, our_logits(G.quantized_params(params, run.config, dtype), run.config, prompt_ids),
                            prompt_ids, f"trained pico {dtype}")
    G.write_gguf(params, run.config, run.tokenizer_path, tmp_path / "unpermuted.gguf", progress=False,
                 _permute=False)
    diffs["f32 unpermuted"] = float(np.abs(llama_cpp_logits(tmp_path / "unpermuted.gguf", prompt_ids) - ours).max())
    print("trained pico, llama.cpp vs ours, max|diff|:", {k: f"{v:.3g}" for k, v in diffs.items()})
    assert diffs["f32 unpermuted"] > 0.1 > F32_TOL  # rejected, by far


# ---------------------------------------------------------------- GGUF read back

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


def test_roundtrip_checkpoint_gguf_f32_checkpoint(tmp_path, f32_gguf, run_dir, params, config, tokenizer_file,
                                                  sp, prompt_ids):
    out = tmp_path / "back"
    r = subprocess.run([sys.executable, "-m", "export.gguf_read", str(f32_gguf), "--output", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    run, back = checkpoint.load_params(out)
    assert run.config == config
    assert_params_equal_on_real_rows(back, params, config)
    assert run.tokenizer_path.read_bytes() == tokenizer_file.read_bytes()  # the original, byte for byte
    np.testing.assert_array_equal(our_logits(back, config, prompt_ids), our_logits(params, config, prompt_ids))


def test_roundtrip_is_exact_when_padding_rows_are_zero(tmp_path, params, config, tokenizer_file):
    from export.gguf_read import read_gguf

    p = jax.tree_util.tree_map(np.array, params)
    p["tok_embeddings"]["embedding"][config.vocab_size:] = 0
    p["output"]["kernel"][:, config.vocab_size:] = 0
    G.write_gguf(p, config, tokenizer_file, tmp_path / "m.gguf", "f32", progress=False)
    config2, back, tok = read_gguf(tmp_path / "m.gguf")
    assert config2 == config and tok == tokenizer_file.read_bytes()
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(p)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", ["f16", "q8_0", "q4_1"])
def test_read_back_quantised_gguf_dequantises(tmp_path, params, config, tokenizer_file, dtype):
    from export.gguf_read import read_gguf

    G.write_gguf(params, config, tokenizer_file, tmp_path / "m.gguf", dtype, progress=False)
    _, back, _ = read_gguf(tmp_path / "m.gguf")
    assert_params_equal_on_real_rows(back, G.quantized_params(params, config, dtype), config)


def test_foreign_vocab_rebuilds_an_equivalent_sentencepiece_model(tmp_path, params, config, tokenizer_file, sp):
    """A GGUF without our embedded tokenizer.model (as from any other converter): the SentencePiece
    model rebuilt from tokens/scores/types encodes exactly like the original."""
    import sentencepiece as spm

    from export.gguf_read import read_gguf

    G.write_gguf(params, config, tokenizer_file, tmp_path / "m.gguf", "f32", progress=False, _embed_tokenizer=False)
    _, _, tok = read_gguf(tmp_path / "m.gguf")
    assert tok != tokenizer_file.read_bytes()
    rebuilt = spm.SentencePieceProcessor(model_proto=tok)
    assert rebuilt.get_piece_size() == VOCAB
    assert (rebuilt.bos_id(), rebuilt.eos_id(), rebuilt.unk_id(), rebuilt.pad_id()) == (1, 2, 0, -1)
    for text in TEXTS + [PROMPT]:
        assert rebuilt.encode(text) == sp.encode(text), text
        assert rebuilt.decode(sp.encode(text)) == sp.decode(sp.encode(text))


# ---------------------------------------------------------------- nanollama .pt checkpoints

def reference_model(cfg):
    """The reference's model layout and math (REFERENCE.md), in torch: half-split RoPE, GQA with
    consecutive query-head groups, F.rms_norm with a learnable weight, SwiGLU, untied head."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    d, h, kv = cfg["n_embd"], cfg["n_head"], cfg["n_kv_head"]
    hd = d // h
    ffn = -(-int(8 * d / 3) // cfg["multiple_of"]) * cfg["multiple_of"]
    vpad = -(-cfg["vocab_size"] // 64) * 64

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return F.rms_norm(x, (d,), self.weight, cfg["norm_eps"])

    def rope(x, theta):  # x [B, H, T, hd]
        t = x.shape[2]
        inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        ang = torch.arange(t, dtype=torch.float32)[:, None] * inv
        cos, sin = ang.cos(), ang.sin()
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_q = nn.Linear(d, h * hd, bias=False)
            self.c_k = nn.Linear(d, kv * hd, bias=False)
            self.c_v = nn.Linear(d, kv * hd, bias=False)
            self.c_proj = nn.Linear(h * hd, d, bias=False)

        def forward(self, x):
            b, t, _ = x.shape
            q = rope(self.c_q(x).view(b, t, h, hd).transpose(1, 2), cfg["rope_theta"])
            k = rope(self.c_k(x).view(b, t, kv, hd).transpose(1, 2), cfg["rope_theta"])
            v = self.c_v(x).view(b, t, kv, hd).transpose(1, 2)
            k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).reshape(b, t, h * hd))

    class FFN(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = nn.Linear(d, ffn, bias=False)
            self.up_proj = nn.Linear(d, ffn, bias=False)
            self.down_proj = nn.Linear(ffn, d, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_norm, self.attn, self.ffn_norm, self.ffn = RMSNorm(), Attn(), RMSNorm(), FFN()

        def forward(self, x):
            x = x + self.attn(self.attn_norm(x))
            return x + self.ffn(self.ffn_norm(x))

    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok_embeddings = nn.Embedding(vpad, d)
            self.layers = nn.ModuleList([Block() for _ in range(cfg["n_layer"])])
            self.norm = RMSNorm()
            self.output = nn.Linear(d, vpad, bias=False)

        def forward(self, idx):
            x = self.tok_embeddings(idx)
            for layer in self.layers:
                x = layer(x)
            return self.output(self.norm(x)).float()

    torch.manual_seed(0)
    m = Llama()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return m.eval()


REF_CONFIG = {"sequence_len": 128, "vocab_size": VOCAB, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 256,
              "norm_eps": 1e-5, "multiple_of": 256, "window_pattern": "L", "rope_theta": 10000.0,
              "tie_embeddings": False, "use_qk_norm": False, "use_post_emb_norm": False, "use_resformer": False,
              "softcap": 0.0}


def save_reference_pt(model, path, cfg=REF_CONFIG, step=42):
    import json

    import torch

    state = {"_orig_mod." + k: v.detach().clone() for k, v in model.state_dict().items()}  # torch.compile'd
    opt = {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.02}]}
    torch.save({"model_state_dict": state, "optimizer_state_dict": opt, "step": step, "config": dict(cfg)}, path)
    path.with_name(path.stem + "_meta.json").write_text(
        json.dumps({"step": step, "config": cfg, "checkpoint_path": str(path)}))
    return path


def test_reference_pt_loads_with_same_logits_and_round_trips(tmp_path, tokenizer_file, prompt_ids):
    import torch

    ref = reference_model(REF_CONFIG)
    pt = save_reference_pt(ref, tmp_path / "checkpoint_step42.pt")
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "export.nanollama", "--from-pt", str(pt), "--tokenizer",
                        str(tokenizer_file), "--output", str(run_dir)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    run, params = checkpoint.load_params(run_dir)
    assert run.step == 42 and run.config.n_embd == 256 and run.config.n_kv_head == 2
    with torch.no_grad():
        theirs = ref(torch.tensor([prompt_ids])).numpy()[0, :, :VOCAB]
    ours = our_logits(params, run.config, prompt_ids)
    diff = np.abs(theirs - ours).max()
    print(f"reference torch model vs ours: max|diff| = {diff:.2e}")
    assert diff <= 1e-4

    back = tmp_path / "out" / "checkpoint_step42.pt"
    r = subprocess.run([sys.executable, "-m", "export.nanollama", "--checkpoint", str(run_dir), "--output", str(back)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a = torch.load(pt, weights_only=True)
    b = torch.load(back, weights_only=True)
    sa = {k.removeprefix("_orig_mod."): v for k, v in a["model_state_dict"].items()}
    assert list(sa) == list(b["model_state_dict"])  # same names, same order
    for k, v in sa.items():
        assert b["model_state_dict"][k].dtype == v.dtype
        assert torch.equal(b["model_state_dict"][k], v), k
    assert b["step"] == 42 and b["config"] == REF_CONFIG
    import json
    meta = json.loads(back.with_name("checkpoint_step42_meta.json").read_text())
    assert meta["step"] == 42 and meta["config"] == REF_CONFIG and meta["checkpoint_path"] == str(back)
    # and the module itself loads it
    reference_model(REF_CONFIG).load_state_dict(b["model_state_dict"])


@pytest.mark.parametrize("change,word", [({"use_resformer": True}, "ResFormer"),
                                         ({"use_post_emb_norm": True}, "post-embedding norm"),
                                         ({"tie_embeddings": True}, "tied"),
                                         ({"window_pattern": "SSSL"}, "sliding-window")])
def test_reference_extensions_are_refused(tmp_path, change, word):
    from export.nanollama import load_pt

    pt = save_reference_pt(reference_model(REF_CONFIG), tmp_path / "checkpoint_step1.pt", {**REF_CONFIG, **change})
    with pytest.raises(ValueError, match=word):
        load_pt(pt)


def test_reference_extension_refused_by_the_cli(tmp_path, tokenizer_file):
    pt = save_reference_pt(reference_model(REF_CONFIG), tmp_path / "checkpoint_step1.pt",
                           {**REF_CONFIG, "use_resformer": True})
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "export.nanollama", "--from-pt", str(pt), "--tokenizer",
                        str(tokenizer_file), "--output", str(out)], capture_output=True, text=True)
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1 and "ResFormer" in r.stderr, r.stderr
    assert not out.exists()


# ---------------------------------------------------------------- bad input

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


def test_rewrite_helper_keeps_a_good_file_good(tmp_path, f32_gguf):
    from export.gguf_read import read_gguf

    read_gguf(rewrite_gguf(f32_gguf, tmp_path / "copy.gguf"))


def test_bad_inputs_fail_cleanly(tmp_path, f32_gguf, run_dir):
    from gguf import GGUFValueType as V

    out = tmp_path / "out"
    out.mkdir()
    # export: a checkpoint path that does not exist
    r = run_cli("export.gguf", "--checkpoint", tmp_path / "nope", "--output", out / "m.gguf")
    assert_one_line_error(r, "nope", "no such run")
    # export: an unknown --dtype
    r = run_cli("export.gguf", "--checkpoint", run_dir, "--output", out / "m.gguf", "--dtype", "q3_k")
    assert_one_line_error(r, "--dtype", "q3_k")
    # read: a GGUF of another architecture
    gpt2 = rewrite_gguf(f32_gguf, tmp_path / "gpt2.gguf", {"general.architecture": ("gpt2",)})
    r = run_cli("export.gguf_read", gpt2, "--output", out / "run1")
    assert_one_line_error(r, "gpt2.gguf", "architecture is 'gpt2'")
    # read: a tensor with the wrong shape
    bad = rewrite_gguf(f32_gguf, tmp_path / "badshape.gguf",
                       tensor=lambda name, a: a[:64] if name == "blk.1.attn_k.weight" else a)
    r = run_cli("export.gguf_read", bad, "--output", out / "run2")
    assert_one_line_error(r, "badshape.gguf", "blk.1.attn_k.weight", "[64, 128]", "expected [128, 128]")
    # read: a non-SentencePiece (BPE) vocabulary
    bpe = rewrite_gguf(f32_gguf, tmp_path / "bpe.gguf", {"tokenizer.ggml.model": ("gpt2", V.STRING)})
    r = run_cli("export.gguf_read", bpe, "--output", out / "run3")
    assert_one_line_error(r, "bpe.gguf", "'gpt2'", "SentencePiece")
    # read: not a GGUF at all, and a missing file
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    assert_one_line_error(run_cli("export.gguf_read", junk, "--output", out / "run4"), "junk.gguf", "GGUF")
    assert_one_line_error(run_cli("export.gguf_read", tmp_path / "missing.gguf", "--output", out / "run5"),
                          "missing.gguf")
    # .pt import: a missing file
    assert_one_line_error(run_cli("export.nanollama", "--from-pt", tmp_path / "checkpoint_step1.pt", "--output",
                                  out / "run6"), "checkpoint_step1.pt")
    assert list(out.iterdir()) == []  # nothing written, not even a temporary file


def test_qk_norm_run_is_refused_by_the_cli(tmp_path, config, params, tokenizer_file):
    import dataclasses

    run = tmp_path / "qk"
    checkpoint.write_params_run(run, dataclasses.replace(config, use_qk_norm=True), params, tokenizer_file)
    r = run_cli("export.gguf", "--checkpoint", run, "--output", tmp_path / "out" / "m.gguf")
    assert_one_line_error(r, "QK-norm")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_failure_mid_write_leaves_no_partial_file(tmp_path, params, config, tokenizer_file, monkeypatch):
    calls = []
    real = G.encode_tensor

    def flaky(a, qtype):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full")
        return real(a, qtype)

    monkeypatch.setattr(G, "encode_tensor", flaky)
    with pytest.raises(OSError, match="disk full"):
        G.write_gguf(params, config, tokenizer_file, tmp_path / "m.gguf", "q8_0", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_row_length_not_fitting_the_block_falls_back_to_f16(tmp_path, tokenizer_file, prompt_ids):
    """ffn_dim 200 is not a multiple of 32: ffn_down rows fall back to F16 (stated), and llama.cpp
    still agrees with the quantise-dequantise reference."""
    from gguf import GGMLQuantizationType as Q, GGUFReader

    c = LlamaConfig(n_layer=1, n_embd=128, n_head=2, n_kv_head=1, vocab_size=VOCAB, sequence_len=128, ffn_dim=200)
    p = random_params(c, seed=1)
    info = G.write_gguf(p, c, tokenizer_file, tmp_path / "m.gguf", "q8_0", progress=False)
    assert info["fallbacks"] == ["blk.0.ffn_down.weight: row length 200 is not a multiple of the Q8_0 block size "
                                 "32; written as F16"]
    types = {t.name: t.tensor_type for t in GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["blk.0.ffn_down.weight"] == Q.F16 and types["blk.0.ffn_up.weight"] == Q.Q8_0
    assert types["blk.0.attn_norm.weight"] == Q.F32
    check_quantised(tmp_path / "m.gguf", our_logits(G.quantized_params(p, c, "q8_0"), c, prompt_ids), prompt_ids,
                    "q8_0 with an F16 fallback")


def test_foreign_gguf_without_our_keys_reads_from_llama_metadata_alone(tmp_path, f32_gguf, params, config, sp):
    """As a GGUF from another converter: no nanollama.* keys, and tied embeddings (no output.weight)."""
    import sentencepiece as spm

    from export.gguf_read import read_gguf

    plain = rewrite_gguf(f32_gguf, tmp_path / "plain.gguf", {G.CONFIG_KEY: None, G.TOKENIZER_KEY: None})
    config2, back, tok = read_gguf(plain)
    assert config2 == config  # every field recovered from llama.* metadata (eps as 1e-5, not its float32)
    assert_params_equal_on_real_rows(back, params, config)
    rebuilt = spm.SentencePieceProcessor(model_proto=tok)
    assert all(rebuilt.encode(t) == sp.encode(t) for t in TEXTS)

    tied = rewrite_gguf(f32_gguf, tmp_path / "tied.gguf", {G.CONFIG_KEY: None}, drop={"output.weight"})
    _, back, _ = read_gguf(tied)
    np.testing.assert_array_equal(back["output"]["kernel"], np.asarray(back["tok_embeddings"]["embedding"]).T)


def test_every_cli_has_help_with_an_example(capsys):
    from export import gguf_read, nanollama

    for mod, example in ((G, "python -m export.gguf --checkpoint"), (gguf_read, "python -m export.gguf_read"),
                         (nanollama, "python -m export.nanollama --from-pt")):
        with pytest.raises(SystemExit) as e:
            mod.main(["--help"])
        assert e.value.code == 0
        assert example in capsys.readouterr().out


def test_export_from_a_step_folder(tmp_path, run_dir, f32_gguf):
    G.main(["--checkpoint", str(run_dir / "checkpoints" / "7"), "--output", str(tmp_path / "m.gguf"), "--dtype", "F32",
            "--quiet"])
    assert (tmp_path / "m.gguf").read_bytes() == f32_gguf.read_bytes()  # deterministic, same bytes
