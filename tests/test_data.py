"""Data pipeline: prepare -> shards -> grain batches (issue 3 acceptance 1-7)."""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import sentencepiece as spm

from nanollama_base.shards import DataError, dtype_for_vocab, load_meta
from data.encode import is_val_document
from data.prepare import ensure_builtin, prepare
from data.prepare_personality import prepare_personality
from data.sources import LocalSource
from nanollama_jax.input import Batches, validation_batches

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


# 1. Round trip --------------------------------------------------------------------------

def test_round_trip_exact_text_with_bos(prepared, corpus):
    meta = load_meta(prepared)
    assert meta["dtype"] == np.dtype("<u2") and meta["vocab_size"] == VOCAB
    assert len(meta["train"]["shards"]) > 1, "small shard size gives several shards"
    sp = spm.SentencePieceProcessor(model_file=str(meta["tokenizer_path"]))
    expected = list(LocalSource([corpus]).documents())
    want = {"train": [d for i, d in enumerate(expected) if not is_val_document(i, 0.1)],
            "val": [d for i, d in enumerate(expected) if is_val_document(i, 0.1)]}
    for split in ("train", "val"):
        got = [sp.decode(doc) for doc in _split_docs(_read_split(meta, split))]
        assert got == want[split]
        assert meta["raw"][split]["documents"] == len(want[split])
        assert meta["raw"][split]["bytes"] == sum(len(d.encode()) for d in want[split])
        assert meta[split]["tokens"] == len(_read_split(meta, split))
    assert set(TRICKY) <= set(want["train"] + want["val"])
    raw = meta["raw"]
    assert raw["tokenizer_sha256"] == hashlib.sha256(meta["tokenizer_path"].read_bytes()).hexdigest()
    assert raw["bos_id"] == 1 and raw["eos_id"] == 2 and raw["sources"][0]["kind"] == "local"
    assert sp.unk_id() == 0 and sp.bos_id() == 1 and sp.eos_id() == 2 and sp.pad_id() == -1
    assert sp.id_to_piece(3) == "<0x00>" and sp.id_to_piece(258) == "<0xFF>"


def test_rerun_is_idempotent_and_parallel_gives_same_bytes(prepared, corpus, tmp_path):
    logs = []
    prepare(prepared, inputs=[corpus], vocab_size=VOCAB, val_fraction=0.1, shard_size=5000, workers=1,
            progress=False, log=logs.append)
    assert "already prepared" in logs[-1]
    again = tmp_path / "again"  # 2 tokeniser processes (a fresh CLI process: fork is safe there)
    r = _cli("--input", corpus, "--output", again, "--vocab-size", VOCAB, "--val-fraction", 0.1,
             "--shard-size", 5000, "--workers", 2)
    assert r.returncode == 0 and "Tokenizing with 2 processes" in r.stdout, r.stdout + r.stderr
    for rel in ["meta.json", "tokenizer.model"] + [s["file"] for s in load_meta(again)["raw"]["train"]["shards"]]:
        assert (again / rel).read_bytes() == (prepared / rel).read_bytes(), rel
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folders left"


# 2. dtype --------------------------------------------------------------------------------

