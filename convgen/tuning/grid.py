"""CPU tuning runs: measure candidate schedules on this machine, keep the fastest as a record.

The search space is convgen's templates' knob grids (`Template.candidates`),
measured in this process. Each spec's run:

  1. compiles every candidate not yet measured (`workers` threads: tvm.compile
     releases the GIL in C++), a failed build counting as infinitely slow;
  2. measures them one at a time (nothing else compiling meanwhile, so the
     timings are clean): median of `repeats` samples of >= `min_repeat_ms`,
     after checking the result against the numpy oracle. What is timed is what
     a bound kernel runs: the run-packed entry, on weights packed once, and on
     data where numpy usually puts a caller's array (`NUMPY_PLACEMENT`); where
     the packed weights outgrow L2, one call a sample, each after other traffic
     has evicted them, as a model's other layers do (`COLD_FLUSH_BYTES`);
  3. appends each measurement to a log (work_dir/<target key>/<code>/<spec>.jsonl,
     <code> a fingerprint of the schedule code, the tuner and TVM version), so an
     interrupted run (Ctrl-C, a crash) resumes where it stopped, and a run after
     the schedules changed measures afresh instead of trusting old timings;
  4. re-times the fastest few in alternating rounds (`_confirm`), so a burst of
     load from elsewhere on a shared machine cannot pick the winner;
  5. with --method meta|both, searches MetaSchedule's space too and times its
     best trace the same way;
  6. writes the winner to the record library atomically.

Budgets: `trials` caps the candidates measured per spec, `minutes` the whole
run; whatever was measured when a budget runs out still produces a record.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convgen.compiler.compute import WeightPacking, algorithm_of
from convgen.compiler.records import (
    META_SCHEDULE,
    Record,
    RecordedSchedule,
    record_spec,
    write_record,
)
from convgen.compiler.targets import TargetInfo
from convgen.errors import UnsupportedError
from convgen.runtime.cores import available_cores, use_all_cores
from convgen.runtime.kernel import CACHE_LINE, NUMPY_PLACEMENT, aligned_empty
from convgen.runtime.manifest import ENTRY, PACK_ENTRY, RUN_PACKED_ENTRY
from convgen.runtime.timing import gflops
from convgen.spec import ConvSpec


@dataclass(frozen=True)
class TuneOptions:
    trials: int | None = None  # candidates measured per spec (None: the whole grid)
    minutes: float | None = None  # wall-clock budget for the whole run
    workers: int = 0  # parallel compiles (0: every core)
    repeats: int = 10
    min_repeat_ms: float = 20.0
    method: str = "grid"  # "grid" (our templates' knobs), "meta" (MetaSchedule's space), "both"
    algorithm: str = "auto"  # "direct" or "winograd": that algorithm's templates only
    meta_trials: int = 64  # MetaSchedule trials per spec when --trials is not given
    library: Path | None = None  # default: records.library_path()
    work_dir: Path | None = None  # default: ~/.cache/convgen/tune


@dataclass(frozen=True)
class Candidate:
    """A template (or the family's fallback, by its name) with knobs, or a MetaSchedule
    trace (template "meta_schedule")."""

    template: str
    knobs: dict[str, Any]
    trace: list[Any] | None = None

    def key(self) -> str:
        return json.dumps({"template": self.template, "knobs": self.knobs}, sort_keys=True)

    def recorded(self) -> RecordedSchedule:
        return RecordedSchedule(self.template, self.knobs, self.trace)


@dataclass
class Measurement:
    candidate: Candidate
    seconds: float  # math.inf when it failed to build, run or check
    error: str = ""


def fastest(measurements: Iterable[Measurement]) -> Measurement | None:
    """The measurement with the lowest time among those that worked (None if none did)."""
    ok = [m for m in measurements if math.isfinite(m.seconds)]
    return min(ok, key=lambda m: m.seconds, default=None)


@dataclass
class TuneResult:
    spec: ConvSpec
    best: Measurement | None
    measured: int
    record_path: Path | None
    interrupted: bool = False
    seconds: float = 0.0  # the time tuning this spec took
    partial: bool = False  # its record is the best of part of the grid

    @property
    def gflops(self) -> float:
        return gflops(self.spec.flops, self.best.seconds) if self.best else 0.0


Progress = Callable[[ConvSpec, int, int, float], None]


def candidates_for(
    spec: ConvSpec, target: TargetInfo, per_template: int | None = None,
    algorithm: str = "auto",
) -> list[Candidate]:
    """Every template's candidates; with `per_template`, at most that many of each: the
    heuristic's default first, then points spread evenly over the rest of the grid.
    A grid counts even where the heuristic declines the spec: tuning is how such a
    template wins there."""
    from convgen.compiler.schedule import family

    found = []
    for template in family(target).templates:
        if algorithm not in ("auto", template.algorithm):
            continue
        points = template.candidates(spec, target)
        if per_template is not None and len(points) > per_template:
            has_default = template.heuristic(spec, target) is not None
            head, rest = (points[:1], points[1:]) if has_default else ([], points)
            take = max(0, per_template - len(head))
            step = len(rest) / take if take else 0
            points = [*head, *(rest[int(i * step)] for i in range(take))]
        found.extend(Candidate(template.name, dataclasses.asdict(k)) for k in points)
    return found


def code_fingerprint() -> str:
    """What a measurement depends on besides the spec and the machine: the algorithm
    and schedule sources, how they are timed (this file), and the TVM version."""
    import hashlib

    import tvm

    package = Path(__file__).parents[1]
    compiler = package / "compiler"
    digest = hashlib.sha256(tvm.__version__.encode())
    sources = [compiler / "compute.py", package / "spec.py", Path(__file__),
               *sorted((compiler / "schedule").glob("*.py"))]
    for src in sources:
        digest.update(src.read_bytes())
    return digest.hexdigest()[:12]


def _log_path(work_dir: Path, target: TargetInfo, spec: ConvSpec) -> Path:
    return work_dir / target.key() / code_fingerprint() / f"{spec.name()}.jsonl"


def _read_log(path: Path) -> dict[str, Measurement]:
    done: dict[str, Measurement] = {}
    if not path.is_file():
        return done
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            cand = Candidate(row["template"], row["knobs"])
            secs = float(row["seconds"]) if row["seconds"] is not None else math.inf
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from an interrupted write
        done[cand.key()] = Measurement(cand, secs, row.get("error", ""))
    return done


def _append_log(path: Path, m: Measurement) -> None:
    row = {"template": m.candidate.template, "knobs": m.candidate.knobs,
           "seconds": m.seconds if math.isfinite(m.seconds) else None, "error": m.error}
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


@dataclass
class Built:
    """A compiled candidate, and the weight layout of its run-packed entry (None: none)."""

    lib: Any
    packing: WeightPacking | None

    @property
    def algorithm(self) -> str:
        return algorithm_of(self.packing)


def _compile(spec: ConvSpec, target: TargetInfo, cand: Candidate) -> Built:
    import tvm

    if cand.trace is not None:
        from convgen.compiler.schedule.trace import replay_trace

        mod, packing = replay_trace(spec, target, cand.trace).mod, None
    else:
        from convgen.compiler.build import lower

        mod, _, packing = lower(spec, target, cand.template, cand.knobs)
    return Built(tvm.compile(mod, target=target.tvm_target()), packing)


# Inside a model, every other layer's activations and weights pass through the caches
# between two calls of a layer, so weights (or a Winograd layer's U) larger than L2
# come from L3 or memory, never from L2 as they do when one kernel is called back to
# back. Timed back to back, tiles whose blocks each stream the whole of U rank first
# and then lose in the model: ResNet-18's staged Winograd C256 14x14 (U 9.4 MB) on
# Zen 5, run-packed entry warm / after this much other traffic, ms: 2 x 8 0.400 /
# 0.803, 1 x 16 0.441 / 1.005, the heuristic's 1 x 8 0.475 / 0.504; inside the model
# 2 x 8 and 1 x 16 ran 0.46-0.52 against 1 x 8's 0.25-0.36 (benchmarks/NOTES.md). Such
# candidates are timed one call a sample, each after this many bytes of other
# traffic (more than the L3 of the CPUs measured, 32 MB).
COLD_FLUSH_BYTES = 64 << 20


def _weights_outgrow_l2(spec: ConvSpec, target: TargetInfo, packing: WeightPacking | None
                        ) -> bool:
    """Whether the weights a bound kernel reads (packed, where it packs them) are
    larger than the L2 of `target`."""
    size = (math.prod(packing.packed_shape(spec)) * spec.element_bytes
            if packing is not None else spec.weight_bytes)
    return size > target.l2_bytes


def _measure(built: Built, spec: ConvSpec, target: TargetInfo, options: TuneOptions,
             check: bool = True) -> float:
    """Median seconds per call of what a bound kernel runs (the run-packed entry on
    weights packed once, where the module has one), as a model's calls find its
    weights in the caches (`COLD_FLUSH_BYTES`); with `check`, first against the
    numpy oracle (a fast wrong kernel must never win)."""
    import tvm

    from convgen.reference import reference_conv
    from convgen.runtime.verify import compare, random_inputs

    dev = tvm.cpu()
    inputs = random_inputs(spec, seed=0)
    data, *rest = inputs.values()
    # the data where a caller's numpy array usually lies (the bound call takes it in
    # place): a template that loads row vectors from it straddles cache lines there,
    # and is timed as users will run it (cpu_wvec on AVX2: 0.83 ms aligned, 1.01-1.09
    # there, benchmarks/NOTES.md)
    placed = aligned_empty(data.shape, data.dtype, CACHE_LINE, offset=NUMPY_PLACEMENT)
    np.copyto(placed, data)
    args = [placed, *(tvm.runtime.tensor(a, dev) for a in rest)]
    out = tvm.runtime.tensor(np.zeros(spec.out_shape, spec.dtype), dev)
    lib, entry = built.lib, ENTRY
    if built.packing is not None:
        packed = tvm.runtime.empty(built.packing.packed_shape(spec), spec.dtype, dev)
        lib[PACK_ENTRY](args[1], packed)
        args[1], entry = packed, RUN_PACKED_ENTRY
    lib[entry](*args, out)
    want = reference_conv(spec, *inputs.values()) if check else None
    if want is not None and not compare("oracle", out.numpy(), want, spec.dtype,
                                        built.algorithm).passed:
        raise UnsupportedError("candidate computes a wrong result")
    if _weights_outgrow_l2(spec, target, built.packing):
        timer = lib.mod.time_evaluator(entry, dev, number=1, repeat=options.repeats,
                                       cache_flush_bytes=COLD_FLUSH_BYTES)
    else:
        timer = lib.mod.time_evaluator(entry, dev, number=1, repeat=options.repeats,
                                       min_repeat_ms=int(options.min_repeat_ms))
    return float(np.median(timer(*args, out).results))


def _try(spec: ConvSpec, target: TargetInfo, cand: Candidate, build: Callable[[], Built],
         options: TuneOptions) -> Measurement:
    """One candidate measured; any failure (build, run, wrong result) is infinitely slow."""
    try:
        return Measurement(cand, _measure(build(), spec, target, options))
    except Exception as err:
        text = str(err).strip()
        return Measurement(cand, math.inf, text.splitlines()[-1][:300] if text else
                           type(err).__name__)


CONFIRM_TOP, CONFIRM_ROUNDS = 3, 3


def _confirm(spec: ConvSpec, target: TargetInfo, results: list[Measurement],
             options: TuneOptions) -> Measurement | None:
    """Re-time the fastest few candidates in alternating rounds and keep the best median:
    candidates are timed minutes apart, and on a shared machine a burst of load from
    elsewhere can decide which one wins."""
    top = sorted((m for m in results if math.isfinite(m.seconds)), key=lambda m: m.seconds)
    top = top[:CONFIRM_TOP]
    if len(top) < 2:
        return fastest(top)
    builds = [_compile(spec, target, m.candidate) for m in top]
    times: list[list[float]] = [[] for _ in top]
    for _ in range(CONFIRM_ROUNDS):
        for built, t in zip(builds, times):
            t.append(_measure(built, spec, target, options, check=False))
    return fastest(Measurement(m.candidate, float(np.median(t))) for m, t in zip(top, times))


def _grid(spec: ConvSpec, target: TargetInfo, options: TuneOptions, log: Path,
          deadline: float | None, progress: Progress | None
          ) -> tuple[list[Measurement], int, bool]:
    """Measure the grid's candidates not in the log yet. Returns (every measurement of
    this spec, the grid's size, interrupted)."""
    done = _read_log(log)
    cands = [] if options.method == "meta" else candidates_for(
        spec, target, algorithm=options.algorithm)
    if options.trials is not None:
        cands = cands[: options.trials]
    results = [done[c.key()] for c in cands if c.key() in done]
    todo = [c for c in cands if c.key() not in done]

    def report() -> None:
        if progress:
            best = fastest(results)
            progress(spec, len(results), len(cands), gflops(spec.flops, best.seconds)
                     if best else 0.0)

    report()
    workers = options.workers or available_cores()
    try:
        while todo:
            if deadline is not None and time.monotonic() > deadline:
                return results, len(cands), True
            chunk, todo = todo[:workers], todo[workers:]
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(_compile, spec, target, c) for c in chunk]
            for cand, fut in zip(chunk, futures):
                m = _try(spec, target, cand, fut.result, options)
                _append_log(log, m)
                results.append(m)
                report()
    except KeyboardInterrupt:
        return results, len(cands), True
    return results, len(cands), False


