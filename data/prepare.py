"""Raw text -> SentencePiece tokenizer + token shards.

    python -m data.prepare --input my_texts/ --output data/mine --vocab-size 8000

writes ``DIR/tokenizer.model``, ``DIR/train/train_00000.bin …``, ``DIR/val/val_00000.bin …``
and ``DIR/meta.json`` (see ``nanollama_base/shards.py`` for the format). With no source given it
prepares the built-in default corpus (the Python documentation every installation carries).

Safety: everything is built in a hidden staging folder next to the output and moved into
place only when complete, ``meta.json`` last; an interrupted or failed run leaves earlier
output untouched, and a killed run's staging folder is removed by the next run (a folder is in
use only while its ``.lock`` is locked, which the kernel releases when its process dies). Re-running with the same inputs and options gives the same bytes, and
is skipped when ``meta.json`` already records them (``--force`` rebuilds).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pathlib
import secrets
import shutil
import sys
import time
from typing import Callable

import numpy as np

from nanollama_base.cli import ArgumentParser, Progress, run_cli
from nanollama_base.files import FolderLock, lock_held, sha256_file, write_json_atomic
from nanollama_base.shards import (DEFAULT_SHARD_SIZE, FORMAT_NAME, FORMAT_VERSION, DataError, dtype_for_vocab,
                                   dtype_name, load_meta, sha256_bytes)

from . import tokenizer as tok
from .chat import CHAT_TOKENS, add_chat_tokens, missing_chat_tokens
from .encode import ShardWriter, document_chunks, encode_chunk, is_val_document, jax_running, ordered_map
from .sources import PRESETS, BuiltinSource, HFSource, LocalSource, Mixture

DEFAULT_VAL_FRACTION = 0.01
BUILTIN_VAL_FRACTION = 0.05
BUILTIN_VOCAB_SIZE = 4096
DEFAULT_HF_MAX_TOKENS = 100_000_000
SMALL_CORPUS_BYTES = 4 << 20  # below this, tokenise in-process


def data_home() -> pathlib.Path:
    """Where cached preparations live: $NANOLLAMA_DATA_HOME or ~/.cache/nanollama-jax."""
    return pathlib.Path(os.environ.get("NANOLLAMA_DATA_HOME") or "~/.cache/nanollama-jax").expanduser()


# ---------------------------------------------------------------------------------------
# The build

def _source_from(inputs=None, hf=None, preset=None, text_field="text"):
    given = sum(x is not None and x != [] for x in (inputs, hf, preset))
    if given > 1:
        raise DataError("give only one of --input, --hf, --preset")
    if inputs:
        return Mixture([LocalSource(list(inputs), text_field=text_field)], [1.0])
    if hf:
        return Mixture([HFSource.parse(hf)], [1.0])
    if preset:
        if preset not in PRESETS:
            raise DataError(f"--preset {preset}: unknown (choose from {', '.join(sorted(PRESETS))})")
        spec = PRESETS[preset]["sources"]
        return Mixture([HFSource.parse(n) for n in spec], list(spec.values()))
    return Mixture([BuiltinSource()], [1.0])


def _source_label(source) -> str:
    files = getattr(source, "files", None)
    if files:
        return str(files[0]) if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more files)"
    return getattr(source, "name", "input")


def _fingerprint(mix: Mixture, options: dict) -> tuple[str, list[dict]]:
    described = [dict(s.describe(), ratio=r) for s, r in zip(mix.sources, mix.ratios)]
    blob = json.dumps({"sources": described, "options": options, "format_version": FORMAT_VERSION},
                      sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest(), described




def _build(staging: pathlib.Path, mix: Mixture, *, vocab_size, tokenizer_file, val_fraction, shard_size,
           workers, max_tokens, force_dtype, progress, log, fingerprint, described, tokenizer_chars,
           extra_meta=None, auto_workers=False) -> dict:
    staging.mkdir(parents=True)
    names = ", ".join(_source_label(s) for s in mix.sources)

    # 1. Tokenizer: reuse or train on the training documents.
    if tokenizer_file is not None:
        tokenizer_file = pathlib.Path(tokenizer_file).expanduser()
        try:
            model = tokenizer_file.read_bytes()
        except OSError as e:
            raise DataError(f"{tokenizer_file}: cannot read tokenizer ({e.strerror or e})") from None
        try:
            sp = tok.load(model)
        except Exception:
            raise DataError(f"{tokenizer_file}: not a SentencePiece model") from None
        trained = False
        log(f"Using tokenizer {tokenizer_file} ({sp.get_piece_size():,} pieces)")
        missing = missing_chat_tokens(model)
        if missing:  # appended: ordinary ids (so a model trained on the old tokenizer) are unchanged
            model = add_chat_tokens(model)
            sp = tok.load(model)
            log(f"  added the chat tokens {', '.join(missing)} as ids {sp.get_piece_size() - len(missing)}"
                f"-{sp.get_piece_size() - 1}")
        if vocab_size and vocab_size != sp.get_piece_size() and vocab_size != tok.DEFAULT_VOCAB_SIZE:
            log(f"  (--vocab-size {vocab_size} ignored: the tokenizer decides the vocabulary)")
    else:
        log(f"Training a {vocab_size:,}-piece BPE tokenizer on {names} …")
        t0 = time.time()

        seen = [0]

        def train_docs():
            for i, (doc, _) in enumerate(mix.documents_tagged()):
                seen[0] += 1
                if not is_val_document(i, val_fraction):
                    yield doc
        try:
            model = tok.train(train_docs(), vocab_size, threads=workers, max_chars=tokenizer_chars, log=log)
        except tok.NoText:
            if seen[0] == 0:
                raise DataError(f"{names}: empty corpus (no non-blank documents found)") from None
            if seen[0] == 1 and val_fraction > 0:
                raise DataError(f"{names}: only 1 document, held out for validation; add text "
                                "(separate documents with blank-line triples) or pass --val-fraction 0") from None
            raise
        sp = tok.load(model)
        trained = True
        log(f"  tokenizer trained in {time.time() - t0:.1f}s")
    vocab = sp.get_piece_size()
    bos, eos = sp.bos_id(), sp.eos_id()
    if bos < 0:
        raise DataError(f"{tokenizer_file}: tokenizer has no BOS piece; documents need one")
    (staging / "tokenizer.model").write_bytes(model)
    dtype = np.dtype(force_dtype) if force_dtype is not None else dtype_for_vocab(vocab)
    if dtype.itemsize == 2 and vocab > 65536:
        raise DataError(f"vocab {vocab} does not fit uint16 shards")

    # 2. Tokenise in parallel, in document order, into train/ and val/ shards.
    writers = {s: ShardWriter(staging, s, dtype, shard_size, vocab) for s in ("train", "val")}
    nsrc = len(mix.sources)
    stats = {s: {"tokens": np.zeros(nsrc, np.int64), "documents": np.zeros(nsrc, np.int64),
                 "bytes": np.zeros(nsrc, np.int64)} for s in ("train", "val")}
    totals = [s.total_bytes() for s in mix.sources]
    if max_tokens:
        bar = Progress(max_tokens, desc="tokenizing", unit="tok", enabled=progress, log=log)
    else:
        bar = Progress(sum(totals) if None not in totals else None, desc="tokenizing", unit="B", enabled=progress,
                       log=log)
    known = None if None in totals else sum(totals)
    if auto_workers and workers > 1 and known is not None and known < SMALL_CORPUS_BYTES:
        workers = 1  # start-up would cost more than it saves
    if workers > 1 and jax_running():
        log("  (JAX is running in this process, so tokenising in-process: forking it is unsafe)")
        workers = 1
    log(f"Tokenizing with {workers} process{'es' if workers > 1 else ''} "
        f"({dtype_name(dtype)} shards of {shard_size:,} tokens) …")
    t0 = time.time()
    done = 0
    try:
        for train_ids, val_ids, lens, is_val, src, nbytes in ordered_map(
                encode_chunk, document_chunks(mix.documents_tagged(), val_fraction), workers, model):
            stop = False
            if max_tokens and done + int(lens.sum()) >= max_tokens:
                keep = int(np.searchsorted(np.cumsum(lens), max_tokens - done)) + 1
                train_ids = train_ids[: int(lens[:keep][~is_val[:keep]].sum())]
                val_ids = val_ids[: int(lens[:keep][is_val[:keep]].sum())]
                lens, is_val, src, nbytes = lens[:keep], is_val[:keep], src[:keep], nbytes[:keep]
                stop = True
            writers["train"].write(train_ids)
            writers["val"].write(val_ids)
            for split, mask in (("train", ~is_val), ("val", is_val)):
                np.add.at(stats[split]["tokens"], src[mask], lens[mask])
                np.add.at(stats[split]["documents"], src[mask], 1)
                np.add.at(stats[split]["bytes"], src[mask], nbytes[mask])
            done += int(lens.sum())
            bar.update(int(lens.sum()) if max_tokens else int(nbytes.sum()))
            if stop:
                break
    finally:
        bar.close()
    shards = {s: w.close() for s, w in writers.items()}
    elapsed = time.time() - t0

    train_docs_n = int(stats["train"]["documents"].sum())
    val_docs_n = int(stats["val"]["documents"].sum())
    if train_docs_n + val_docs_n == 0:
        raise DataError(f"{names}: empty corpus (no non-blank documents found)")
    if train_docs_n == 0:
        raise DataError(f"{names}: only {val_docs_n} document(s), all held out for validation; "
                        "add text or lower --val-fraction")
    if val_fraction > 0 and val_docs_n == 0:  # pragma: no cover - document 0 is always val
        raise DataError(f"{names}: no validation documents")

    split_meta = {}
    for s in ("train", "val"):
        split_meta[s] = {"tokens": int(stats[s]["tokens"].sum()), "documents": int(stats[s]["documents"].sum()),
                         "bytes": int(stats[s]["bytes"].sum()), "shards": shards[s]}
    all_tokens = stats["train"]["tokens"] + stats["val"]["tokens"]
    sources = []
    for i, d in enumerate(described):
        sources.append(dict(d, train_tokens=int(stats["train"]["tokens"][i]),
                            val_tokens=int(stats["val"]["tokens"][i]),
                            train_documents=int(stats["train"]["documents"][i]),
                            val_documents=int(stats["val"]["documents"][i]),
                            token_share=float(all_tokens[i] / max(1, all_tokens.sum()))))
    meta = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "created_by": "data.prepare",
        "dtype": dtype_name(dtype), "vocab_size": vocab, "bos_id": bos, "eos_id": eos,
        "unk_id": sp.unk_id(), "pad_id": sp.pad_id(), "bos_per_document": True,
        "tokenizer": "tokenizer.model", "tokenizer_sha256": sha256_bytes(model),
        "tokenizer_trained": trained,
        "tokenizer_options": dict(tok.TOKENIZER_OPTIONS, vocab_size=vocab_size) if trained else None,
        "shard_size": shard_size, "val_fraction": val_fraction, "max_tokens": max_tokens,
        "train": split_meta["train"], "val": split_meta["val"],
        "sources": sources, "inputs_fingerprint": fingerprint,
    }
    meta.update(extra_meta or {})
    write_json_atomic(staging / "meta.json", meta)
    rate = done / max(elapsed, 1e-9)
    log(f"  {done:,} tokens in {elapsed:.1f}s ({rate:,.0f} tokens/s)")
    return meta


def _publish(staging: pathlib.Path, output: pathlib.Path) -> None:
    """Move a complete staging folder into place. meta.json goes away first and comes back
    last, so at no moment does the output look complete with mixed old and new files."""
    if not output.exists():
        os.rename(staging, output)
        return
    if not output.is_dir():
        raise DataError(f"{output}: exists and is not a folder")
    trash = staging / ".previous"
    trash.mkdir()
    if (output / "meta.json").exists():
        os.replace(output / "meta.json", trash / "meta.json")
    for name in ("train", "val", "tokenizer.model"):
        if (output / name).exists() or (output / name).is_symlink():
            os.replace(output / name, trash / name)
        os.replace(staging / name, output / name)
    os.replace(staging / "meta.json", output / "meta.json")
    shutil.rmtree(staging, ignore_errors=True)


def _remove_stale_staging(parent: pathlib.Path, name: str) -> None:
    """Remove staging (and half-swapped) folders left by runs that were killed. A folder is in use
    while its `.lock` file beside it is locked; the kernel drops the lock when its process dies,
    however it dies, so a PID reused after a restart (containers start from the same PIDs) does
    not keep a dead run's folder alive. Folders from before lock files: their PID decides."""
    if not parent.is_dir():
        return
    for p in [*parent.glob(f".{name}.partial-*"), *parent.glob(f".{name}.stale-*")]:
        if p.suffix == ".lock" or not p.is_dir():
            continue
        lock = p.with_name(p.name + ".lock")
        if lock.exists():
            if lock_held(lock):
                continue
        elif _pid_alive(p.name.rsplit("-", 2)[-2]):
            continue
        shutil.rmtree(p, ignore_errors=True)
        lock.unlink(missing_ok=True)


