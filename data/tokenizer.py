"""SentencePiece BPE training with the settings llama.cpp can reproduce.

ids: unk 0, ``<s>`` (BOS) 1, ``</s>`` (EOS) 2, no pad; bytes are ids 3-258 (byte_fallback); the
last three pieces are the chat tokens of ``data/chat.py`` (CONTROL pieces: never produced from text);
digits split; identity normalisation with extra whitespace kept, so decoding gives back the
exact text (the one exception: a literal U+2581 "▁" in the input decodes as a space,
because SentencePiece uses that character for spaces).
"""

from __future__ import annotations

import io
from typing import Iterable, Iterator

from nanollama_base.shards import DataError

from .chat import CHAT_TOKENS, add_chat_tokens

DEFAULT_VOCAB_SIZE = 32000


class NoText(DataError):
    """The documents held no text to train a tokenizer on."""

TOKENIZER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    character_coverage=0.9995,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    max_sentence_length=16384,
)
TRAIN_SEED = 1234
# Text used to train the tokenizer at most (a random sample of lines beyond this).
DEFAULT_TOKENIZER_CHARS = 300_000_000
MAX_TRAINING_LINES = 10_000_000


def _lines(documents: Iterable[str], max_chars: int) -> Iterator[str]:
    used = 0
    for doc in documents:
        for line in doc.split("\n"):
            if line:
                yield line
                used += len(line) + 1
        if used >= max_chars:
            return


def train(documents: Iterable[str], vocab_size: int, *, threads: int = 1,
          max_chars: int = DEFAULT_TOKENIZER_CHARS, log=None) -> bytes:
    """Train a BPE model on the documents' lines; returns the serialized model, ``vocab_size`` pieces
    of which the last three are the chat tokens (appended, so byte and ordinary ids stay put)."""
    import sentencepiece as spm

    spm.set_random_generator_seed(TRAIN_SEED)
    lines = list(_lines(documents, max_chars))
    if not lines:
        raise NoText("tokenizer: no text to train on")
    if log:
        chars = sum(len(x) + 1 for x in lines)
        log(f"  {len(lines):,} lines, {chars / 1e6:,.1f}M characters of training text"
            + (" (capped; the rest is only tokenised)" if chars >= max_chars else ""))
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=out, vocab_size=vocab_size - len(CHAT_TOKENS),
            num_threads=max(1, threads), minloglevel=2,
            input_sentence_size=MAX_TRAINING_LINES, shuffle_input_sentence=True,
            **TOKENIZER_OPTIONS)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        import re

        small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
        if small:
            raise DataError(f"tokenizer: --vocab-size {vocab_size} is too small for this text's characters "
                            f"plus the 262 special, chat and byte pieces; use at least "
                            f"{int(small.group(2)) + len(CHAT_TOKENS)}") from None
        high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
        if high:
            raise DataError(f"tokenizer: corpus too small for --vocab-size {vocab_size}; "
                            f"use at most "
                            f"{int(high.group(2)) + len(CHAT_TOKENS)} or add text") from None
        raise DataError(f"tokenizer: SentencePiece training failed ({msg})") from None
    return add_chat_tokens(_normalise(out.getvalue()))


def _normalise(model: bytes) -> bytes:
    """The model records the trainer's thread count; pin it so the file's bytes depend
    only on the text and options (the pieces themselves do not depend on threads)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:  # pragma: no cover - protobuf comes with grain
        return model
    proto = pb.ModelProto()
    proto.ParseFromString(model)
    proto.trainer_spec.num_threads = 1
    return proto.SerializeToString()


def load(model: bytes | str):
    import sentencepiece as spm

    if isinstance(model, (bytes, bytearray)):
        return spm.SentencePieceProcessor(model_proto=bytes(model))
    return spm.SentencePieceProcessor(model_file=str(model))
