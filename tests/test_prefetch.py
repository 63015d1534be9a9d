"""Overlap: batches made ahead on a thread are exactly the batches indexed directly (so resume is
unchanged), a failure in the thread reaches the consumer, and the device clock counts completions."""
import threading
import time

import numpy as np
import pytest

from nanollama_jax.input import Batches
from nanollama_jax.prefetch import DeviceClock, Prefetch


def test_prefetched_batches_equal_direct_indexing(text_data):
    batches = Batches(text_data, seq_len=64, global_batch=8, seed=3)
    for start in (0, 7):  # a fresh run and a resumed one
        with Prefetch(lambda k: batches[k], start, start + 12, depth=2) as ahead:
            got = [ahead.next() for _ in range(12)]
        fresh = Batches(text_data, seq_len=64, global_batch=8, seed=3)  # nothing cached from the run above
        for k, batch in zip(range(start, start + 12), got):
            np.testing.assert_array_equal(batch, fresh[k])


def test_the_thread_stays_at_most_depth_ahead_and_stops_on_close():
    made = []
    ahead = Prefetch(lambda k: made.append(k) or k, 0, 1000, depth=2)
    assert ahead.next() == 0
    time.sleep(0.3)
    assert len(made) <= 1 + 2 + 1  # the one consumed, two queued, one waiting to be queued
    ahead.close()
    assert not any(t.name == "batch-prefetch" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(ValueError, match="depth"):
        Prefetch(lambda k: k, 0, 1, depth=0)


def test_a_failure_in_the_thread_is_raised_where_its_batch_is_wanted():
    def make(k):
        if k == 3:
            raise OSError("shard vanished")
        return k

    with Prefetch(make, 0, 10) as ahead:
        assert [ahead.next() for _ in range(3)] == [0, 1, 2]
        with pytest.raises(OSError, match="shard vanished"):
            ahead.next()
    with Prefetch(make, 0, 2) as ahead:
        ahead.next(), ahead.next()
        with pytest.raises(IndexError):
            ahead.next()


def test_device_clock_skips_the_first_completion_and_pauses():
    clock = DeviceClock()
    assert clock.completed() is None  # the first step of an invocation includes compilation
    time.sleep(0.05)
    assert 0.04 < clock.completed() < 1.0
    time.sleep(0.2)
    clock.restart()  # host work (validation, a save) is not a step
    assert clock.completed() < 0.1