def _widened_tokenizer(src: pathlib.Path, dst: pathlib.Path, extra: int) -> pathlib.Path:
    """The same tokenizer plus `extra` never-matching pieces (private-use characters): a
    >65536-piece vocabulary without minutes of BPE training; text encodes to the same ids."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(src.read_bytes())
    for i in range(extra):
        piece = proto.pieces.add()
        piece.piece = chr(0xE000 + i // 4096) + chr(0xE000 + i % 4096)
        piece.score = -1e9
    dst.write_bytes(proto.SerializeToString())
    return dst


def test_dtype_rule_and_uint32_shards_load(prepared, corpus, tmp_path):
    assert dtype_for_vocab(65536) == np.dtype("<u2")
    assert dtype_for_vocab(65537) == np.dtype("<u4")
    assert dtype_for_vocab(96000) == np.dtype("<u4")
    big_tok = _widened_tokenizer(prepared / "tokenizer.model", tmp_path / "wide.model", 70000 - VOCAB)
    assert spm.SentencePieceProcessor(model_file=str(big_tok)).get_piece_size() == 70000
    wide = tmp_path / "wide"
    prepare(wide, inputs=[corpus], tokenizer_file=big_tok, val_fraction=0.1, shard_size=5000, workers=1,
            progress=False, log=lambda m: None)
    m16, m32 = load_meta(prepared), load_meta(wide)
    assert m32["raw"]["dtype"] == "uint32" and m32["dtype"] == np.dtype("<u4") and m32["vocab_size"] == 70000
    assert (wide / m32["raw"]["train"]["shards"][0]["file"]).stat().st_size == 4 * m32["train"]["shards"][0]["tokens"]
    np.testing.assert_array_equal(_read_split(m16, "train"), _read_split(m32, "train"))
    a = Batches(prepared, seq_len=32, global_batch=4, seed=3)
    b = Batches(wide, seq_len=32, global_batch=4, seed=3)
    assert b.vocab_size == 70000
    np.testing.assert_array_equal(a[5], b[5])
    assert b[5].dtype == np.int32
    # uint32 with a small vocabulary is readable too (the writer's dtype can be forced wider).
    forced = prepare(tmp_path / "forced", inputs=[corpus], tokenizer_file=prepared / "tokenizer.model",
                     val_fraction=0.1, shard_size=5000, workers=1, force_dtype=np.uint32, progress=False,
                     log=lambda m: None)
    np.testing.assert_array_equal(Batches(forced, seq_len=32, global_batch=4, seed=3)[5], a[5])


# 3. nanollama's own folders --------------------------------------------------------------

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


def test_nanollama_folder_loads_and_val_never_trains(tmp_path):
    ref = _nanollama_folder(tmp_path / "ref")
    meta = load_meta(ref)
    assert meta["kind"] == "nanollama" and meta["train"]["tokens"] == 6000 and meta["val"]["tokens"] == 3000
    import grain
    from nanollama_jax.input import TokenWindows

    win = TokenWindows(meta["train"]["shards"], meta["dtype"], 64)
    assert isinstance(win, grain.sources.RandomAccessDataSource)
    assert len(win) == (6000 - 1) // 64
    stream = np.concatenate([np.fromfile(s["path"], dtype="<u2") for s in meta["train"]["shards"]])
    i = 3000 // 64  # this window spans the two shards
    np.testing.assert_array_equal(win[i], stream[i * 64:i * 64 + 65])
    b = Batches(ref, seq_len=64, global_batch=8, seed=0)
    seen = np.concatenate([b[k].ravel() for k in range(300)])  # ~5 epochs of the training windows
    assert seen.max() < 1000, "a validation token appeared in a training batch"
    vb = validation_batches(ref, seq_len=64, batch_size=4, max_batches=100)
    assert len(vb) == 3000 // 64 // 4
    assert all(x.shape == (4, 65) and x.min() >= 3000 for x in vb)
    np.testing.assert_array_equal(vb[0], validation_batches(ref, seq_len=64, batch_size=4, max_batches=1)[0])


def test_nanollama_folder_and_short_val(tmp_path, prepared):
    sp = spm.SentencePieceProcessor(model_file=str(prepared / "tokenizer.model"))
    texts = _english(30, 8)
    ref = tmp_path / "ref"
    ref.mkdir()
    shutil.copy(prepared / "tokenizer.model", ref / "tokenizer.model")
    np.array(sum(sp.encode(texts[:25]), []), dtype="<u2").tofile(ref / "train_0000.bin")
    val_ids = sum(sp.encode(texts[25:]), [])
    np.array(val_ids, dtype="<u2").tofile(ref / "val_0000.bin")
    (ref / "meta.json").write_text(json.dumps({"dataset": "x", "vocab_size": VOCAB, "num_shards": 2,
                                               "tokenizer_dir": str(ref)}))
    assert Batches(ref, seq_len=16, global_batch=2).tokenizer_path == ref / "tokenizer.model"
    # fewer val windows than one batch: one batch, windows repeated in order
    n = (len(val_ids) - 1) // 64
    vb = validation_batches(ref, seq_len=64, batch_size=n + 3, max_batches=5)
    assert len(vb) == 1 and vb[0].shape == (n + 3, 65)
    np.testing.assert_array_equal(vb[0][n], vb[0][0])
    np.array(val_ids[:5], dtype="<u2").tofile(ref / "val_0000.bin")  # shorter than one window: tiled
    (vb,) = validation_batches(ref, seq_len=64, batch_size=2, max_batches=5)
    assert vb.shape == (2, 65) and vb[0, :10].tolist() == val_ids[:5] * 2


def test_our_val_split_never_trains(tmp_path):
    # Validation documents are Cyrillic, training documents Latin: their pieces cannot meet.
    import re

    latin = _english(40, 2)
    table = {ord(c): chr(0x430 + i) for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}
    table.update({ord(c): chr(0x410 + i) for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZ")})
    cyr = [d.translate(table) for d in latin]
    docs = [cyr[i] if is_val_document(i, 0.1) else latin[i] for i in range(40)]
    (tmp_path / "c.txt").write_text("\n\n\n".join(docs), encoding="utf-8")
    out = prepare(tmp_path / "d", inputs=[tmp_path / "c.txt"], vocab_size=500, val_fraction=0.1, workers=1,
                  progress=False, log=lambda m: None)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    b = Batches(out, seq_len=16, global_batch=8, seed=1)
    train_text = "".join(sp.decode(r.tolist()) for k in range(len(b._base) // 8 + 1) for r in b[k])
    val_text = "".join(sp.decode(r.tolist()) for x in validation_batches(out, seq_len=16, batch_size=8,
                                                                      max_batches=1000) for r in x)
    assert re.search("[a-zA-Z]", train_text) and re.search("[а-яА-Я]", val_text)
    assert not re.search("[а-яА-Я]", train_text), "a validation token appeared in a training batch"
    assert not re.search("[a-zA-Z]", val_text), "a training token appeared in validation"


# 4. Determinism ---------------------------------------------------------------------------

def test_same_seed_same_batch_in_fresh_process(prepared):
    code = textwrap.dedent(f"""
        import hashlib, sys
        from nanollama_jax.input import Batches
        b = Batches({str(prepared)!r}, seq_len=32, global_batch=6, seed=11)
        print(hashlib.sha256(b[123].tobytes()).hexdigest(), b.fingerprint)
    """)
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout.split()
    b = Batches(prepared, seq_len=32, global_batch=6, seed=11)
    assert out == [hashlib.sha256(b[123].tobytes()).hexdigest(), b.fingerprint]


def test_batch_k_direct_and_process_slices(prepared):
    kw = dict(seq_len=32, global_batch=8, seed=5)
    full = Batches(prepared, **kw)
    walked = [full[k] for k in range(40)]
    direct = Batches(prepared, **kw)[39]  # fresh object, nothing read before
    np.testing.assert_array_equal(walked[39], direct)
    assert not np.array_equal(Batches(prepared, **dict(kw, seed=6))[39], direct)
    assert Batches(prepared, **dict(kw, seq_len=16)).fingerprint != full.fingerprint
    for n in (2, 4):
        parts = [Batches(prepared, process_index=p, process_count=n, **kw) for p in range(n)]
        for k in (0, 17, 39):
            rows = [x[k] for x in parts]
            assert all(r.shape == (8 // n, 33) for r in rows)
            np.testing.assert_array_equal(np.concatenate(rows), full[k])
        assert parts[0].fingerprint == full.fingerprint  # the data order does not depend on process count
    assert full[10**6].shape == (8, 33)  # far past the first epoch: reshuffled epochs
    assert full.epoch(len(full._base) // 8 - 1) == pytest.approx(1.0, abs=8 / len(full._base))


def test_each_window_once_per_epoch(tmp_path):
    ref = tmp_path / "seq"
    ref.mkdir()
    np.arange(6001, dtype="<u2").tofile(ref / "train_0000.bin")  # window i starts with token 16*i
    (ref / "meta.json").write_text(json.dumps({"vocab_size": 8000, "total_tokens": 6001, "num_shards": 1}))
    n = 6000 // 16
    parts = [Batches(ref, seq_len=16, global_batch=15, seed=2, process_index=p, process_count=3) for p in range(3)]
    for epoch in range(2):
        starts = [int(r[0]) for k in range(epoch * n // 15, (epoch + 1) * n // 15) for x in parts for r in x[k]]
        assert sorted(starts) == list(range(0, 6000, 16))
        assert starts != sorted(starts)  # shuffled


# 5. Mixtures --------------------------------------------------------------------------------

def test_mixture_and_personality_shares(tmp_path):
    a = _nanollama_folder(tmp_path / "a", train=(0, 100), val=None, n=4000, seed=1)
    b = _nanollama_folder(tmp_path / "b", train=(100, 200), val=None, n=1000, seed=2)
    p = _nanollama_folder(tmp_path / "p", train=(200, 300), val=None, n=500, seed=3)
    B = 10
    bt = Batches(a, seq_len=16, global_batch=B, seed=0, mixture={a: 0.7, b: 0.3},
                 personality_dir=p, personality_ratio=0.2)
    counts = np.zeros(3)
    for k in range(2000):
        x = bt[k]
        src = x[:, 0] // 100
        assert (x // 100 == src[:, None]).all()  # a window never mixes corpora
        assert (src == 2).sum() == int(B * 0.2)  # exact personality rows in every batch
        counts += np.bincount(src, minlength=3)
    shares = counts / counts.sum()
    assert abs(shares[2] - 0.2) < 0.01
    assert abs(shares[0] / (shares[0] + shares[1]) - 0.7) < 0.01
    assert abs(shares[0] - 0.8 * 0.7) < 0.01 and abs(shares[1] - 0.8 * 0.3) < 0.01


def test_short_personality_is_tiled_and_empty_is_an_error(tmp_path, prepared, corpus):
    short = tmp_path / "short.txt"
    short.write_text("Hi.", encoding="utf-8")
    pdir = prepare_personality([short], prepared, tmp_path / "pshort", progress=False, log=lambda m: None)
    ptoks = _read_split(load_meta(pdir), "train")
    assert len(ptoks) < 33
    bt = Batches(prepared, seq_len=32, global_batch=8, seed=0, personality_dir=pdir, personality_ratio=0.25)
    x = bt[3]
    rows = [i for i, s in enumerate(bt.row_sources()) if s == "personality"]
    assert len(rows) == 2
    for r in rows:  # the short document, repeated
        assert set(x[r].tolist()) <= set(ptoks.tolist())
    empty = _nanollama_folder(tmp_path / "empty", vocab=VOCAB, train=(0, 1), val=None, n=0)
    with pytest.raises(DataError, match="empty"):
        Batches(prepared, seq_len=32, global_batch=8, personality_dir=empty, personality_ratio=0.25)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(DataError, match="empty corpus"):
        prepare_personality([blank], prepared, tmp_path / "pblank", progress=False, log=lambda m: None)


def test_personality_shapes(tmp_path, prepared):
    lines = [
        {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello?"},
                      {"role": "assistant", "content": "Hello, friend."}]},
        {"instruction": "Say hi.", "response": "Hi!"},
        {"user": "How are you?", "assistant": "Well, thank you."},
        {"text": "Just some text."},
    ]
    jl = tmp_path / "p.jsonl"
    jl.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    txt = tmp_path / "p.txt"
    txt.write_text("First letter.\n\nSecond paragraph.\n\n\nSecond letter.", encoding="utf-8")
    out = prepare_personality([jl, txt], prepared, tmp_path / "pers", progress=False, log=lambda m: None)
    meta = load_meta(out)
    assert meta["raw"]["personality"] is True
    assert meta["tokenizer_sha256"] == load_meta(prepared)["tokenizer_sha256"]
    sp = spm.SentencePieceProcessor(model_file=str(meta["tokenizer_path"]))
    got = [sp.decode(d) for d in _split_docs(_read_split(meta, "train"))]
    assert got == ["Be kind.\n\nHello?\n\nHello, friend.", "Say hi.\n\nHi!", "How are you?\n\nWell, thank you.",
                   "Just some text.", "First letter.\n\nSecond paragraph.", "Second letter."]
    other = tmp_path / "other.model"
    other.write_bytes(b"not the base tokenizer")
    with pytest.raises(DataError, match="differs from the base"):
        prepare_personality([jl], prepared, tmp_path / "pers2", tokenizer_file=other, progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = subprocess.run([PY, "-m", "data.prepare_personality", "--input", str(jl), "--tokenizer-dir", str(prepared),
                        "--output", str(out), "--tokenizer", str(other)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(f"data.prepare_personality: {other}: tokenizer sha256") and "differs from the base" in r.stderr
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"question": "?"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no text"):
        prepare_personality([bad], prepared, tmp_path / "pers3", progress=False)


# 6. Bad input ----------------------------------------------------------------------------

def _cli(*args):
    return subprocess.run([PY, "-m", "data.prepare", *map(str, args)], capture_output=True, text=True, cwd=REPO)


def test_cli_errors_are_one_line_and_keep_earlier_output(tmp_path, corpus):
    out = tmp_path / "out"
    good = [tmp_path / "good.txt"]
    good[0].write_text("\n\n\n".join(_english(10, 5)), encoding="utf-8")
    r = _cli("--input", *good, "--output", out, "--vocab-size", 400, "--quiet", "--workers", 1)
    assert r.returncode == 0, r.stderr
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    nul = tmp_path / "latin1.txt"
    nul.write_bytes("caf\xe9".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    cases = [
        ([tmp_path / "missing.txt"], "missing.txt: no such file"),
        ([nul], "latin1.txt: not UTF-8"),
        ([empty], "empty corpus"),
        ([good[0], nofield], "nofield.jsonl:2: no 'text' text field"),
    ]
    for inputs, message in cases:
        r = _cli("--input", *inputs, "--output", out, "--vocab-size", 400, "--quiet", "--workers", 1)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("data.prepare: ") and message in lines[0], r.stderr
        after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert after == before, f"earlier output changed by failing run ({message})"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.txt"
        locked.write_text("secret")
        locked.chmod(0)
        r = _cli("--input", locked, "--output", out, "--quiet")
        assert r.returncode != 0 and "locked.txt: unreadable" in r.stderr


def test_killed_run_leaves_earlier_output_and_no_complete_looking_shards(tmp_path, prepared):
    import signal
    import time

    out = tmp_path / "out"
    small = tmp_path / "small.txt"
    small.write_text("\n\n\n".join(_english(20, 3)), encoding="utf-8")
    tok = prepared / "tokenizer.model"
    assert _cli("--input", small, "--output", out, "--tokenizer", tok, "--quiet").returncode == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    big = tmp_path / "big.txt"
    big.write_text("\n\n\n".join(_english(6000, 4)), encoding="utf-8")
    args = ["-m", "data.prepare", "--input", big, "--output", out, "--tokenizer", tok, "--shard-size", 20000,
            "--workers", 1, "--quiet"]
    proc = subprocess.Popen([PY, *map(str, args)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    staged = []
    while time.time() < deadline and proc.poll() is None:
        staged = [p for p in tmp_path.glob(".out.partial-*/train/*") if p.name.endswith(".bin")]
        if staged:
            break
        time.sleep(0.005)
    assert staged and proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    stale = list(tmp_path.glob(".out.partial-*"))
    assert stale and not list(stale[0].glob("meta.json")), "an interrupted run must not look complete"
    # The next run cleans up after the killed one.
    assert _cli("--input", small, "--output", tmp_path / "other", "--tokenizer", tok, "--quiet").returncode == 0
    prepare(out, inputs=[small], tokenizer_file=tok, progress=False, log=lambda m: None)
    assert not list(tmp_path.glob(".out.partial-*"))


def test_failure_while_writing_shards_keeps_earlier_output(tmp_path, prepared):
    out = tmp_path / "out"
    good = tmp_path / "good.txt"
    good.write_text("\n\n\n".join(_english(20, 3)), encoding="utf-8")
    tok = prepared / "tokenizer.model"
    prepare(out, inputs=[good], tokenizer_file=tok, progress=False, log=lambda m: None)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = tmp_path / "z.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + "{broken\n")
    with pytest.raises(DataError, match=r"z\.jsonl:2: invalid JSON"):
        prepare(out, inputs=[good, bad], tokenizer_file=tok, shard_size=100, progress=False, log=lambda m: None)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_tokenizer_hash_mismatch_and_truncated_shards(prepared, tmp_path):
    bad_tok = tmp_path / "badtok"
    shutil.copytree(prepared, bad_tok)
    with open(bad_tok / "tokenizer.model", "ab") as f:
        f.write(b"\0")
    with pytest.raises(DataError, match=r"tokenizer\.model: tokenizer sha256 .* differs from meta\.json"):
        Batches(bad_tok, seq_len=16, global_batch=2)
    with pytest.raises(DataError, match="differs from meta.json"):
        prepare_personality([prepared / "meta.json"], bad_tok, tmp_path / "p", progress=False)

    for cut, message in ((1, "not a multiple of 2-byte"), (2, r"\d+ tokens on disk, meta.json says \d+")):
        trunc = tmp_path / f"trunc{cut}"
        shutil.copytree(prepared, trunc)
        shard = trunc / load_meta(prepared)["raw"]["train"]["shards"][1]["file"]
        os.truncate(shard, shard.stat().st_size - cut)
        with pytest.raises(DataError, match=rf"{shard.name}: truncated shard \(.*{message}"):
            Batches(trunc, seq_len=16, global_batch=2)
    ref = _nanollama_folder(tmp_path / "ref")
    os.truncate(ref / "train_0001.bin", 1000)
    with pytest.raises(DataError, match="truncated shards"):
        load_meta(ref)
    (ref / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match=r"meta\.json: corrupt JSON"):
        load_meta(ref)
    with pytest.raises(DataError, match=r"meta\.json: missing"):
        load_meta(tmp_path)


def test_too_few_tokens_and_mismatched_mixture(prepared, tmp_path):
    with pytest.raises(DataError, match="fewer than one window"):
        Batches(prepared, seq_len=10**6, global_batch=2)
    other = _nanollama_folder(tmp_path / "o", vocab=999, val=None)
    with pytest.raises(DataError, match="vocab size 999"):
        Batches(prepared, seq_len=16, global_batch=2, mixture={prepared: 1, other: 1})


def test_hf_needs_datasets_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as on a machine without it: `import datasets` fails
    with pytest.raises(DataError, match="pip install datasets"):
        prepare(tmp_path / "x", hf="fineweb", progress=False, log=lambda m: None)
    with pytest.raises(DataError, match="unknown"):
        prepare(tmp_path / "x", preset="nope", progress=False, log=lambda m: None)


def test_hf_streaming_and_preset_mixture_with_a_stand_in_hub(tmp_path, monkeypatch, prepared):
    """The streaming code path and preset ratios, with `datasets.load_dataset` replaced by a
    local generator (there is no hub here)."""
    import types
    import zlib

    opened = []

    def load_dataset(path, name=None, split="train", streaming=False):
        assert streaming and split == "train"
        opened.append((path, name))
        field = "content" if "stack" in path else "text"
        rng = np.random.default_rng(zlib.crc32(f"{path}{name}".encode()))
        return ({field: f"Row {i} of {path.split('/')[-1]}. " * int(rng.integers(1, 30))} for i in range(10**7))

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    quiet = dict(progress=False, log=lambda m: None, workers=1)
    out = prepare(tmp_path / "en", preset="en_only", tokenizer_file=prepared / "tokenizer.model",
                  max_tokens=300_000, **quiet)
    assert ("HuggingFaceFW/fineweb-edu", "sample-10BT") in opened
    meta = load_meta(out)["raw"]
    total = meta["train"]["tokens"] + meta["val"]["tokens"]
    assert 300_000 <= total < 301_000  # stops at the document that reaches --max-tokens
    shares = {s["name"]: (s["ratio"], s["token_share"]) for s in meta["sources"]}
    assert set(shares) == {"fineweb", "dclm", "stack", "megamath"}
    for name, (ratio, got) in shares.items():
        assert abs(got - ratio) < 0.02, (name, ratio, got)
    assert meta["sources"][2]["path"] == "bigcode/the-stack-v2-dedup"
    out2 = prepare(tmp_path / "one", hf="someone/corpus:cfg", tokenizer_file=prepared / "tokenizer.model",
                   max_tokens=5000, **quiet)
    assert opened[-1] == ("someone/corpus", "cfg")
    assert load_meta(out2)["raw"]["sources"][0]["kind"] == "hf"


def test_parquet_input(tmp_path, prepared):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = _english(5, 9)
    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    out = prepare(tmp_path / "pq", inputs=[tmp_path / "d.parquet"], tokenizer_file=prepared / "tokenizer.model",
                  val_fraction=0.0, workers=1, progress=False, log=lambda m: None)
    meta = load_meta(out)
    sp = spm.SentencePieceProcessor(model_file=str(meta["tokenizer_path"]))
    assert [sp.decode(d) for d in _split_docs(_read_split(meta, "train"))] == docs


# 7. Built-in default ----------------------------------------------------------------------

def test_builtin_prepares_offline_once_and_concurrently(tmp_path):
    env = dict(os.environ, NANOLLAMA_DATA_HOME=str(tmp_path))
    code = textwrap.dedent("""
        import socket
        def no_network(*a, **k):
            raise RuntimeError("network used")
        socket.socket = no_network
        socket.create_connection = no_network
        from data.prepare import ensure_builtin
        print(ensure_builtin(vocab_size=1024))
    """)
    procs = [subprocess.Popen([PY, "-c", code], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    final = tmp_path / "builtin-v1024"
    assert {o.strip() for o, _ in outs} == {str(final)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["builtin-v1024"]
    meta = load_meta(final)
    assert meta["vocab_size"] == 1024 and meta["train"]["tokens"] > 200_000 and meta["val"]["tokens"] > 10_000
    mtime = (final / "meta.json").stat().st_mtime_ns
    os.environ_backup = None
    old = os.environ.get("NANOLLAMA_DATA_HOME")
    os.environ["NANOLLAMA_DATA_HOME"] = str(tmp_path)
    try:
        assert ensure_builtin(vocab_size=1024) == final  # cached: nothing rebuilt
    finally:
        if old is None:
            del os.environ["NANOLLAMA_DATA_HOME"]
        else:
            os.environ["NANOLLAMA_DATA_HOME"] = old
    assert (final / "meta.json").stat().st_mtime_ns == mtime
    sp = spm.SentencePieceProcessor(model_file=str(meta["tokenizer_path"]))
    text = sp.decode(validation_batches(final, seq_len=128, batch_size=2, max_batches=1)[0][0].tolist())
    assert sum(w in text.split() for w in ("the", "a", "of", "to", "is")) >= 1
