"""Issue 15 items 1-2: the chat tokens are single CONTROL pieces every export keeps, and one
conversation gives the same token ids in our renderer (data/chat.py) and in llama.cpp's own
formatting of the GGUF's tokenizer.chat_template (its C++ llama3 formatter and llama-cpp-python's
Jinja chat handler, in a child process)."""
import itertools

import jax
import numpy as np
import pytest
import sentencepiece as spm

from data import builtin
from data.chat import CHAT_TEMPLATE, CHAT_TOKENS, END_OF_TURN, ChatError, add_chat_tokens, render
from export.gguf import write_gguf
from nanollama_jax import model as M
from nanollama_jax.config import LlamaConfig
from native import llama_cpp_chat_ids, llama_cpp_tokenize

VOCAB = 448  # the size of conftest's chat_tokenizer_file
CONVERSATIONS = [
    [{"role": "user", "content": "What does json.dumps do?"}],
    [{"role": "system", "content": "  You answer briefly.\n"},
     {"role": "user", "content": "Hi there!\n\nTwo lines, tabs\tand <b>markup</b> typed as text."},
     {"role": "assistant", "content": "Hello. 12345 ok\n"},
     {"role": "user", "content": "ünïcödé ✓"}],
]


@pytest.fixture(scope="module")
def gguf(chat_tokenizer_file, tmp_path_factory):
    config = LlamaConfig(n_layer=1, n_embd=64, n_head=2, n_kv_head=2, vocab_size=VOCAB, sequence_len=128)
    out = tmp_path_factory.mktemp("gguf") / "m.gguf"
    write_gguf(jax.tree_util.tree_map(np.asarray, M.init_params(config, 0)), config, chat_tokenizer_file, out,
               progress=False)
    return out


def test_trained_tokenizer_has_the_chat_tokens_last_as_control_pieces(chat_tokenizer_file):
    sp = spm.SentencePieceProcessor(model_file=str(chat_tokenizer_file))
    assert sp.get_piece_size() == VOCAB
    assert [sp.id_to_piece(i) for i in range(VOCAB - 3, VOCAB)] == list(CHAT_TOKENS)
    assert all(sp.is_control(i) for i in range(VOCAB - 3, VOCAB))
    assert [sp.id_to_piece(i) for i in range(3, 259)] == [f"<0x{b:02X}>" for b in range(256)]  # bytes stay put
    text = "".join(CHAT_TOKENS) + " <|eot_id|>"
    assert not set(sp.encode(text)) & set(range(VOCAB - 3, VOCAB))  # never produced from text


def test_an_old_tokenizer_is_extended_without_changing_ordinary_ids(chat_tokenizer_file):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(chat_tokenizer_file.read_bytes())
    del proto.pieces[-3:]  # a tokenizer from before the chat tokens
    old = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    new = spm.SentencePieceProcessor(model_proto=add_chat_tokens(proto.SerializeToString()))
    text = "Return a JSON string.\n  x = 42 <|eot_id|>"
    assert new.encode(text) == old.encode(text)
    assert new.get_piece_size() == old.get_piece_size() + 3 and new.piece_to_id(END_OF_TURN) == VOCAB - 1
    proto.pieces[-1].piece = END_OF_TURN  # an ordinary piece spelled like the token: refused
    with pytest.raises(ChatError, match="ordinary piece"):
        add_chat_tokens(proto.SerializeToString())


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renderer_equals_llama_cpp_formatting(chat_tokenizer_file, gguf, add_generation_prompt):
    from gguf import GGUFReader

    assert GGUFReader(gguf).fields["tokenizer.chat_template"].contents() == CHAT_TEMPLATE
    sp = spm.SentencePieceProcessor(model_file=str(chat_tokenizer_file))
    ours = [render(sp, c, add_generation_prompt)[0] for c in CONVERSATIONS]
    theirs = llama_cpp_chat_ids(gguf, [{"messages": c, "add_generation_prompt": add_generation_prompt}
                                       for c in CONVERSATIONS])
    assert [t["builtin"] for t in theirs] == ours
    assert [t["jinja"] for t in theirs] == ours



def test_gguf_keeps_the_chat_tokens_as_control(gguf, chat_tokenizer_file):
    from gguf import GGUFReader, TokenType

    r = GGUFReader(gguf)
    tokens = [bytes(r.fields["tokenizer.ggml.tokens"].parts[i]).decode() for i in r.fields["tokenizer.ggml.tokens"].data]
    types = [int(r.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in r.fields["tokenizer.ggml.token_type"].data]
    for t in CHAT_TOKENS:
        assert types[tokens.index(t)] == TokenType.CONTROL
    eot = r.fields["tokenizer.ggml.eot_token_id"]
    assert int(eot.parts[eot.data[0]][0]) == tokens.index(END_OF_TURN)
    # llama.cpp does not make them from text either
    assert not set(llama_cpp_tokenize(gguf, ["<|eot_id|> hi"])[0]) & {tokens.index(t) for t in CHAT_TOKENS}


def test_gguf_read_back_keeps_the_chat_tokens(gguf, chat_tokenizer_file):
    from export.gguf_read import read_gguf

    _, _, model = read_gguf(gguf)
    sp = spm.SentencePieceProcessor(model_proto=model)
    assert all(sp.is_control(sp.piece_to_id(t)) for t in CHAT_TOKENS)
    assert render(sp, CONVERSATIONS[1], True) == render(spm.SentencePieceProcessor(model_file=str(chat_tokenizer_file)),
                                                         CONVERSATIONS[1], True)


@pytest.mark.parametrize("fast", [False, True])
def test_hf_export_renders_the_same_ids_in_transformers(chat_tokenizer_file, tmp_path, fast):
    from transformers import AutoTokenizer

    from export.hf import save_hf

    config = LlamaConfig(n_layer=1, n_embd=64, n_head=2, n_kv_head=2, vocab_size=VOCAB, sequence_len=128)
    save_hf(jax.tree_util.tree_map(np.asarray, M.init_params(config, 0)), config, tmp_path / "hf", chat_tokenizer_file)
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf", use_fast=fast)
    sp = spm.SentencePieceProcessor(model_file=str(chat_tokenizer_file))
    for conv in CONVERSATIONS:
        theirs = hf.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
        theirs = theirs["input_ids"] if not isinstance(theirs, list) else theirs
        assert list(theirs) == render(sp, conv, True)[0]


def test_prepare_with_an_old_tokenizer_appends_the_chat_tokens(chat_tokenizer_file, tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    from data.prepare import prepare
    from nanollama_base.shards import load_meta

    proto = pb.ModelProto()
    proto.ParseFromString(chat_tokenizer_file.read_bytes())
    del proto.pieces[-3:]
    (tmp_path / "old.model").write_bytes(proto.SerializeToString())
    text = "\n".join(itertools.islice(builtin.documents(), 5))
    (tmp_path / "in.txt").write_text(text)
    lines = []
    prepare(tmp_path / "out", inputs=[tmp_path / "in.txt"], tokenizer_file=tmp_path / "old.model", val_fraction=0,
            progress=False, log=lines.append)
    assert any("added the chat tokens" in x for x in lines), lines
    meta = load_meta(tmp_path / "out")
    assert meta["vocab_size"] == VOCAB
    old = spm.SentencePieceProcessor(model_file=str(tmp_path / "old.model"))
    new = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    assert new.encode(text) == old.encode(text) and new.piece_to_id(END_OF_TURN) == VOCAB - 1
