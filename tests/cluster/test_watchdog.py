"""The watchdog that bounds a wait with no timeout of its own (a CUDA event synchronize)."""

from __future__ import annotations

import threading
import time

from pdserve.cluster.kv_transport.watchdog import Watchdog


def test_a_wait_that_outlasts_its_bound_is_expired():
    released = threading.Event()
    dog = Watchdog(released.set, "test-watch", tick_s=0.02)
    dog.arm(0.05)
    assert released.wait(5.0)  # the "wait" ends only because the watchdog expired it
    assert dog.disarm() is True
    dog.stop()


def test_a_wait_within_its_bound_is_left_alone():
    calls = []
    dog = Watchdog(lambda: calls.append(1), "test-watch", tick_s=0.02)
    for _ in range(3):  # armed again after each wait
        dog.arm(10.0)
        time.sleep(0.03)
        assert dog.disarm() is False
    time.sleep(0.1)
    assert calls == []
    dog.stop()
