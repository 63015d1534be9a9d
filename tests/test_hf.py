"""The HF export declares the real vocabulary: transformers can never sample a padding id, the
special ids are the tokenizer's, and the import restores the padding rows."""
import io
import itertools
import json

import jax
import numpy as np
import pytest

from nanollama_jax import model as M
from nanollama_jax.config import LlamaConfig

VOCAB = 970  # padded to 1024: 54 padding ids


def trained_like_params(config, seed=0):
    """Init with a broad output head over the real vocabulary; the padding rows stay zero, as
    training keeps them (the model masks them, so they get no gradient)."""
    p = jax.tree_util.tree_map(np.array, M.init_params(config, seed))
    head = np.random.default_rng(seed).normal(0, 0.02, p["output"]["kernel"].shape).astype(np.float32)
    head[:, config.vocab_size:] = 0.0
    p["output"]["kernel"] = head
    return p


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from data import builtin, tokenizer

    from export.hf import save_hf

    tmp = tmp_path_factory.mktemp("hf")
    tok = tmp / "tokenizer.model"
    tok.write_bytes(tokenizer.train(list(itertools.islice(builtin.documents(), 150)), VOCAB))
    config = LlamaConfig(n_layer=2, n_embd=128, n_head=2, n_kv_head=1, vocab_size=VOCAB, sequence_len=128)
    params = trained_like_params(config)
    save_hf(params, config, tmp / "hf", tok)
    return config, params, tmp / "hf"


def test_config_declares_the_real_vocabulary_and_the_tokenizers_ids(exported):
    import sentencepiece as spm

    config, _, out = exported
    cfg = json.loads((out / "config.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert cfg["vocab_size"] == VOCAB and "nanollama_vocab_size" not in cfg
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (sp.bos_id(), sp.eos_id(), None)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"]) == (sp.id_to_piece(sp.bos_id()), sp.id_to_piece(sp.eos_id()))


def test_transformers_generate_never_emits_a_padding_id(exported):
    import torch
    from transformers import LlamaForCausalLM

    config, params, out = exported
    model = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    prompt = torch.tensor([[1, 100, 200, 300]])
    with torch.no_grad():
        assert model(prompt).logits.shape[-1] == VOCAB
        emitted = []
        for seed in range(4):
            torch.manual_seed(seed)
            ids = model.generate(prompt, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=48,
                                 eos_token_id=None, pad_token_id=0)
            emitted += ids[0, prompt.shape[1]:].tolist()
    assert len(emitted) == 4 * 48
    assert max(emitted) < VOCAB, sorted(set(i for i in emitted if i >= VOCAB))
    # the sampling is broad: with the 54 padding ids declared, about 5% of these draws would be padding
    assert len(set(emitted)) > 100


def test_import_restores_the_padding_rows(exported):
    from export.hf import load_hf

    config, params, out = exported
    config_back, back = load_hf(out)
    assert config_back == config
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(back)):
        assert np.array_equal(a, np.asarray(b))  # padding rows were zero and come back zero


def test_special_ids_follow_the_tokenizer_and_its_size_is_checked(tmp_path):
    import sentencepiece as spm

    from export.hf import hf_config

    model = io.BytesIO()
    text = ["a few words of text to learn pieces from, repeated with numbers %d" % i for i in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=40,
                                   unk_id=3, bos_id=0, eos_id=2, pad_id=1)
    tok = tmp_path / "other.model"
    tok.write_bytes(model.getvalue())
    config = LlamaConfig(n_layer=1, n_embd=64, n_head=1, n_kv_head=1, vocab_size=40)
    cfg = hf_config(config, tok)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (0, 2, 1)
    with pytest.raises(ValueError, match="has 40 pieces but the model's vocab_size is 41"):
        hf_config(LlamaConfig(n_layer=1, n_embd=64, n_head=1, n_kv_head=1, vocab_size=41), tok)
