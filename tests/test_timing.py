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


def test_peak_is_measured_at_the_codes_vector_width(monkeypatch):
    """AVX2 code on a machine with 512-bit FMA units reaches half its 512-bit peak, so
    its "% of peak" is taken against the 256-bit loop only."""
    import subprocess

    built: list[str] = []

    def fake_gcc(cmd: list[str], **_kwargs: object) -> subprocess.CompletedProcess[str]:
        built.extend(arg for arg in cmd if arg.startswith("-DVBYTES="))
        return subprocess.CompletedProcess(cmd, 1)  # no library: nothing is run

    monkeypatch.setattr(timing, "_peak_cache", {})
    monkeypatch.setattr(subprocess, "run", fake_gcc)
    monkeypatch.setattr("shutil.which", lambda _name: "/usr/bin/gcc")
    assert timing.measure_cpu_peak(1, 256) is None
    assert built == ["-DVBYTES=32"]
    built.clear()
    timing.measure_cpu_peak(1, 512)
    assert built == ["-DVBYTES=32", "-DVBYTES=64"]


def test_target_records_name_the_width_schedules_tile_by():
    """A manifest's target record (runtime side) and the compiler's hardware model agree
    on the vector width of every CPU key."""
    from convgen.compiler.targets import resolve_target
    from convgen.runtime.manifest import TargetRecord

    for cpu in ("znver3", "znver4", "haswell", "skylake-avx512", "x86-64"):
        target = resolve_target(f"llvm:{cpu}")
        record = TargetRecord(cpu, "llvm", target.key(), target.config_dict)
        assert record.vector_bits == target.vector_bits(), target.key()
    assert {resolve_target(f"llvm:{c}").vector_bits() for c in ("znver3", "znver4")} == {
        256, 512}