def _pid_alive(text: str) -> bool:
    try:
        os.kill(int(text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass
    return True


def _is_current(output: pathlib.Path, fingerprint: str) -> bool:
    if not (output / "meta.json").is_file():
        return False
    try:
        meta = load_meta(output)
    except DataError:
        return False
    return meta["raw"].get("inputs_fingerprint") == fingerprint


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def prepare(output, *, inputs=None, hf=None, preset=None, source=None, text_field="text", vocab_size=None,
            tokenizer_file=None, val_fraction=DEFAULT_VAL_FRACTION, shard_size=DEFAULT_SHARD_SIZE,
            workers=None, max_tokens=None, force=False, progress=True, force_dtype=None,
            tokenizer_chars=tok.DEFAULT_TOKENIZER_CHARS, extra_meta=None,
            log: Callable[[str], None] = print) -> pathlib.Path:
    """Prepare a data folder (see module docstring); returns its path. Raises DataError."""
    output = pathlib.Path(output).expanduser()
    if output.exists() and not output.is_dir():
        raise DataError(f"{output}: exists and is not a folder")
    if source is not None:  # any object with name, describe(), total_bytes(), documents()
        mix = source if isinstance(source, Mixture) else Mixture([source], [1.0])
    else:
        mix = _source_from(inputs, hf, preset, text_field)
    if vocab_size is None:
        vocab_size = PRESETS[preset]["vocab_size"] if preset else (
            BUILTIN_VOCAB_SIZE if isinstance(mix.sources[0], BuiltinSource) else tok.DEFAULT_VOCAB_SIZE)
    if not 0 <= val_fraction < 0.5:
        raise DataError(f"--val-fraction must be in [0, 0.5), got {val_fraction}")
    if shard_size < 1:
        raise DataError(f"--shard-size must be positive, got {shard_size}")
    if max_tokens is None and any(isinstance(s, HFSource) for s in mix.sources):
        max_tokens = DEFAULT_HF_MAX_TOKENS
        log(f"Streaming from Hugging Face: stopping at {max_tokens:,} tokens (--max-tokens to change)")
    auto_workers = not workers
    workers = workers or default_workers()
    tok_sha = sha256_file(tokenizer_file) if tokenizer_file and pathlib.Path(tokenizer_file).is_file() else None
    options = {"vocab_size": None if tokenizer_file else vocab_size, "tokenizer_sha256": tok_sha,
               "val_fraction": val_fraction, "shard_size": shard_size, "max_tokens": max_tokens,
               "force_dtype": None if force_dtype is None else dtype_name(np.dtype(force_dtype)),
               "tokenizer_options": tok.TOKENIZER_OPTIONS, "tokenizer_chars": tokenizer_chars,
               "chat_tokens": CHAT_TOKENS, "extra_meta": extra_meta}
    fingerprint, described = _fingerprint(mix, options)
    _remove_stale_staging(output.parent, output.name)
    if not force and _is_current(output, fingerprint):
        log(f"{output}: already prepared from these inputs (meta.json matches); nothing to do")
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    with FolderLock(staging), _removed_on_exit(staging):
        meta = _build(staging, mix, vocab_size=vocab_size, tokenizer_file=tokenizer_file,
                      val_fraction=val_fraction, shard_size=shard_size, workers=workers,
                      max_tokens=max_tokens, force_dtype=force_dtype, progress=progress, log=log,
                      fingerprint=fingerprint, described=described, tokenizer_chars=tokenizer_chars,
                      extra_meta=extra_meta, auto_workers=auto_workers)
        _publish(staging, output)
    log(f"Done: {meta['train']['tokens']:,} training tokens ({meta['train']['documents']:,} documents, "
        f"{len(meta['train']['shards'])} shard{'s' if len(meta['train']['shards']) != 1 else ''}), "
        f"{meta['val']['tokens']:,} validation tokens ({meta['val']['documents']:,} documents), "
        f"vocab {meta['vocab_size']:,} ({meta['dtype']}) -> {output}")
    return output


def ensure_builtin(vocab_size: int = BUILTIN_VOCAB_SIZE, *, home=None, workers: int = 1,
                   progress: bool = False, log: Callable[[str], None] | None = None) -> pathlib.Path:
    """Prepare the built-in default corpus once (cached) and return its folder,
    ``$NANOLLAMA_DATA_HOME/builtin-v{vocab_size}``. Idempotent and safe when several
    processes call it at once (each builds in a private temp folder; the first rename wins)."""
    log = log or (lambda msg: print(f"[data] {msg}", file=sys.stderr))
    home = pathlib.Path(home).expanduser() if home else data_home()
    final = home / f"builtin-v{vocab_size}"
    mix = _source_from()
    options = {"vocab_size": vocab_size, "tokenizer_sha256": None, "val_fraction": BUILTIN_VAL_FRACTION,
               "shard_size": DEFAULT_SHARD_SIZE, "max_tokens": None, "force_dtype": None,
               "tokenizer_options": tok.TOKENIZER_OPTIONS, "tokenizer_chars": tok.DEFAULT_TOKENIZER_CHARS,
               "chat_tokens": CHAT_TOKENS}
    fingerprint, described = _fingerprint(mix, options)
    if _is_current(final, fingerprint):
        return final
    home.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(home, final.name)
    log(f"Preparing the built-in corpus (Python's own documentation) into {final} …")
    staging = home / f".builtin-v{vocab_size}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    with FolderLock(staging), _removed_on_exit(staging):
        _build(staging, mix, vocab_size=vocab_size, tokenizer_file=None, val_fraction=BUILTIN_VAL_FRACTION,
               shard_size=DEFAULT_SHARD_SIZE, workers=workers, max_tokens=None, force_dtype=None,
               progress=progress, log=log, fingerprint=fingerprint, described=described,
               tokenizer_chars=tok.DEFAULT_TOKENIZER_CHARS)
        try:
            os.rename(staging, final)
        except OSError:
            if _is_current(final, fingerprint):  # another process finished first
                return final
            stale = home / f".builtin-v{vocab_size}.stale-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(final, stale)
            os.rename(staging, final)
            shutil.rmtree(stale, ignore_errors=True)
    return final


@contextlib.contextmanager
def _removed_on_exit(folder: pathlib.Path):
    try:
        yield
    finally:
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# CLI

EXAMPLES = """\
examples:
  # the built-in corpus (Python's own docs; no download), 4096-piece tokenizer
  python -m data.prepare --output data/builtin
  # your own text: .txt (documents separated by blank-line triples), .jsonl, .parquet, folders
  python -m data.prepare --input books/ notes.jsonl --output data/mine --vocab-size 8000
  # reuse a tokenizer (e.g. to add a corpus for a mixture)
  python -m data.prepare --input more/ --output data/more --tokenizer data/mine/tokenizer.model
  # the reference's corpora, streamed from Hugging Face (pip install datasets)
  python -m data.prepare --hf fineweb --output data/fineweb --max-tokens 2600M
  python -m data.prepare --preset goldie --output data/goldie --max-tokens 10B
"""


def _parse_count(text: str) -> int:
    s = text.strip().upper().replace("_", "").replace(",", "")
    mult = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}
    try:
        if s and s[-1] in mult:
            return int(float(s[:-1]) * mult[s[-1]])
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 500000, 100M, 2.6B)") from None


