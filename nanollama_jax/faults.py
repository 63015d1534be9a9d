"""Fault injection for the soak benchmark (benchmarks/soak.py): with NANOLLAMA_KILL_AT=PHASE@STEP
in the environment, the training process SIGKILLs itself at that point of that step, so a kill
lands exactly inside a save, an evaluation or a metrics write. Unset (always, outside the soak
test) every call is a comparison of two strings.

Phases: `step` (the step dispatched, not finished), `save` (an async save under way), `eval`
(between validation batches), `metrics` (half a metrics line written: a torn line).
"""
from __future__ import annotations

import os
import signal

KILL_AT = os.environ.get("NANOLLAMA_KILL_AT", "")


def kill_point(phase: str, step: int) -> None:
    if KILL_AT and KILL_AT == f"{phase}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def torn_write(fd: int, data: bytes, step: int) -> None:
    """At the `metrics` kill point: write half of `data`, then die."""
    if KILL_AT and KILL_AT == f"metrics@{step}":
        os.write(fd, data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
