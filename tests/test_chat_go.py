"""Issue 15: the Go engine's chat template against llama.cpp's own chat formatting, and the end of turn.

A SentencePiece vocabulary trained here (tests/go_fixtures.py) gets the chat tokens of the contract
(`<|start_header_id|>`, `<|end_header_id|>`, `<|eot_id|>`) appended as CONTROL pieces, and a GGUF carries it
with the Llama 3 template in `tokenizer.chat_template`. The same conversations are rendered to token ids by
the Go engine (`--messages FILE --tokenize`) and by llama.cpp twice — its built-in template
(`llama_chat_apply_template`, then tokenised with special tokens parsed) and llama-cpp-python's Jinja
formatter running the template text — all in child processes (tests/native.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import go_fixtures as F  # noqa: E402
import native  # noqa: E402

CHAT_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# The contract's template (Meta's Llama 3 template), as every GGUF we export carries it.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "You are a quick brown fox."},
     {"role": "user", "content": "What is the model? "},
     {"role": "assistant", "content": "\nThe model is small, 3.14 times the data.\n"},
     {"role": "user", "content": "  Café über naïve (x) a-b 2026!?\n\n"}],
    [{"role": "user", "content": "the lazy dog\n\nover the river"}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "日本語 привет"}],
]


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    return F.build_engine(tmp_path_factory.mktemp("gobin"))


@pytest.fixture(scope="module")
def chat_vocab(tmp_path_factory):
    tokens, scores, types = F.sp_vocab(F.train_sp(tmp_path_factory.mktemp("sp")))
    control = 3  # gguf.TokenType.CONTROL
    return tokens + CHAT_TOKENS, scores + [0.0] * 3, types + [control] * 3


def _params(vocab, chain=()):
    """Small random weights; `chain` (token ids t0, t1, …) makes greedy decoding follow t0 → t1 → …: with the
    attention and FFN outputs zero, the last hidden state is the last token's normalised embedding, and
    output row t(k+1) is a multiple of embedding t(k)."""
    p = F.random_params(vocab=len(vocab[0]), dim=64, n_layer=1, n_head=4, n_kv=2, head_dim=16, ffn=128, seed=3)
    if chain:
        p["blk.0.attn_output.weight"][:] = 0
        p["blk.0.ffn_down.weight"][:] = 0
        p["output_norm.weight"][:] = 1
        p["output.weight"][:] = 0
        emb = p["token_embd.weight"]
        for a, b in zip(chain, chain[1:]):
            p["output.weight"][b] = 10 * emb[a] / np.linalg.norm(emb[a])
    return p


def _write(path, vocab, params, template=LLAMA3):
    meta = {"tokenizer.ggml.eot_token_id": vocab[0].index("<|eot_id|>")}
    if template is not None:
        meta["tokenizer.chat_template"] = template
    return F.write_model(path, params, vocab, metadata=meta)


def go_chat_ids(engine, model, messages, tmp_path) -> list[int]:
    conv = tmp_path / "conversation.json"
    conv.write_text(json.dumps(messages))
    r = native.run_go(engine, "--model", model, "--messages", conv, "--tokenize")
    return [int(x) for x in r.stdout.split()]


def test_same_conversation_same_ids_in_go_and_llama_cpp(engine, chat_vocab, tmp_path):
    model = _write(tmp_path / "chat.gguf", chat_vocab, _params(chat_vocab))
    ref = native.llama_cpp_chat_ids(model, [{"messages": m, "add_generation_prompt": True} for m in CONVERSATIONS])
    tokens = chat_vocab[0]
    for messages, want in zip(CONVERSATIONS, ref):
        assert want["builtin"] == want["jinja"], want["text"]  # llama.cpp agrees with itself first
        got = go_chat_ids(engine, model, messages, tmp_path)
        assert got == want["builtin"], (want["text"], [tokens[i] for i in got], [tokens[i] for i in want["builtin"]])
        # each chat token is one id, never its spelling; the prompt ends asking the assistant
        ids = {t: tokens.index(t) for t in CHAT_TOKENS}
        assert got.count(ids["<|eot_id|>"]) == len(messages) and got[0] == 1
        assert got.count(ids["<|start_header_id|>"]) == len(messages) + 1
        assert tokens[got[-1]] == "<0x0A>" and ids["<|end_header_id|>"] in got[-4:]


def test_chat_answer_stops_at_end_of_turn(engine, chat_vocab, tmp_path):
    """Greedy decoding is wired to go newline → ▁the → ▁fox → <|eot_id|> → ▁dog: `--chat` answers " the fox"
    and stops at the end of turn (without that stop, " dog" would follow)."""
    tokens = chat_vocab[0]
    chain = [tokens.index(t) for t in ("<0x0A>", "\u2581the", "\u2581fox", "<|eot_id|>", "\u2581dog")]
    model = _write(tmp_path / "chain.gguf", chat_vocab, _params(chat_vocab, chain))
    r = native.run_go(engine, "--model", model, "--chat", "--prompt", "Say it.", "--temp", "0", "--max-tokens", "8")
    assert r.stdout.strip() == "the fox", (r.stdout, r.stderr)
    r = native.run_go(engine, "--model", model, "--prompt", "\n", "--temp", "0", "--max-tokens", "3")
    assert r.stdout.strip() == "the fox", r.stdout  # a plain completion stops there too
    r = native.run_go(engine, "--model", model, "--prompt", "\n", "--temp", "0", "--max-tokens", "4", "--ignore-eos")
    assert r.stdout.strip() == "the fox dog", r.stdout  # the chain goes on past the end of turn


def test_unknown_template_falls_back_to_plain_with_one_warning(engine, chat_vocab, tmp_path):
    chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}"
    model = _write(tmp_path / "chatml.gguf", chat_vocab, _params(chat_vocab), template=chatml)
    conv = tmp_path / "c.json"
    conv.write_text(json.dumps(CONVERSATIONS[1]))
    r = native.run_go(engine, "--model", model, "--messages", conv, "--tokenize")
    assert r.stderr.count("warning: chat uses plain text") == 1 and "not the Llama 3 template" in r.stderr
    plain = "".join(m["content"] + "\n\n" for m in CONVERSATIONS[1])
    [want] = native.llama_cpp_tokenize(model, [plain])
    assert [int(x) for x in r.stdout.split()] == want


def test_bad_conversation_file_is_one_clear_line(engine, chat_vocab, tmp_path):
    model = _write(tmp_path / "chat.gguf", chat_vocab, _params(chat_vocab))
    for content, word in (("{", "not a JSON array"), ("[]", "the conversation is empty"),
                          ('[{"role": "user"}]', 'needs a "role" and a "content"'),
                          ('[{"role": "tool", "content": "x"}]', 'role "tool" is not supported')):
        conv = tmp_path / "bad.json"
        conv.write_text(content)
        r = native.run_go(engine, "--model", model, "--messages", conv, "--tokenize", check=False)
        assert r.returncode == 1 and word in r.stderr and str(conv) in r.stderr, (content, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
