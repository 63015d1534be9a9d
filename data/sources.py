"""Where documents come from: local files and folders, Hugging Face datasets (streamed),
named presets that mix several of them, and the built-in default corpus.

Every source yields documents (``str``) in a fixed order, so preparing the same inputs twice
gives the same bytes. What counts as a document:

* ``.txt`` / ``.md`` / ``.rst`` (or any other file named explicitly): the file is split on
  blank-line triples (``"\\n\\n\\n"``, the separator itself dropped); a piece longer than
  ``MAX_DOC_CHARS`` is cut further at line ends. Whitespace-only pieces are skipped.
* ``.jsonl``: one JSON object per line with a text field (``--text-field``, default
  ``text``); a line without it is an error naming the file and line.
* ``.parquet``: one row per document, the text column (needs ``pip install pyarrow``).
* ``.gz`` versions of .txt/.jsonl are read transparently.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pathlib
from dataclasses import dataclass, field
from typing import Iterator

from nanollama_base.shards import DataError

MAX_DOC_CHARS = 1_000_000
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
FOLDER_SUFFIXES = TEXT_SUFFIXES | {".jsonl", ".parquet"}

# Hugging Face datasets by short name: (path, config, split, text field).
HF_DATASETS = {
    "fineweb": ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", "text"),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", "text"),
    "dclm": ("mlfoundations/dclm-baseline-1.0", None, "train", "text"),
    "stack": ("bigcode/the-stack-v2-dedup", None, "train", "content"),
    "megamath": ("LLM360/MegaMath", None, "train", "text"),
}
for _code in ("rus_Cyrl", "fra_Latn", "deu_Latn", "spa_Latn", "por_Latn", "ukr_Cyrl", "tur_Latn",
              "arb_Arab", "hin_Deva", "cmn_Hani", "jpn_Jpan", "kor_Hang"):
    HF_DATASETS[f"fineweb2-{_code[:3]}"] = ("epfml/FineWeb2-HQ", _code, "train", "text")

# Presets: the reference's corpora and its multilingual tokenizer tiers. Ratios are shares
# of the document stream by UTF-8 bytes; meta.json records the token shares obtained.
PRESETS = {
    "fineweb": {"vocab_size": 32000, "sources": {"fineweb": 1.0},
                "about": "FineWeb-Edu sample-10BT, English, 32K tokenizer (nano-small)"},
    "en_only": {"vocab_size": 32000,
                "sources": {"fineweb": 0.55, "dclm": 0.25, "stack": 0.10, "megamath": 0.10},
                "about": "the reference's English mix, 32K tokenizer"},
    "goldie": {"vocab_size": 48000,
               "sources": {"fineweb": 0.45, "fineweb2-rus": 0.17, "fineweb2-fra": 0.12,
                           "fineweb2-deu": 0.12, "stack": 0.09, "megamath": 0.05},
               "about": "the reference's goldie mix (EN RU FR DE), 48K tokenizer"},
    # The reference names the 64K and 96K tiers' languages but not their ratios; these
    # ratios are ours: English keeps ~40%, code and math ~12%, the rest split evenly.
    "multilingual64k": {"vocab_size": 64000,
                        "sources": {"fineweb": 0.40, "fineweb2-rus": 0.07, "fineweb2-fra": 0.07,
                                    "fineweb2-deu": 0.07, "fineweb2-spa": 0.07, "fineweb2-por": 0.06,
                                    "fineweb2-ukr": 0.07, "fineweb2-tur": 0.07, "stack": 0.07,
                                    "megamath": 0.05},
                        "about": "64K tier (medium): EN RU FR DE ES PT UK TR + code + math"},
    "multilingual96k": {"vocab_size": 96000,
                        "sources": {"fineweb": 0.36, "fineweb2-rus": 0.05, "fineweb2-fra": 0.05,
                                    "fineweb2-deu": 0.05, "fineweb2-spa": 0.05, "fineweb2-por": 0.04,
                                    "fineweb2-ukr": 0.04, "fineweb2-tur": 0.04, "fineweb2-arb": 0.04,
                                    "fineweb2-hin": 0.04, "fineweb2-cmn": 0.05, "fineweb2-jpn": 0.04,
                                    "fineweb2-kor": 0.03, "stack": 0.07, "megamath": 0.05},
                        "about": "96K tier (large, big): + AR HI ZH JA KO; forces uint32 shards"},
}
PRESETS["medium"] = PRESETS["multilingual64k"]
PRESETS["large"] = PRESETS["multilingual96k"]


def jsonl_objects(f: pathlib.Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed object) for each non-blank line of a JSONL file."""
    with _open_text(f) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{f}:{lineno}: invalid JSON ({e.msg})") from None


