"""Tokenising documents in worker processes, in order, and writing the ids as token shards
(the format is nanollama_base/shards.py). Used by ``data.prepare``."""

from __future__ import annotations

import collections
import itertools
import math
import multiprocessing
import os
import pathlib
import sys

import numpy as np

from nanollama_base.shards import BOS_ID, DataError

from . import tokenizer as tok

CHUNK_CHARS = 1 << 20  # a worker's unit of work: about 1 MB of text …
CHUNK_DOCS = 2048  # … or this many documents, whichever comes first

# Tokenisation workers: one SentencePiece processor per process, loaded once.

_SP = None
_BOS = BOS_ID


def _init_worker(model: bytes) -> None:
    global _SP, _BOS
    _SP = tok.load(model)
    _BOS = _SP.bos_id()


def is_val_document(index: int, fraction: float) -> bool:
    """Document ``index`` of the stream goes to validation: exactly ``fraction`` of them,
    evenly spread, starting with document 0 (so any corpus of 2+ documents has a val split)."""
    if fraction <= 0:
        return False
    return math.floor((index + 1) * fraction + 1 - fraction) > math.floor(index * fraction + 1 - fraction)


def document_chunks(tagged_documents, val_fraction: float):
    """(text, source index) documents -> chunks of (text, is validation, source index), the unit a
    worker encodes. Document i of the stream is validation by ``is_val_document(i, val_fraction)``."""
    chunk, chars = [], 0
    for index, (doc, src) in enumerate(tagged_documents):
        chunk.append((doc, is_val_document(index, val_fraction), src))
        chars += len(doc)
        if chars >= CHUNK_CHARS or len(chunk) >= CHUNK_DOCS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def encode_chunk(chunk: list[tuple[str, bool, int]]):
    """Encode documents; returns train ids, val ids (BOS before each document) and per-doc stats."""
    texts = [c[0] for c in chunk]
    ids = _SP.encode(texts, num_threads=1)
    n = len(ids)
    lens = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=n)
    is_val = np.fromiter((c[1] for c in chunk), dtype=bool, count=n)
    src = np.fromiter((c[2] for c in chunk), dtype=np.int64, count=n)
    nbytes = np.fromiter((len(t.encode("utf-8")) for t in texts), dtype=np.int64, count=n)
    out = []
    for want_val in (False, True):
        sel = [x for x, v in zip(ids, is_val) if v == want_val]
        total = sum(len(x) + 1 for x in sel)
        arr = np.fromiter(itertools.chain.from_iterable(itertools.chain((_BOS,), x) for x in sel),
                          dtype=np.uint32, count=total)
        out.append(arr)
    return out[0], out[1], lens, is_val, src, nbytes


def jax_running() -> bool:
    """True once JAX has started its runtime (threads) in this process: fork is unsafe then.
    Merely importing jax (grain does) is fine."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
        return bool(getattr(xla_bridge, "_backends", True))
    except Exception:  # pragma: no cover - private API moved: be safe
        return True


def ordered_map(fn, items, workers: int, model: bytes):
    """map(fn, items) in order, over ``workers`` processes, with a bounded number in flight."""
    if workers <= 1:
        _init_worker(model)
        for item in items:
            yield fn(item)
        return
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(model,)) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class ShardWriter:
    """Appends tokens to ``folder/{prefix}_00000.bin`` …, ``shard_size`` tokens each. A shard
    is written under a ``.partial`` name and renamed when full (or at close)."""

    def __init__(self, root: pathlib.Path, split: str, dtype: np.dtype, shard_size: int, vocab_size: int):
        self.root, self.split, self.dtype = root, split, np.dtype(dtype)
        self.shard_size, self.vocab_size = shard_size, vocab_size
        (root / split).mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self._f = None
        self._n = 0

    def _path(self, index: int) -> pathlib.Path:
        return self.root / self.split / f"{self.split}_{index:05d}.bin"

    def write(self, tokens: np.ndarray) -> None:
        if len(tokens) and int(tokens.max()) >= self.vocab_size:
            raise DataError(f"{self.root}: token id {int(tokens.max())} >= vocab size {self.vocab_size}")
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._f is None:
                self._f = open(str(self._path(len(self.shards))) + ".partial", "wb")
                self._n = 0
            take = min(self.shard_size - self._n, len(tokens))
            self._f.write(tokens[:take].tobytes())
            self._n += take
            tokens = tokens[take:]
            if self._n == self.shard_size:
                self._finish()

    def _finish(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        path = self._path(len(self.shards))
        os.replace(str(path) + ".partial", path)
        self.shards.append({"file": f"{self.split}/{path.name}", "tokens": self._n})
        self._f = None
        self._n = 0

    def close(self) -> list[dict]:
        if self._f is not None:
            self._finish()
        return self.shards
