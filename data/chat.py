"""The one chat format (Llama 3's) used everywhere: SFT, the chat CLI, every GGUF, the Go engine.

A conversation of messages ``{"role": "system"|"user"|"assistant", "content": str}`` renders as

    <s> <|start_header_id|> "user" <|end_header_id|> "\\n\\n" + content.strip() <|eot_id|> …
        [<|start_header_id|> "assistant" <|end_header_id|> "\\n\\n"]   (the generation prompt)

which is exactly llama.cpp's built-in ``llama3`` formatting (``llama_chat_apply_template``) and the
Jinja in ``CHAT_TEMPLATE`` (written into every GGUF as ``tokenizer.chat_template``), tokenised the way
llama.cpp tokenises a prompt with special tokens parsed: BOS first, each special token its own id, and
each run of text between them encoded as ordinary text on its own (so SentencePiece's dummy-prefix
space is added to every such fragment, as llama.cpp adds it after every special token).

The three chat tokens are SentencePiece CONTROL pieces: one piece each, never produced from ordinary
text (a literal "<|eot_id|>" typed by a user tokenises as characters). A tokenizer trained by
``data.prepare`` has them as its last three pieces; an older tokenizer is extended by appending them,
which leaves every ordinary id unchanged. Code finds them by their strings, never by fixed ids
(an imported Llama 3 tokenizer has them elsewhere). Generation ends at ``<|eot_id|>`` (or EOS).
"""

from __future__ import annotations

import json
import pathlib
from typing import Iterable, Iterator

from nanollama_base.shards import DataError

START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
END_OF_TURN = "<|eot_id|>"
CHAT_TOKENS = (START_HEADER, END_HEADER, END_OF_TURN)
ROLES = ("system", "user", "assistant")
# What llama.cpp's trim() and Jinja's |trim remove alike (ASCII whitespace).
_TRIM = " \t\n\r\f\v"

# Meta's Llama 3 template; bos_token is the tokenizer's BOS ("<s>" here).
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


class ChatError(DataError):
    """A conversation or chat file that cannot be used."""


# ---------------------------------------------------------------------------------------
# The tokens in a SentencePiece model

def missing_chat_tokens(model: bytes) -> list[str]:
    """The chat tokens a serialized SentencePiece model lacks; raises if one exists but is not CONTROL."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model)
    types = {p.piece: p.type for p in proto.pieces}
    for t in CHAT_TOKENS:
        if t in types and types[t] != pb.ModelProto.SentencePiece.CONTROL:
            raise ChatError(f"tokenizer has {t!r} as an ordinary piece, so text could produce it; "
                            "it cannot be used as a chat token (retrain the tokenizer with data.prepare)")
    return [t for t in CHAT_TOKENS if t not in types]


def add_chat_tokens(model: bytes) -> bytes:
    """The model with the missing chat tokens appended as CONTROL pieces (ordinary ids unchanged)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    missing = missing_chat_tokens(model)
    if not missing:
        return model
    proto = pb.ModelProto()
    proto.ParseFromString(model)
    for t in missing:
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = t, 0.0, pb.ModelProto.SentencePiece.CONTROL
    return proto.SerializeToString()


class ChatTokens:
    """The ids of the chat tokens (and BOS/EOS) in a loaded SentencePieceProcessor."""

    def __init__(self, sp):
        ids = [sp.piece_to_id(t) for t in CHAT_TOKENS]
        if any(i == sp.unk_id() for i in ids):
            raise ChatError("tokenizer has no chat tokens "
                            f"({', '.join(CHAT_TOKENS)}); extend it with data.chat.add_chat_tokens")
        self.start_header, self.end_header, self.end_of_turn = ids
        self.bos, self.eos = sp.bos_id(), sp.eos_id()
        self.stop = tuple(i for i in (self.end_of_turn, self.eos) if i >= 0)


# ---------------------------------------------------------------------------------------
# Rendering

def check_messages(messages, where: str = "conversation") -> list[dict]:
    """Validated messages: a non-empty list of {"role": system|user|assistant, "content": str}."""
    if not isinstance(messages, list) or not messages:
        raise ChatError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise ChatError(f"{where}: message {i} needs a role ({'/'.join(ROLES)}) and a string content")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def render(sp, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
    """Token ids of the conversation and, per token, whether SFT trains on it (True on the content
    and the closing <|eot_id|> of every assistant message; the headers are prompt)."""
    tok = ChatTokens(sp)
    ids, train = [tok.bos], [False]

    def add(new, learn):
        ids.extend(new)
        train.extend([learn] * len(new))

    for m in messages:
        add([tok.start_header], False)
        add(sp.encode(m["role"]), False)
        add([tok.end_header], False)
        learn = m["role"] == "assistant"
        add(sp.encode("\n\n" + m["content"].strip(_TRIM)), learn)
        add([tok.end_of_turn], learn)
    if add_generation_prompt:
        add([tok.start_header], False)
        add(sp.encode("assistant"), False)
        add([tok.end_header], False)
        add(sp.encode("\n\n"), False)
    return ids, train


def render_prompt(sp, messages: list[dict]) -> list[int]:
    """Ids that ask for the next assistant message (the conversation + the generation prompt)."""
    return render(sp, messages, add_generation_prompt=True)[0]


# ---------------------------------------------------------------------------------------
# Chat files

def conversation_from(record, where: str) -> list[dict]:
    """One JSONL record: {"messages": [...]} (OpenAI style) or a plain {"user": ..., "assistant": ...}
    pair (an optional "system" too)."""
    if isinstance(record, dict) and "messages" in record:
        msgs = check_messages(record["messages"], where)
    elif isinstance(record, dict) and "user" in record and "assistant" in record:
        msgs = [{"role": r, "content": record[r]} for r in ("system", "user", "assistant") if r in record]
        msgs = check_messages(msgs, where)
    else:
        raise ChatError(f"{where}: expected {{\"messages\": [...]}} or {{\"user\": ..., \"assistant\": ...}}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ChatError(f"{where}: no assistant message to learn from")
    return msgs


def read_chats(path: str | pathlib.Path) -> Iterator[list[dict]]:
    """The conversations of a JSONL chat file, one per non-blank line."""
    path = pathlib.Path(path)
    try:
        lines: Iterable[str] = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ChatError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ChatError(f"{path}: not UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ChatError(f"{path}: line {n}: not JSON ({e.msg})") from None
        yield conversation_from(record, f"{path}: line {n}")
