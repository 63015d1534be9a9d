"""Raw text -> tokenizer + token shards (``python -m data.prepare``), personality data
(``python -m data.prepare_personality``), and the shard format shared with the loader.

``ensure_builtin()`` prepares the built-in default corpus once and returns its folder.
"""

from nanollama_base.shards import DataError


def ensure_builtin(vocab_size: int = 4096, **kwargs):
    """See :func:`data.prepare.ensure_builtin`."""
    from .prepare import ensure_builtin as _ensure
    return _ensure(vocab_size, **kwargs)


__all__ = ["DataError", "ensure_builtin"]
