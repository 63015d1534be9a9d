"""The built-in default corpus: English every Python installation already carries.

* the interpreter's documentation topics (``pydoc_data.topics``: the language reference
  pages that ``help("for")`` shows), one document per topic;
* the standard library's docstrings, read from the ``.py`` sources with ``ast`` (nothing is
  imported or executed), one document per module: the module docstring, then each class,
  function and method docstring under its signature.

About 2 MB of text (~0.5M tokens at a 4096 vocabulary): enough for a CPU-sized model to
visibly learn English words, punctuation and the shape of technical prose. No network.
The corpus depends only on the running Python version; ``BUILTIN_VERSION`` is bumped
whenever the extraction rules change so cached preparations are rebuilt.
"""

from __future__ import annotations

import ast
import pathlib
import sys
import sysconfig
from typing import Iterator

BUILTIN_VERSION = 1
MIN_DOCSTRING_CHARS = 40
# Folders of the standard library that hold tests, demos or vendored code, not prose.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib",
              "lib2to3", "turtledemo", "__pycache__", "ensurepip", "venv", "pydoc_data"}


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def describe() -> dict:
    """What the corpus is made of (recorded in meta.json, part of the cache key)."""
    return {
        "kind": "builtin",
        "name": "builtin",
        "builtin_version": BUILTIN_VERSION,
        "python": sys.version.split()[0],
        "implementation": sys.implementation.name,
        "stdlib": str(stdlib_root()),
    }


def _signature(node: ast.AST) -> str:
    if isinstance(node, ast.ClassDef):
        return f"class {node.name}"
    try:
        args = ast.unparse(node.args)
    except Exception:  # pragma: no cover - ast.unparse exists on 3.9+
        args = "..."
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    return f"{prefix} {node.name}({args})"


def _module_document(path: pathlib.Path, module: str) -> str | None:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return None
    parts = []
    doc = ast.get_docstring(tree)
    if doc and len(doc) >= MIN_DOCSTRING_CHARS:
        parts.append(f"Module {module}\n\n{doc}")

    def walk(body, owner: str):
        for node in body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.name.startswith("_") and not (node.name.startswith("__") and node.name.endswith("__")):
                    continue
                d = ast.get_docstring(node)
                name = f"{owner}.{node.name}" if owner else node.name
                if d and len(d) >= MIN_DOCSTRING_CHARS:
                    parts.append(f"{_signature(node)}  # {module}.{name}\n{d}")
                if isinstance(node, ast.ClassDef):
                    walk(node.body, name)

    walk(tree.body, "")
    if not parts:
        return None
    return "\n\n".join(parts) + "\n"


def documents() -> Iterator[str]:
    """Yield the corpus documents in a fixed order (read once per process, then cached)."""
    global _CACHE
    if _CACHE is None:
        _CACHE = tuple(_read_documents())
    return iter(_CACHE)


_CACHE = None


def _read_documents() -> Iterator[str]:
    import pydoc_data.topics as topics

    for name in sorted(topics.topics):
        text = topics.topics[name].strip("\n")
        if text.strip():
            yield text + "\n"
    root = stdlib_root()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        module = ".".join(rel.with_suffix("").parts)
        if module.endswith(".__init__"):
            module = module[: -len(".__init__")]
        doc = _module_document(path, module)
        if doc:
            yield doc


def approximate_bytes() -> int:
    """Rough size for progress bars (the real count is taken while reading)."""
    return 2_000_000