def tune_spec(
    spec: ConvSpec,
    target: TargetInfo,
    options: TuneOptions,
    deadline: float | None = None,
    progress: Progress | None = None,
) -> TuneResult:
    """Tune one spec on this machine's CPU; writes its record and returns the result."""
    if target.is_cuda:
        raise UnsupportedError(
            "tune: CUDA candidates are measured on the GPU machine: use "
            "`convgen tune --target cuda --emit-candidates DIR` (see the README)"
        )
    work_dir = options.work_dir or Path.home() / ".cache" / "convgen" / "tune"
    log = _log_path(work_dir, target, spec)
    log.parent.mkdir(parents=True, exist_ok=True)
    results, total, partial = _grid(spec, target, options, log, deadline, progress)
    best = fastest(results) if partial else _confirm(spec, target, results, options)
    interrupted = partial
    if options.method in ("meta", "both") and not interrupted:
        from convgen.tuning.metaschedule import tune_meta_schedule

        trace, interrupted = tune_meta_schedule(
            spec, target, options.trials or options.meta_trials,
            log.with_suffix(".meta_schedule"), deadline, progress)
        if trace is not None:
            cand = Candidate(META_SCHEDULE, {}, trace)
            best = fastest([*([best] if best else []),
                            _try(spec, target, cand, lambda: _compile(spec, target, cand),
                                 options)])
    path = None
    if best is not None:
        path = write_record(_record(spec, target, best, options, results, total, partial),
                            options.library)
    return TuneResult(spec, best, len(results), path, interrupted, partial=partial)