def split_text_documents(text: str, max_chars: int = MAX_DOC_CHARS) -> Iterator[str]:
    """Blank-line triples separate documents; over-long ones are cut at line ends."""
    for piece in text.split("\n\n\n"):
        if not piece.strip():
            continue
        while len(piece) > max_chars:
            cut = piece.rfind("\n", 0, max_chars)
            cut = max_chars if cut <= 0 else cut + 1
            head, piece = piece[:cut], piece[cut:]
            if head.strip():
                yield head
        if piece.strip():
            yield piece


def _open_text(path: pathlib.Path):
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")


def _kind(path: pathlib.Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last == ".jsonl":
        return "jsonl"
    if last == ".parquet":
        return "parquet"
    return "text"


@dataclass
class LocalSource:
    """Files and folders on disk (folders are walked recursively in sorted order)."""
    paths: list
    text_field: str = "text"
    name: str = "local"
    files: list = field(default_factory=list)

    def __post_init__(self):
        files = []
        for p in self.paths:
            p = pathlib.Path(p).expanduser()
            if p.is_dir():
                found = sorted(f for f in p.rglob("*")
                               if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
                               and (f.suffix.lower() in FOLDER_SUFFIXES
                                    or (f.suffix == ".gz" and "".join(f.suffixes[-2:-1]).lower() in FOLDER_SUFFIXES)))
                if not found:
                    raise DataError(f"{p}: folder has no .txt, .md, .jsonl or .parquet files")
                files += found
            elif p.is_file():
                files.append(p)
            elif p.exists():
                raise DataError(f"{p}: not a regular file or folder")
            else:
                raise DataError(f"{p}: no such file or folder")
        for f in files:
            if not os.access(f, os.R_OK):
                raise DataError(f"{f}: unreadable (permission denied)")
        self.files = files

    def describe(self) -> dict:
        entries = []
        for f in self.files:
            st = f.stat()
            entries.append({"path": str(f.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
        return {"kind": "local", "name": self.name, "text_field": self.text_field, "files": entries}

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def documents(self) -> Iterator[str]:
        for f in self.files:
            kind = _kind(f)
            try:
                if kind == "jsonl":
                    yield from self._jsonl(f)
                elif kind == "parquet":
                    yield from self._parquet(f)
                else:
                    with _open_text(f) as fh:
                        text = fh.read()
                    yield from split_text_documents(text)
            except DataError:
                raise
            except UnicodeDecodeError as e:
                raise DataError(f"{f}: not UTF-8 text (byte {e.start}: {e.reason})") from None
            except (OSError, EOFError, gzip.BadGzipFile) as e:
                raise DataError(f"{f}: unreadable ({getattr(e, 'strerror', None) or e})") from None

    def _jsonl(self, f: pathlib.Path) -> Iterator[str]:
        for lineno, obj in jsonl_objects(f):
            text = obj.get(self.text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{f}:{lineno}: no {self.text_field!r} text field in this JSON line")
            if text.strip():
                yield text

    def _parquet(self, f: pathlib.Path) -> Iterator[str]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{f}: reading .parquet needs pyarrow (pip install pyarrow)") from None
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:
            raise DataError(f"{f}: not a readable parquet file ({e})") from None
        if self.text_field not in pf.schema_arrow.names:
            raise DataError(f"{f}: no {self.text_field!r} column (columns: {', '.join(pf.schema_arrow.names)})")
        row = 0
        for batch in pf.iter_batches(columns=[self.text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                row += 1
                if text is None:
                    raise DataError(f"{f}: row {row} has no {self.text_field!r} text (null)")
                if text.strip():
                    yield text


@dataclass
class HFSource:
    """A Hugging Face dataset read with ``datasets.load_dataset(..., streaming=True)``."""
    name: str
    path: str
    config: str | None = None
    split: str = "train"
    text_field: str = "text"

    @classmethod
    def parse(cls, spec: str) -> "HFSource":
        """``fineweb`` / ``dclm`` / … (see HF_DATASETS) or ``owner/name[:config[:split[:field]]]``."""
        if spec in HF_DATASETS:
            path, config, split, text_field = HF_DATASETS[spec]
            return cls(spec, path, config, split, text_field)
        if "/" not in spec:
            raise DataError(f"--hf {spec}: unknown dataset (short names: {', '.join(sorted(HF_DATASETS))}; "
                            "or give owner/name[:config[:split[:text_field]]])")
        parts = spec.split(":")
        path, rest = parts[0], parts[1:] + [None] * 3
        return cls(spec, path, rest[0] or None, rest[1] or "train", rest[2] or "text")

    def describe(self) -> dict:
        return {"kind": "hf", "name": self.name, "path": self.path, "config": self.config,
                "split": self.split, "text_field": self.text_field}

    def total_bytes(self) -> int | None:
        return None

    def documents(self) -> Iterator[str]:
        try:
            import datasets
        except ImportError:
            raise DataError(f"{self.path}: streaming from Hugging Face needs the datasets package "
                            "(pip install datasets)") from None
        try:
            ds = datasets.load_dataset(self.path, name=self.config, split=self.split, streaming=True)
        except Exception as e:
            raise DataError(f"{self.path}: cannot open Hugging Face dataset ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
        for i, row in enumerate(ds):
            text = row.get(self.text_field)
            if not isinstance(text, str):
                raise DataError(f"{self.path}: row {i} has no {self.text_field!r} text field")
            if text.strip():
                yield text


@dataclass
class BuiltinSource:
    name: str = "builtin"

    def describe(self) -> dict:
        from . import builtin
        return builtin.describe()

    def total_bytes(self) -> int:
        from . import builtin
        return builtin.approximate_bytes()

    def documents(self) -> Iterator[str]:
        from . import builtin
        return builtin.documents()


class Mixture:
    """Several sources interleaved at given ratios, by UTF-8 bytes, deterministically:
    the next document always comes from the source furthest below its share. A source
    that runs out ends the mixture (so the ratios hold)."""

    def __init__(self, sources: list, ratios: list[float]):
        if len(sources) != len(ratios) or not sources:
            raise DataError("mixture: need one ratio per source")
        if any(r <= 0 for r in ratios):
            raise DataError(f"mixture: ratios must be positive, got {ratios}")
        total = sum(ratios)
        self.sources = sources
        self.ratios = [r / total for r in ratios]

    def documents_tagged(self) -> Iterator[tuple[str, int]]:
        if len(self.sources) == 1:
            for d in self.sources[0].documents():
                yield d, 0
            return
        iters = [iter(s.documents()) for s in self.sources]
        taken = [0] * len(iters)
        while True:
            i = min(range(len(iters)), key=lambda j: (taken[j] / self.ratios[j], j))
            try:
                doc = next(iters[i])
            except StopIteration:
                return
            taken[i] += len(doc.encode("utf-8"))
            yield doc, i
