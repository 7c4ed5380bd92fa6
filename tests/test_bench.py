"""The benchmark's CPU timing helper: interleaved candidates, each figure its own call's time."""
from __future__ import annotations

import time

from lowrank.bench.timing import time_ms_each


def test_time_ms_each_times_each_candidate():
    calls = {"short": 0, "long": 0}

    def short():
        calls["short"] += 1
        time.sleep(0.001)

    def long():
        calls["long"] += 1
        time.sleep(0.004)

    ms = time_ms_each({"short": short, "long": long}, "cpu", min_run_time=0.05)
    assert list(ms) == ["short", "long"]
    assert 0.9 <= ms["short"] < 3.0 and 3.6 <= ms["long"] < 8.0, ms
    assert calls["short"] > calls["long"] >= 12  # warm-up + at least 11 interleaved blocks each


def test_time_ms_each_reports_a_slow_call_from_its_single_run():
    calls = []
    ms = time_ms_each({"slow": lambda: calls.append(time.sleep(0.03))}, "cpu", max_call_s=0.01)
    assert len(calls) == 1 and 25 <= ms["slow"] < 200
