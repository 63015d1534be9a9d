"""Stopping on SIGTERM / Ctrl-C: promptly, with a checkpoint, on every process at the same step.

The first signal asks the loop to save and exit at the end of the current optimizer step; the
user is told at once how long that is (from the measured step time), even while the main thread
is blocked inside a long jitted step, because a watcher thread reads the signal from
`signal.set_wakeup_fd` rather than waiting for Python's handler to run between steps. A second
signal exits at once (the async save in flight, if any, is abandoned: orbax never finalizes a
partial checkpoint), leaving the last good checkpoint.

With several processes a signal usually reaches one of them (a preempted host). Each step the
processes vote on "stop" with a tiny all-reduce on the devices, dispatched behind the step and read
at the next one (as the loop reads its metrics), so the host never waits for the step in flight and
the accelerators never idle for the vote. All processes act on the same vote, so they save the same
step and exit instead of the others hanging at the next collective.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Callable

import jax
import numpy as np

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """A context manager around the training loop. The loop calls `step_started()` before each
    step, `step_finished(seconds)` after it, and stops when `should_stop()` says so."""

    def __init__(self, last_good: Callable[[], int | None], log: Callable[[str], None] | None = None):
        self.last_good = last_good  # the newest complete checkpoint, for the messages
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.received: list[str] = []
        self.step_time: float | None = None  # mean seconds per step, compilation excluded
        self.step_t0 = time.monotonic()
        self.pending_vote = None  # (the device result of the last vote, this process's signal then)
        self.vote = None  # (the jitted max, the votes' sharding): built at the first vote

    def __enter__(self):
        self.previous = {s: signal.signal(s, lambda *_: None) for s in SIGNALS}  # the watcher does the work
        self.read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self.write_fd = write_fd
        self.previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self.watcher = threading.Thread(target=self._watch, name="stop-signals", daemon=True)
        self.watcher.start()
        return self

    def __exit__(self, *exc):
        signal.set_wakeup_fd(self.previous_wakeup)
        for s, h in self.previous.items():
            signal.signal(s, h)
        os.close(self.write_fd)  # the watcher reads end-of-file and ends
        self.watcher.join(timeout=5)
        os.close(self.read_fd)

    def _watch(self) -> None:
        while True:
            data = os.read(self.read_fd, 64)
            if not data:
                return
            for signum in data:
                if signum in SIGNALS:
                    self._on_signal(signal.Signals(signum).name)

    def _on_signal(self, name: str) -> None:
        self.received.append(name)
        good = self.last_good()
        good_text = f"step {good}" if good is not None else "none yet"
        if len(self.received) == 1:
            self.log(f"\n{name}: saving a checkpoint at the end of the current step ({self.eta_text()}); "
                     f"send it again to exit at once (the last good checkpoint is {good_text})")
        else:
            self.log(f"\n{name} again: exiting now without saving; the last good checkpoint is {good_text}")
            os._exit(128 + getattr(signal, name))

    def eta_text(self) -> str:
        if self.step_time is None:
            return "its duration is not known yet: the first step includes compilation"
        left = max(0.0, self.step_time - (time.monotonic() - self.step_t0))
        return f"in about {left:.0f}s" if left >= 1 else "in under a second"

    def step_started(self) -> None:
        self.step_t0 = time.monotonic()

    def step_finished(self, mean_step_time: float | None) -> None:
        self.step_time = mean_step_time

    @property
    def signal_name(self) -> str | None:
        return self.received[0] if self.received else None

    def should_stop(self) -> str | None:
        """The reason to stop now (a signal's name, or that another process got one), agreed by
        every process; None to go on. With several processes it is a collective, called at the same
        point of every step on all of them: it reads the vote dispatched at the previous call (done
        on the devices as soon as the previous step is) and dispatches this step's, so a signal is
        acted on one step later, by every process at the same step."""
        mine = self.signal_name
        if jax.process_count() == 1:
            return mine
        previous, self.pending_vote = self.pending_vote, (self.dispatch_vote(mine is not None), mine)
        if previous is None:
            return None
        outcome, mine_then = previous
        highest = int(outcome)  # 1 + the highest process index that had a signal, or 0
        if not highest:
            return None
        return mine_then or f"a signal to process {highest - 1}"

    def dispatch_vote(self, signalled: bool) -> jax.Array:
        """The max over processes of (process index + 1 if signalled else 0), as a device scalar
        whose value is not waited for here."""
        if self.vote is None:
            import jax.numpy as jnp
            from jax.sharding import Mesh, NamedSharding, PartitionSpec

            mesh = Mesh(np.array(jax.devices()), ("processes",))
            self.vote = (jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec())),
                         NamedSharding(mesh, PartitionSpec("processes")))
        vote_max, sharding = self.vote
        mine = np.full(jax.local_device_count(), (jax.process_index() + 1) * signalled, np.int32)
        return vote_max(jax.make_array_from_process_local_data(sharding, mine, (jax.device_count(),)))
