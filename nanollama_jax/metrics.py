"""metrics.jsonl: one JSON object per line, appended so that a kill cannot corrupt it.

Each record is written with a single `os.write` on a file opened with O_APPEND, so a process
killed at any moment leaves either the whole line or none of it. A line torn some other way (a
crash of the machine, a full disk, an older version of this code) can only be the last one:
:func:`read_metrics` drops it with a warning instead of failing, and a resumed run rewrites the
file without it.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from nanollama_base.files import atomic_path

from . import faults


def read_metrics(path: str | Path, warn=None) -> list[dict]:
    """The records of a metrics file. A torn last line (not JSON, no newline after it) is dropped
    with a warning; a bad line anywhere else is corruption: ValueError naming the file and line."""
    path = Path(path)
    warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")  # the last element is what follows the last newline: "" when complete
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):  # no newline after it: a write cut short (each record ends with one)
                warn(f"{path}:{i}: dropped a torn last line (the run was interrupted while writing it)")
                continue
            raise ValueError(f"{path}:{i}: not a JSON line ({e.msg})") from None
    return rows


class MetricsLog:
    """A run's metrics.jsonl, written by one process (`enabled`). Opening it for a resume at
    `resume_step` rewrites it atomically without records past that step or a torn last line."""

    def __init__(self, path: Path, resume_step: int, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, **record) -> None:
        if not self.enabled:
            return
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            faults.torn_write(fd, line, record.get("step", -1))
            written = os.write(fd, line)
            if written != len(line):  # only a full disk does this; say so rather than leave half a line
                raise OSError(28, "short write (disk full?)", str(self.path))
        finally:
            os.close(fd)
