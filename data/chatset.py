"""The built-in chat set: questions and answers every Python installation already carries.

    python -m data.chatset --output chats.jsonl            # all of them (a few thousand)
    python -m data.chatset --output chats.jsonl --limit 2000

For each public function, class and method of the standard library with a docstring (read from
the sources with ``ast``, like the built-in corpus: nothing is imported), one conversation:
user "What does `json.dumps` do?" → assistant: the docstring's first sentence ("Serialize ``obj``
to a JSON formatted ``str``."). Deterministic for a Python version; no network. The lines are the
JSONL that ``python -m nanollama_jax.sft --data`` reads ({"user": …, "assistant": …}).
"""
from __future__ import annotations

import ast
import json
import re
from typing import Iterator

from nanollama_base.cli import ArgumentParser, run_cli
from nanollama_base.files import atomic_path

from .builtin import _SKIP_DIRS, stdlib_root

MAX_ANSWER_CHARS = 160
MIN_ANSWER_CHARS = 12


def first_sentence(doc: str) -> str | None:
    """The docstring's first sentence (its first paragraph up to the first full stop), on one line;
    None when there is none of a useful length (signatures, 'XXX' notes, very long openings)."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    m = re.match(r"(.+?[.!?])(\s|$)", para)
    sentence = m.group(1) if m else None
    if not sentence or not (MIN_ANSWER_CHARS <= len(sentence) <= MAX_ANSWER_CHARS) or not sentence[0].isupper():
        return None
    return sentence


def _module_pairs(path, module: str) -> Iterator[tuple[str, str]]:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return

    def walk(body, owner: str):
        for node in body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                name = f"{owner}.{node.name}"
                answer = first_sentence(ast.get_docstring(node) or "")
                if answer:
                    yield name, answer
                if isinstance(node, ast.ClassDef):
                    yield from walk(node.body, name)

    yield from walk(tree.body, module)


def conversations() -> Iterator[dict]:
    """{"user": question, "assistant": answer} for the standard library, in a fixed order."""
    root = stdlib_root()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]) or rel.name.startswith("test_") or (
                rel.name.startswith("_") and rel.name != "__init__.py"):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        for name, answer in _module_pairs(path, module):
            yield {"user": f"What does `{name}` do?", "assistant": answer}


def write_chatset(output, limit: int | None = None) -> int:
    """Write the set (at most `limit` conversations, spread evenly over the library) as JSONL."""
    chats = list(conversations())
    if limit and limit < len(chats):
        chats = [chats[i * len(chats) // limit] for i in range(limit)]
    with atomic_path(output) as tmp:
        tmp.write_text("".join(json.dumps(c) + "\n" for c in chats))
    return len(chats)


def main(argv=None):
    p = ArgumentParser(prog="python -m data.chatset", description=__doc__)
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument("--limit", type=int, help="at most this many conversations (spread over the library)")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    run_cli(p.prog, lambda: print(f"wrote {write_chatset(args.output, args.limit)} conversations to {args.output}"))


if __name__ == "__main__":
    main()
