"""Data preparation: prepare -> shards (issue 3 acceptance 1, 2, 6, 7): exact round trips, the shard
dtype rule, one-line errors that keep earlier output, HF streaming/presets, parquet, the built-in corpus."""
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

from data_fixtures import (  # noqa: F401 (pytest fixtures, requested by name)
    PY, REPO, TRICKY, VOCAB, _cli, _english, _nanollama_folder, _read_split, _split_docs, corpus, prepared,
)


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


# 6. Bad input ----------------------------------------------------------------------------

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