def build_parser() -> argparse.ArgumentParser:
    preset_help = "; ".join(f"{k}: {v['about']}" for k, v in PRESETS.items() if k not in ("medium", "large"))
    p = ArgumentParser(
        prog="python -m data.prepare",
        description="Turn raw text into a SentencePiece tokenizer and token shards "
                    "(DIR/tokenizer.model, DIR/train/, DIR/val/, DIR/meta.json).",
        epilog=EXAMPLES)
    p.add_argument("--input", nargs="+", metavar="PATH", help="text files or folders (.txt .md .jsonl .parquet, .gz ok)")
    p.add_argument("--output", required=True, metavar="DIR", help="output folder")
    p.add_argument("--vocab-size", type=int, default=None,
                   help=f"tokenizer size (default {tok.DEFAULT_VOCAB_SIZE}, {BUILTIN_VOCAB_SIZE} for the "
                        "built-in corpus, the preset's for presets); above 65536 shards are uint32")
    p.add_argument("--tokenizer", metavar="FILE", help="reuse this SentencePiece .model instead of training one")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", metavar="NAME", help=f"named multi-corpus recipe ({preset_help}; "
                     "aliases: medium=multilingual64k, large=multilingual96k)")
    src.add_argument("--hf", metavar="NAME", help="a Hugging Face dataset, streamed: fineweb, dclm, stack, "
                     "megamath, fineweb2-rus …, or owner/name[:config[:split[:text_field]]]")
    p.add_argument("--text-field", default="text", help="JSONL key / parquet column with the text (default text)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help=f"share of documents held out for validation (default {DEFAULT_VAL_FRACTION}, "
                        f"{BUILTIN_VAL_FRACTION} for the built-in corpus)")
    p.add_argument("--shard-size", type=_parse_count, default=DEFAULT_SHARD_SIZE, help="tokens per shard (default 10M)")
    p.add_argument("--max-tokens", type=_parse_count, default=None,
                   help=f"stop after this many tokens (default: all; {DEFAULT_HF_MAX_TOKENS // 10**6}M when streaming)")
    p.add_argument("--workers", type=int, default=None, help=f"tokenizer processes (default {default_workers()})")
    p.add_argument("--force", action="store_true", help="rebuild even if meta.json says it is up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    builtin = not (args.input or args.hf or args.preset)
    val_fraction = args.val_fraction
    if val_fraction is None:
        val_fraction = BUILTIN_VAL_FRACTION if builtin else DEFAULT_VAL_FRACTION
    run_cli(parser.prog, lambda: prepare(
        args.output, inputs=args.input, hf=args.hf, preset=args.preset, text_field=args.text_field,
        vocab_size=args.vocab_size, tokenizer_file=args.tokenizer, val_fraction=val_fraction,
        shard_size=args.shard_size, workers=args.workers, max_tokens=args.max_tokens, force=args.force,
        progress=not args.quiet), interrupted=f"interrupted; {args.output} left as it was")


if __name__ == "__main__":
    main()
