"""workbench._timing.timed_ms: one timing per call, warm-up calls untimed."""

import time

from workbench._timing import timed_ms


def test_timed_ms_times_each_call_after_the_warmup():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    ts = timed_ms(fn, 3, "cpu", warmup=2)
    assert len(calls) == 5 and len(ts) == 3
    assert all(t >= 2.0 for t in ts)  # milliseconds, each around one 2 ms call
