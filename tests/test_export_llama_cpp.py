"""Export to GGUF: the file's metadata and tensors, and llama.cpp (built by llama-cpp-python, in a child
process) running the export exactly like our model: F32, quantised, tokenizer, a trained model."""
import numpy as np
import pytest

from export import gguf as G
from nanollama_jax import checkpoint
from nanollama_jax.config import LlamaConfig

from native import llama_cpp_tokenize

from export_fixtures import (  # noqa: F401 (pytest fixtures, requested by name)
    PROMPT, TEXTS, VOCAB, F32_TOL, check_quantised, llama_cpp_logits, our_logits, random_params, run_cli,
    config, corpus, f32_gguf, params, prompt_ids, run_dir, sp, tokenizer_file,
)


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
