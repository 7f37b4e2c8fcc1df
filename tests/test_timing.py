"""Timing: samples alternate between implementations; throughput in one place."""

from __future__ import annotations

import math

from convgen.runtime import timing


def test_bench_alternates_implementations_in_rounds(monkeypatch):
    """Each implementation gets its samples in blocks that alternate with the others',
    so a slow spell of the machine cannot fall on one of them only, in an order that
    rotates each round."""
    monkeypatch.setattr(timing, "wait_until_idle", lambda: None)
    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("a", "b")}
    times = timing.time_host_rounds(calls, repeats=6, warmup=2, min_sample_ms=0.0, rounds=3)
    assert set(times) == {"a", "b"}
    timed = order[6:]  # after each one's calibration: its warm-up calls and one timed
    # each block: the warm-up calls again (the other's block left the caches cold),
    # then 2 samples; rounds a b, b a, a b
    block = 2 + 2
    assert timed == ["a"] * block + ["b"] * 2 * block + ["a"] * 2 * block + ["b"] * block


def test_gflops_of_failed_runs_is_zero():
    assert timing.gflops(2_000_000_000, 0.5) == 4.0
    assert timing.gflops(10, math.inf) == 0.0


def test_no_host_calls_no_timings():
    """`convgen bench` on CUDA kernels alone times them on the GPU and hands the host
    rounds nothing: that is no timings, not a division by zero."""
    assert timing.time_host_rounds({}, repeats=6, warmup=2, min_sample_ms=0.0) == {}
