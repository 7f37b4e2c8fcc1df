"""Timing on the host and on CUDA devices, and the CPU's measured FMA peak.

Every number is a median over samples taken after warm-up; each sample runs the
call enough times to last about `min_sample_ms`, so timer resolution never
dominates. Host samples are taken in rounds that alternate between the calls
being compared (see `time_host_rounds`).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar


def gflops(flops: int, seconds: float) -> float:
    """Throughput in GFLOP/s (0 for a failed or unmeasured run: `seconds` not finite)."""
    return flops / seconds / 1e9 if math.isfinite(seconds) and seconds > 0 else 0.0


def geomean(ratios: list[float]) -> float:
    """The geometric mean: the average of speed-ups that multiply."""
    return math.exp(sum(math.log(x) for x in ratios) / len(ratios))


@dataclass
class Timing:
    """Seconds per call: median and the 10th/90th percentiles of the samples."""

    median: float
    p10: float
    p90: float

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        s = sorted(samples)
        pick = lambda q: s[min(len(s) - 1, int(q * len(s)))]  # noqa: E731
        return cls(statistics.median(s), pick(0.1), pick(0.9))


K = TypeVar("K")
_peak_cache: dict[tuple[int, int], float | None] = {}
# Timing blocks start once this process has used no CPU for a window: TVM's thread
# pool keeps yield-spinning for a while after a call, and a block started after a
# fixed pause could still run the next implementation beside it.
_IDLE_WINDOW_S = 0.05
_IDLE_WAIT_MAX_S = 1.0


def wait_until_idle() -> None:
    """Return once the process's threads have been idle for a window (or after a
    second): the previous implementation's thread pool has parked."""
    deadline = time.perf_counter() + _IDLE_WAIT_MAX_S
    while time.perf_counter() < deadline:
        t0 = os.times()
        time.sleep(_IDLE_WINDOW_S)
        t1 = os.times()
        if (t1.user + t1.system) - (t0.user + t0.system) < 0.01:  # under one clock tick
            return


def vm_call_timer() -> tuple[Callable[..., int], list[tuple[str, float]]]:
    """An instrument for a Relax VM (`vm.set_instrument`, through `tvm_ffi.convert`)
    that times every function the VM calls, and the list it appends (function name,
    seconds) to, in call order. The VM's builtins (its bookkeeping, reshapes' views)
    are left out. The instrument itself adds about 15 us to each call."""
    calls: list[tuple[str, float]] = []
    started: dict[str, float] = {}

    def instrument(func: Any, name: str, before: bool, ret: Any, *rest: Any) -> int:
        if name.startswith("vm.builtin."):
            return 0
        if before:
            started[name] = time.perf_counter()
        else:
            calls.append((name, time.perf_counter() - started[name]))
        return 0

    return instrument, calls


def measure_cpu_peak(n_threads: int, vector_bits: int = 512) -> float | None:
    """The CPU's fp32 FMA peak on `n_threads` for code of vectors up to `vector_bits`
    wide, measured (GFLOP/s): the best of a few runs of a register-only FMA loop, 256-
    and 512-bit wide where allowed. AVX2 code on an AVX-512 machine whose FMA units are
    512-bit (Zen 5, Xeon Scalable) reaches half that machine's 512-bit peak, so its
    "% of peak" is measured against the 256-bit loop. None without gcc."""
    key = (n_threads, vector_bits)
    if key in _peak_cache:
        return _peak_cache[key]
    import ctypes
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    src = Path(__file__).parent / "native" / "fma_peak.c"
    best = None
    if shutil.which("gcc"):
        with tempfile.TemporaryDirectory() as tmp:
            for vbytes in sorted({min(32, vector_bits // 8), vector_bits // 8}):
                lib = Path(tmp) / f"peak{vbytes}.so"
                proc = subprocess.run(
                    ["gcc", "-O2", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared",
                     "-fPIC", f"-DVBYTES={vbytes}", str(src), "-o", str(lib)],
                    capture_output=True,
                )
                if proc.returncode != 0:
                    continue
                f = ctypes.CDLL(str(lib)).fma_peak
                f.restype, f.argtypes = ctypes.c_double, [ctypes.c_long, ctypes.c_int]
                for _ in range(3):
                    g = f(20_000_000, n_threads)
                    best = g if best is None else max(best, g)
    _peak_cache[key] = best
    return best


def _calibrate(fn: Callable[[], Any], warmup: int, min_sample_ms: float) -> int:
    """Calls per sample, so that one sample lasts about `min_sample_ms`."""
    wait_until_idle()
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    return max(1, math.ceil(min_sample_ms / 1e3 / once))


def time_host_rounds(calls: dict[K, Callable[[], Any]], repeats: int, warmup: int,
                     min_sample_ms: float, rounds: int = 5) -> dict[K, Timing]:
    """`repeats` samples of each call, taken in `rounds` alternating blocks, so a slow
    spell on a shared machine falls on every implementation alike, not on whichever
    one it overlapped. Per-sample interleaving is worse: the thread pools that spin
    after each call (TVM's, PyTorch's OpenMP) then steal cores from the next
    implementation. So each block starts once the previous pool has parked, and
    measures the implementation's steady state: `warmup` untimed calls first, since
    after the other implementation's block (or any idle spell on a shared host) the
    first calls run on caches the other filled (MobileNetV2 deployed: 3.8-4.4 ms for
    the first call after a 0.1 s pause, 3.1-3.5 steady). The order rotates each
    round, so that no implementation always follows the same other one (in a fixed
    order the first of two identical ResNet-50 builds ran 2-4 ms slower than the
    second). (The measurements are in benchmarks/NOTES.md.) No calls (a run of CUDA
    kernels alone, timed on the GPU): no timings."""
    if not calls:
        return {}
    number = {name: _calibrate(fn, warmup, min_sample_ms) for name, fn in calls.items()}
    samples: dict[K, list[float]] = {name: [] for name in calls}
    per_round = max(1, math.ceil(repeats / rounds))
    names = list(calls)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = calls[name]
            wait_until_idle()
            for _ in range(warmup):
                fn()
            for _ in range(per_round):
                t0 = time.perf_counter()
                for _ in range(number[name]):
                    fn()
                samples[name].append((time.perf_counter() - t0) / number[name])
    return {name: Timing.of(s) for name, s in samples.items()}


def time_cuda(fn: Callable[[], Any], repeats: int, warmup: int, min_sample_ms: float) -> Timing:
    from convgen.runtime import cuda_driver

    timer = cuda_driver.EventTimer()
    for _ in range(warmup):
        fn()
    cuda_driver.synchronize()
    timer.start()
    fn()
    once = max(timer.stop_ms(), 1e-4)
    number = max(1, math.ceil(min_sample_ms / once))
    samples = []
    for _ in range(repeats):
        timer.start()
        for _ in range(number):
            fn()
        samples.append(timer.stop_ms() / 1e3 / number)
    return Timing.of(samples)


