"""The on-disk shard format, shared by the writers (``data.prepare``) and the reader
(``nanollama_jax.input``).

A prepared data folder looks like::

    DIR/meta.json          # written last; its presence means "complete"
    DIR/tokenizer.model    # SentencePiece model (sha256 recorded in meta.json)
    DIR/train/train_00000.bin, ...
    DIR/val/val_00000.bin, ...

Shards are headerless little-endian token ids: ``uint16`` while the vocabulary has at most
65,536 pieces, ``uint32`` above. Every document starts with BOS (id 1).

nanollama's own folders (``train_*.bin`` and ``val_*.bin`` side by side, uint16, no BOS,
a ``meta.json`` with ``dataset, vocab_size, total_tokens, num_shards, shard_size,
num_samples, tokenizer_dir``) are read as they are by :func:`load_meta`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import numpy as np

from .files import sha256_file

FORMAT_NAME = "nanollama-jax-shards"
FORMAT_VERSION = 1
UINT16_MAX_VOCAB = 65536
DEFAULT_SHARD_SIZE = 10_000_000
BOS_ID, EOS_ID, UNK_ID, PAD_ID = 1, 2, 0, -1


class DataError(ValueError):
    """Bad data input. The message is one line naming the file and the problem."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65536), uint32 above. Always little-endian."""
    if vocab_size <= 0:
        raise ValueError(f"vocab size must be positive, got {vocab_size}")
    return np.dtype("<u2") if vocab_size <= UINT16_MAX_VOCAB else np.dtype("<u4")


def dtype_name(dtype: np.dtype) -> str:
    return {2: "uint16", 4: "uint32"}[np.dtype(dtype).itemsize]


def parse_dtype(name: str, where: str) -> np.dtype:
    table = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
    if name not in table:
        raise DataError(f"{where}: unsupported dtype {name!r} (expected uint16 or uint32)")
    return table[name]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_json(path: pathlib.Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: missing (not a prepared data folder; run `python -m data.prepare`)") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: corrupt JSON ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: corrupt (expected a JSON object)")
    return obj


def _shard_entry(path: pathlib.Path, dtype: np.dtype, expected: int | None) -> dict:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path}: shard listed in meta.json is missing") from None
    if size % dtype.itemsize:
        raise DataError(
            f"{path}: truncated shard ({size} bytes is not a multiple of {dtype.itemsize}-byte "
            f"{dtype_name(dtype)} tokens)")
    tokens = size // dtype.itemsize
    if expected is not None and tokens < expected:
        raise DataError(
            f"{path}: truncated shard ({tokens} tokens on disk, meta.json says {expected})")
    if expected is not None:
        tokens = expected
    return {"path": path, "tokens": tokens}


def _find_tokenizer(data_dir: pathlib.Path, tokenizer_dir: str | None) -> pathlib.Path | None:
    candidates = []
    if tokenizer_dir:
        t = pathlib.Path(tokenizer_dir).expanduser()
        if not t.is_absolute():
            candidates += [data_dir / t]
        candidates += [t]
        candidates = [c / "tokenizer.model" for c in candidates] + candidates
    candidates.append(data_dir / "tokenizer.model")
    for c in candidates:
        if c.is_file():
            return c
    return None


def load_meta(data_dir: str | os.PathLike, *, verify_tokenizer: bool = True) -> dict:
    """A normalised view of a data folder's meta.json, ours or nanollama's.

    Returns a dict with: ``kind`` ("nanollama-jax" or "nanollama"), ``dir``, ``dtype``
    (numpy dtype), ``vocab_size``, ``bos_id``, ``eos_id``, ``bos_per_document``,
    ``tokenizer_path`` (Path or None), ``tokenizer_sha256`` (str or None), ``train`` and
    ``val`` (each ``{"shards": [{"path", "tokens"}], "tokens", "documents", "bytes"}``;
    bytes/documents may be None) and ``raw`` (the file's JSON). Shard sizes are checked:
    a shard that is not a whole number of tokens or shorter than meta.json says is a
    :class:`DataError` naming the file. With ``verify_tokenizer``, a tokenizer.model whose
    sha256 differs from the one recorded is a DataError too.
    """
    data_dir = pathlib.Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder not found")
    meta_path = data_dir / "meta.json"
    raw = read_json(meta_path)
    if raw.get("format") == FORMAT_NAME:
        return _load_ours(data_dir, meta_path, raw, verify_tokenizer)
    if "vocab_size" in raw and ("total_tokens" in raw or "num_shards" in raw or "shard_size" in raw):
        return _load_nanollama(data_dir, meta_path, raw)
    raise DataError(f"{meta_path}: not a recognised meta.json (neither nanollama-jax nor nanollama format)")


