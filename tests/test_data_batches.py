"""Data input: shards -> grain batches (issue 3 acceptance 3-5): nanollama's own folders, validation never
trained on, determinism across processes, mixtures and personality shares."""
import hashlib
import json
import shutil
import subprocess
import textwrap

import numpy as np
import pytest
import sentencepiece as spm

from nanollama_base.shards import DataError, load_meta
from data.encode import is_val_document
from data.prepare import prepare
from data.prepare_personality import prepare_personality
from nanollama_jax.input import Batches, validation_batches

from data_fixtures import (  # noqa: F401 (pytest fixtures, requested by name)
    PY, REPO, VOCAB, _english, _nanollama_folder, _read_split, _split_docs, corpus, prepared,
)


# 3. nanollama's own folders --------------------------------------------------------------

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
