"""Personality data -> token shards with the base data's tokenizer.

    python -m data.prepare_personality --input chats.jsonl --tokenizer-dir data/base --output data/persona

Input shapes (one JSON object per line, or plain text):

* ``{"messages": [{"role": "user", "content": "…"}, …]}``
* ``{"instruction": "…", "response": "…"}``
* ``{"user": "…", "assistant": "…"}``
* ``{"text": "…"}``
* plain text files (not ``.jsonl``): documents separated by blank-line triples (``"\\n\\n\\n"``)

The parts of one example (message contents, instruction + response, …) are joined with
``"\\n\\n"`` into one document; every document starts with BOS. The output is a normal data
folder (``meta.json``, ``tokenizer.model``, ``train/``) whose tokenizer is a copy of the
base folder's, its sha256 recorded and checked. Training mixes it in with
``--personality-dir`` at an exact per-batch ratio.
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import Iterator

from nanollama_base.cli import ArgumentParser, run_cli
from nanollama_base.files import sha256_file
from nanollama_base.shards import DataError, load_meta
from .prepare import DEFAULT_SHARD_SIZE, prepare
from .sources import LocalSource, _kind, _open_text, jsonl_objects, split_text_documents

SHAPES = "messages, instruction/response, user/assistant or text"


def _str(value, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def render(obj, where: str) -> str:
    """One JSONL object -> one document (parts joined with a blank line)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with {SHAPES}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        parts = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "content" not in m:
                raise DataError(f"{where}: message {i} has no 'content'")
            parts.append(_str(m["content"], where, f"messages[{i}].content"))
        return "\n\n".join(parts)
    if "instruction" in obj and "response" in obj:
        return "\n\n".join([_str(obj["instruction"], where, "instruction"), _str(obj["response"], where, "response")])
    if "user" in obj and "assistant" in obj:
        return "\n\n".join([_str(obj["user"], where, "user"), _str(obj["assistant"], where, "assistant")])
    if "text" in obj:
        return _str(obj["text"], where, "text")
    raise DataError(f"{where}: no text in this JSON line (expected {SHAPES}; keys: {', '.join(map(str, obj)) or 'none'})")


@dataclass
class PersonalitySource:
    paths: list
    name: str = "personality"
    files: list = field(default_factory=list)

    def __post_init__(self):
        self._local = LocalSource(self.paths)  # resolves folders, checks existence/readability
        self.files = self._local.files

    def describe(self) -> dict:
        return dict(self._local.describe(), kind="personality", name=self.name)

    def total_bytes(self) -> int:
        return self._local.total_bytes()

    def documents(self) -> Iterator[str]:
        for f in self.files:
            try:
                if _kind(f) == "jsonl":
                    for lineno, obj in jsonl_objects(f):
                        doc = render(obj, f"{f}:{lineno}")
                        if doc.strip():
                            yield doc
                elif _kind(f) == "parquet":
                    raise DataError(f"{f}: personality data must be .jsonl or plain text")
                else:
                    with _open_text(f) as fh:
                        yield from split_text_documents(fh.read())
            except UnicodeDecodeError as e:
                raise DataError(f"{f}: not UTF-8 text (byte {e.start}: {e.reason})") from None
            except OSError as e:
                raise DataError(f"{f}: unreadable ({e.strerror or e})") from None


def prepare_personality(inputs, tokenizer_dir, output, *, tokenizer_file=None, val_fraction=0.0,
                        shard_size=DEFAULT_SHARD_SIZE, workers=None, force=False, progress=True,
                        log=print) -> pathlib.Path:
    base = load_meta(tokenizer_dir)  # checks the base tokenizer against its meta.json
    if base["tokenizer_path"] is None:
        raise DataError(f"{tokenizer_dir}: no tokenizer.model in the base data folder")
    base_sha = base["tokenizer_sha256"] or sha256_file(base["tokenizer_path"])
    if tokenizer_file is not None:
        given = pathlib.Path(tokenizer_file).expanduser()
        if not given.is_file():
            raise DataError(f"{given}: tokenizer not found")
        sha = sha256_file(given)
        if sha != base_sha:
            raise DataError(f"{given}: tokenizer sha256 {sha[:12]}… differs from the base data's "
                            f"{base_sha[:12]}… ({base['dir'] / 'meta.json'}); personality data must use the base tokenizer")
    source = PersonalitySource(list(inputs))
    return prepare(output, source=source, tokenizer_file=base["tokenizer_path"], val_fraction=val_fraction,
                   shard_size=shard_size, workers=workers, force=force,
                   progress=progress, log=log, force_dtype=base["dtype"],
                   extra_meta={"personality": True, "base_data": str(base["dir"].resolve()),
                               "base_tokenizer_sha256": base_sha})


EXAMPLES = """\
examples:
  python -m data.prepare_personality --input chats.jsonl --tokenizer-dir data/base --output data/persona
  python -m data.prepare_personality --input letters.txt more.jsonl --tokenizer-dir data/base \\
      --output data/persona --tokenizer data/base/tokenizer.model
then train with: python -m nanollama_jax.train --data data/base --personality-dir data/persona --personality-ratio 0.2
"""


def main(argv=None) -> None:
    p = ArgumentParser(
        prog="python -m data.prepare_personality",
        description="Tokenize personality data (JSONL: messages, instruction/response, user/assistant, text; "
                    "or plain text split on blank-line triples) with the base data's tokenizer.",
        epilog=EXAMPLES)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="JSONL or text files (or folders)")
    p.add_argument("--tokenizer-dir", required=True, metavar="DIR",
                   help="the base data folder (made by data.prepare) whose tokenizer to use")
    p.add_argument("--tokenizer", metavar="FILE", help="optional: a tokenizer.model that must match the base one")
    p.add_argument("--output", required=True, metavar="DIR", help="output folder")
    p.add_argument("--val-fraction", type=float, default=0.0, help="share of examples held out (default 0)")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    run_cli(p.prog, lambda: prepare_personality(
        args.input, args.tokenizer_dir, args.output, tokenizer_file=args.tokenizer, val_fraction=args.val_fraction,
        workers=args.workers, force=args.force, progress=not args.quiet),
        interrupted=f"interrupted; {args.output} left as it was")


if __name__ == "__main__":
    main()
