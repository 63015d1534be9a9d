"""Shared fixtures and helpers of the data pipeline tests (test_data_*.py): a small corpus of tricky and
English-ish documents, that corpus prepared, nanollama-format folders made on the spot, shard readers and
the `data.prepare` CLI in a child process."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from data.prepare import prepare

REPO = pathlib.Path(__file__).resolve().parents[1]
PY = sys.executable
VOCAB = 400

TRICKY = [
    "  two leading spaces, then text.\n\nA paragraph after a blank line.",
    "\nstarts with a newline and ends with spaces   ",
    "tabs\there\tand\r\nCRLF line ends\r\n",
    "unicode: ünïcödé, 日本語, emoji 🦙, math ∑x², nbsp\u00a0here",
    "digits 1234567890 and 3.14159 and x=42",
    "trailing newline\n",
]


def _english(n_docs, seed):
    """Deterministic English-ish documents from Python's own help topics."""
    import pydoc_data.topics as topics

    keys = sorted(topics.topics)
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n_docs):
        text = topics.topics[keys[int(rng.integers(len(keys)))]]
        start = int(rng.integers(max(1, len(text) - 1500)))
        doc = text[start:start + 200 + int(rng.integers(1200))].replace("\n\n\n", "\n\n").strip("\n")
        docs.append(doc or f"document {i}")
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs_a = _english(60, 0)
    (root / "a.txt").write_text("\n\n\n".join(docs_a), encoding="utf-8")
    with open(root / "b.jsonl", "w", encoding="utf-8") as f:
        for d in TRICKY + _english(20, 1):
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
        f.write("\n")  # a blank line is skipped
    return root


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "data"
    prepare(out, inputs=[corpus], vocab_size=VOCAB, val_fraction=0.1, shard_size=5000, workers=1,
            progress=False, log=lambda m: None)
    return out


def _split_docs(ids, bos=1):
    ids = np.asarray(ids)
    assert ids[0] == bos, "every split starts with a document's BOS"
    starts = np.flatnonzero(ids == bos)
    return [ids[s + 1:e].tolist() for s, e in zip(starts, list(starts[1:]) + [len(ids)])]


def _read_split(meta, split):
    parts = [np.fromfile(s["path"], dtype=meta["dtype"]) for s in meta[split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _nanollama_folder(path, vocab=4000, train=(0, 1000), val=(3000, 4000), n_train=2, n=3000, seed=0):
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    for i in range(n_train):
        rng.integers(*train, size=n).astype("<u2").tofile(path / f"train_{i:04d}.bin")
    if val:
        rng.integers(*val, size=n).astype("<u2").tofile(path / "val_0000.bin")
    (path / "meta.json").write_text(json.dumps({
        "dataset": "fineweb", "vocab_size": vocab, "total_tokens": n * (n_train + bool(val)),
        "num_shards": n_train + bool(val), "shard_size": n, "num_samples": 123, "tokenizer_dir": "/nonexistent"}))
    return path



def _cli(*args):
    return subprocess.run([PY, "-m", "data.prepare", *map(str, args)], capture_output=True, text=True, cwd=REPO)
