"""nanollama-jax: train Llama 3 from scratch in JAX, export it, move personalities between models.

The project keeps the pipeline's folders as top-level packages (`data`, `export`, `configs`), so
`python -m data.prepare` runs from a checkout; an installed wheel installs them under the same
names. Those names are generic, so before anything else we check that they are ours — the folders
beside this package — and fail with one line naming the clash otherwise (see README, Packaging).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

SIBLINGS = ("data", "export", "configs")


def check_siblings() -> None:
    """Raise ImportError when `data`, `export` or `configs` resolve to someone else's module."""
    root = Path(__file__).resolve().parent.parent
    for name in SIBLINGS:
        spec = importlib.util.find_spec(name)
        where = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        if where is None or where.parent.parent != root:
            found = "nothing" if spec is None else str(where or spec.name)
            raise ImportError(f"nanollama-jax: the top-level name {name!r} resolves to {found}, not to "
                              f"{root / name}; another package or a file named {name} shadows ours "
                              f"(uninstall or rename it, or run from elsewhere)")


check_siblings()
