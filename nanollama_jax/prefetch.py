"""Keeping the device busy: batches prepared ahead on a background thread, and step times read
from the device's completions rather than from the host's dispatch.

    ahead = Prefetch(lambda k: setup.train_batch(batches[k]), start, stop)   # batches k = start, start+1, ...
    for k in range(start, stop):
        batch = ahead.next()          # ready already: made while the device ran step k - 1
    ahead.close()

Batch k is still `make(k)`, a pure function of k (the data's seed and k), so prefetching changes
nothing a run computes and resume needs only the step. A failure in the thread is raised by the
`next()` that wanted its batch.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

_DONE = object()


class Prefetch:
    """`make(k)` for k in [start, stop), computed `depth` batches ahead of the consumer."""

    def __init__(self, make: Callable[[int], Any], start: int, stop: int, depth: int = 2):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._next_k = start
        self._end = stop
        self._thread = threading.Thread(target=self._fill, args=(make, start, stop), daemon=True,
                                        name="batch-prefetch")
        self._thread.start()

    def _fill(self, make, start: int, stop: int) -> None:
        for k in range(start, stop):
            try:
                item = (k, make(k), None)
            except BaseException as e:  # handed to the consumer, raised where it asks for batch k
                item = (k, None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or item[2] is not None:
                return

    def next(self):
        """Batch k (the next in order); waits only when the thread has fallen behind."""
        if self._next_k >= self._end:
            raise IndexError(f"no batch past {self._end - 1}")
        k, value, error = self._queue.get()
        if error is not None:
            raise error
        assert k == self._next_k, (k, self._next_k)  # one producer, FIFO: always in order
        self._next_k += 1
        return value

    def close(self) -> None:
        """Stop the thread (a loop that ends early leaves batches unread)."""
        self._stop.set()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DeviceClock:
    """Step time as the device sees it: the time between consecutive step completions (a step's
    scalars become readable when it completes). `restart()` after host work that left the device
    idle (validation, a checkpoint, compilation), so that gap is not counted as a step."""

    def __init__(self):
        self._last: float | None = None

    def restart(self) -> None:
        self._last = time.perf_counter()

    def completed(self) -> float | None:
        """Call right after a step's results were read; its device time, or None after a pause."""
        now = time.perf_counter()
        dt = None if self._last is None else now - self._last
        self._last = now
        return dt