def _load_ours(data_dir, meta_path, raw, verify_tokenizer) -> dict:
    version = raw.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DataError(f"{meta_path}: unsupported format_version {version!r} (this code reads <= {FORMAT_VERSION})")
    try:
        dtype = parse_dtype(raw["dtype"], str(meta_path))
        vocab = int(raw["vocab_size"])
        splits = {}
        for split in ("train", "val"):
            s = raw.get(split) or {"shards": [], "tokens": 0, "documents": 0, "bytes": 0}
            shards = [_shard_entry(data_dir / e["file"], dtype, int(e["tokens"])) for e in s["shards"]]
            splits[split] = {
                "shards": shards,
                "tokens": sum(e["tokens"] for e in shards),
                "documents": s.get("documents"),
                "bytes": s.get("bytes"),
            }
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{meta_path}: corrupt ({type(e).__name__}: {e})") from None
    if dtype.itemsize < dtype_for_vocab(vocab).itemsize:
        raise DataError(f"{meta_path}: dtype {raw['dtype']} cannot hold vocab_size {vocab}")
    tok = data_dir / raw.get("tokenizer", "tokenizer.model")
    sha = raw.get("tokenizer_sha256")
    if not tok.is_file():
        raise DataError(f"{tok}: tokenizer missing from the data folder")
    if verify_tokenizer and sha:
        actual = sha256_file(tok)
        if actual != sha:
            raise DataError(
                f"{tok}: tokenizer sha256 {actual[:12]}… differs from meta.json's {sha[:12]}… "
                "(shards were made with another tokenizer)")
    return {
        "kind": "nanollama-jax", "dir": data_dir, "dtype": dtype, "vocab_size": vocab,
        "bos_id": int(raw.get("bos_id", BOS_ID)), "eos_id": int(raw.get("eos_id", EOS_ID)),
        "bos_per_document": bool(raw.get("bos_per_document", True)),
        "tokenizer_path": tok, "tokenizer_sha256": sha,
        "train": splits["train"], "val": splits["val"], "raw": raw,
    }


def _load_nanollama(data_dir, meta_path, raw) -> dict:
    dtype = np.dtype("<u2")
    try:
        vocab = int(raw["vocab_size"])
    except (TypeError, ValueError):
        raise DataError(f"{meta_path}: corrupt vocab_size {raw.get('vocab_size')!r}") from None
    if vocab > UINT16_MAX_VOCAB:
        raise DataError(f"{meta_path}: nanollama folders are uint16, but vocab_size is {vocab}")
    splits = {}
    for split in ("train", "val"):
        files = sorted(data_dir.glob(f"{split}_*.bin"))
        if split == "train" and not files:
            # Very old layouts name training shards shard_XXXX.bin.
            files = sorted(data_dir.glob("shard_*.bin"))
        shards = [_shard_entry(f, dtype, None) for f in files]
        splits[split] = {"shards": shards, "tokens": sum(e["tokens"] for e in shards),
                         "documents": None, "bytes": raw.get(f"{split}_bytes")}
    total = raw.get("total_tokens")
    on_disk = splits["train"]["tokens"] + splits["val"]["tokens"]
    if isinstance(total, int) and on_disk < total:
        raise DataError(f"{data_dir}: truncated shards ({on_disk} tokens on disk, meta.json total_tokens says {total})")
    tok = _find_tokenizer(data_dir, raw.get("tokenizer_dir"))
    return {
        "kind": "nanollama", "dir": data_dir, "dtype": dtype, "vocab_size": vocab,
        "bos_id": BOS_ID, "eos_id": EOS_ID, "bos_per_document": False,
        "tokenizer_path": tok, "tokenizer_sha256": sha256_file(tok) if tok else None,
        "train": splits["train"], "val": splits["val"], "raw": raw,
    }