def _record(spec: ConvSpec, target: TargetInfo, best: Measurement, options: TuneOptions,
            results: list[Measurement], total: int, partial: bool) -> Record:
    """The record of a run; one cut short keeps the best so far, and says that it is (a
    rerun of the same command finishes the grid and replaces it)."""
    import tvm

    if partial:
        outcome = {"partial": f"stopped (budget or Ctrl-C) after {len(results)} of {total} "
                              "grid candidates; the best so far, not re-timed"}
    else:
        outcome = {"confirmed": f"best median of {CONFIRM_ROUNDS} alternating rounds "
                                f"among the grid's top {CONFIRM_TOP}"}

    return Record(
        spec=record_spec(spec, target),
        target_key=target.key(),
        tvm_version=tvm.__version__,
        schedule=best.candidate.recorded(),
        measured={
            "median_ms": round(best.seconds * 1e3, 4),
            "gflops": round(gflops(spec.flops, best.seconds), 2),
            "threads": int(os.environ.get("TVM_NUM_THREADS", target.num_cores)),
            "date": time.strftime("%Y-%m-%d"),
        },
        tuner={"method": options.method, "grid_candidates": len(results),
               "grid_failed": sum(not math.isfinite(m.seconds) for m in results),
               **outcome},
    )


def tune_specs(
    specs: list[ConvSpec],
    target: TargetInfo,
    options: TuneOptions,
    progress: Progress | None = None,
) -> list[TuneResult]:
    """Tune several specs in turn, each record once (on CPU `conv` and `corr` share
    one, and the epilogue is left out: `record_spec`), measured as its key spec, or
    with a residual where one of the specs sharing it reads one; Ctrl-C keeps every
    record finished so far."""
    use_all_cores()
    deadline = time.monotonic() + options.minutes * 60 if options.minutes else None
    measured: dict[ConvSpec, ConvSpec] = {}  # record key -> the spec timed for it
    for spec in specs:
        key = record_spec(spec, target)
        if spec.residual and not measured.get(key, key).residual:
            measured[key] = dataclasses.replace(key, residual=True)
        measured.setdefault(key, key)
    results = []
    for spec in measured.values():
        start = time.monotonic()
        result = tune_spec(spec, target, options, deadline, progress)
        result.seconds = time.monotonic() - start
        results.append(result)
        if result.interrupted:
            break
    return results
