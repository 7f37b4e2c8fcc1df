"""Tuning runs: measure candidate schedules, keep the fastest as a record.

The search space is our templates' knob grids (each template's `candidates`),
measured in this process on this machine. Each spec's run:

  1. compiles every candidate not yet measured (`workers` threads: tvm.compile
     releases the GIL in C++), a failed build counting as infinitely slow;
  2. measures them one at a time (nothing else compiling meanwhile, so the
     timings are clean): median of `repeats` samples of >= `min_repeat_ms`;
  3. appends each measurement to a log (work_dir/<target key>/<code>/<spec>.jsonl,
     <code> a fingerprint of the schedule code and TVM version), so an
     interrupted run (Ctrl-C, a crash) resumes where it stopped, and a run after
     the schedules changed measures afresh instead of trusting old timings;
  4. writes the winner to the record library atomically.

Budgets: `trials` caps the candidates measured per spec, `minutes` the whole
run; whatever was measured when a budget runs out still produces a record.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convgen.compiler.compute import ENTRY
from convgen.compiler.records import Record, library_path, write_record
from convgen.compiler.targets import TargetInfo
from convgen.errors import UnsupportedError
from convgen.runtime.kernel import available_cores
from convgen.spec import ConvSpec


@dataclass(frozen=True)
class TuneOptions:
    trials: int | None = None  # candidates measured per spec (None: the whole grid)
    minutes: float | None = None  # wall-clock budget for the whole run
    workers: int = 0  # parallel compiles (0: every core)
    repeats: int = 10
    min_repeat_ms: float = 20.0
    method: str = "grid"  # "grid" (our templates' knobs), "meta" (MetaSchedule's space), "both"
    meta_trials: int = 64  # MetaSchedule trials per spec when --trials is not given
    library: Path | None = None  # default: records.library_path()
    work_dir: Path | None = None  # default: ~/.cache/convgen/tune


@dataclass
class Candidate:
    template: str
    knobs: dict[str, Any]

    def key(self) -> str:
        return json.dumps({"template": self.template, "knobs": self.knobs}, sort_keys=True)


@dataclass
class Measurement:
    candidate: Candidate
    seconds: float  # math.inf when it failed to build or run
    error: str = ""


@dataclass
class TuneResult:
    spec: ConvSpec
    best: Measurement | None
    measured: int
    record_path: Path | None
    interrupted: bool = False

    @property
    def gflops(self) -> float:
        if self.best is None or not math.isfinite(self.best.seconds):
            return 0.0
        return self.spec.flops / self.best.seconds / 1e9


Progress = Callable[[ConvSpec, int, int, float], None]


def candidates_for(
    spec: ConvSpec, target: TargetInfo, per_template: int | None = None
) -> list[Candidate]:
    """Every template's grid; with `per_template`, at most that many of each: the
    heuristic's default first, then points spread evenly over the rest of the grid.
    A grid counts even where the heuristic declines the spec: tuning is how such
    a template wins there."""
    from convgen.compiler.schedule import family

    found = []
    for template in family(target).TEMPLATES:
        grid = template.candidates(spec, target)
        if not grid:
            continue
        default = template.default_knobs(spec, target)
        head = [default] if default is not None else []
        rest = [k for k in grid if k != default]
        if per_template is not None:
            take = max(0, per_template - len(head))
            step = len(rest) / take if take else 0
            rest = [rest[int(i * step)] for i in range(min(take, len(rest)))]
        for knobs in [*head, *rest]:
            found.append(Candidate(template.name, dataclasses.asdict(knobs)))
    return found


def code_fingerprint() -> str:
    """What a measurement depends on besides the spec and the machine: the algorithm
    and schedule sources, and the TVM version."""
    import hashlib

    import tvm

    package = Path(__file__).parents[1]
    compiler = package / "compiler"
    digest = hashlib.sha256(tvm.__version__.encode())
    sources = [compiler / "compute.py", package / "spec.py",
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


def _compile(spec: ConvSpec, target: TargetInfo, cand: Candidate) -> Any:
    import tvm

    from convgen.compiler.build import lower

    mod, _ = lower(spec, target, cand.template, cand.knobs)
    return tvm.compile(mod, target=target.tvm_target())


def _measure(lib: Any, spec: ConvSpec, options: TuneOptions, check: bool = True) -> float:
    import tvm

    from convgen.reference import reference_conv
    from convgen.runtime.verify import compare, random_inputs

    dev = tvm.cpu()
    inputs = random_inputs(spec, seed=0)
    args = [tvm.runtime.tensor(a, dev) for a in inputs.values()]
    out = tvm.runtime.tensor(np.zeros(spec.out_shape, spec.dtype), dev)
    lib[ENTRY](*args, out)
    # a fast wrong kernel must never win: check it once against the oracle
    want = reference_conv(spec, *inputs.values()) if check else None
    if want is not None and not compare("oracle", out.numpy(), want, spec.dtype).passed:
        raise UnsupportedError("candidate computes a wrong result")
    timer = lib.mod.time_evaluator(ENTRY, dev, number=1, repeat=options.repeats,
                                   min_repeat_ms=int(options.min_repeat_ms))
    return float(np.median(timer(*args, out).results))


CONFIRM_TOP, CONFIRM_ROUNDS = 3, 3


def _confirm(spec: ConvSpec, target: TargetInfo, results: list[Measurement],
             options: TuneOptions) -> Measurement:
    """Re-time the fastest few candidates in alternating rounds and keep the best
    median. Candidates are timed minutes apart, and on a shared machine a burst of
    load from elsewhere can decide which one wins: in one grid run C128 28x28 3x3
    (corr, NCHW) timed cpu_wvec v=14 at 187.9 GFLOP/s and cpu_kvec 4x4 at 187.2;
    timed back to back, they ran 187 and 194."""
    ok = sorted((m for m in results if math.isfinite(m.seconds)), key=lambda m: m.seconds)
    top = ok[:CONFIRM_TOP]
    if len(top) < 2:
        return top[0]
    libs = [_compile(spec, target, m.candidate) for m in top]
    times: list[list[float]] = [[] for _ in top]
    for _ in range(CONFIRM_ROUNDS):
        for lib, t in zip(libs, times):
            t.append(_measure(lib, spec, options, check=False))
    medians = [float(np.median(t)) for t in times]
    i = int(np.argmin(medians))
    return Measurement(top[i].candidate, medians[i])


def tune_spec(
    spec: ConvSpec,
    target: TargetInfo,
    options: TuneOptions,
    deadline: float | None = None,
    progress: Progress | None = None,
) -> TuneResult:
    """Tune one spec on this machine's CPU; writes its record and returns the result."""
    import tvm

    if target.is_cuda:
        raise UnsupportedError(
            "tune: CUDA candidates are measured on the GPU machine: use "
            "`convgen tune --target cuda --candidates DIR` (see the README)"
        )
    work_dir = options.work_dir or Path.home() / ".cache" / "convgen" / "tune"
    log = _log_path(work_dir, target, spec)
    log.parent.mkdir(parents=True, exist_ok=True)
    done = _read_log(log)
    cands = candidates_for(spec, target)
    if options.trials is not None:
        cands = cands[: options.trials]
    if options.method == "meta":
        cands = []
    todo = [c for c in cands if c.key() not in done]
    total = len(cands)
    results = [done[c.key()] for c in cands if c.key() in done]
    best = min(results, key=lambda m: m.seconds, default=None)

    def report() -> None:
        if progress:
            gf = spec.flops / best.seconds / 1e9 if best and math.isfinite(best.seconds) else 0.0
            progress(spec, len(results), total, gf)

    report()
    interrupted = False
    workers = options.workers or available_cores()
    batch = max(1, workers)
    try:
        while todo:
            if deadline is not None and time.monotonic() > deadline:
                interrupted = True
                break
            chunk, todo = todo[:batch], todo[batch:]
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(_compile, spec, target, c) for c in chunk]
            for cand, fut in zip(chunk, futures):
                try:
                    m = Measurement(cand, _measure(fut.result(), spec, options))
                except Exception as err:  # any failure: infinitely slow, the run goes on
                    m = Measurement(cand, math.inf, str(err).strip().splitlines()[-1][:300]
                                    if str(err).strip() else type(err).__name__)
                _append_log(log, m)
                results.append(m)
                if best is None or m.seconds < best.seconds:
                    best = m
                report()
    except KeyboardInterrupt:
        interrupted = True
    if not interrupted and best is not None and math.isfinite(best.seconds):
        best = _confirm(spec, target, results, options)
    schedule = None
    if best is not None and math.isfinite(best.seconds):
        schedule = {"kind": "template", "name": best.candidate.template,
                    "knobs": best.candidate.knobs}
    if options.method in ("meta", "both") and not interrupted:
        from convgen.tuning.metaschedule import tune_meta_schedule

        ms_seconds, trace, interrupted = tune_meta_schedule(
            spec, target, options.trials or options.meta_trials,
            log.with_suffix(".meta_schedule"), deadline, progress)
        if trace is not None and (best is None or ms_seconds < best.seconds):
            best = Measurement(Candidate("meta_schedule", {}), ms_seconds)
            schedule = {"kind": "trace", "trace": trace}
    path = None
    if best is not None and schedule is not None:
        record = Record(
            spec=spec,
            target_key=target.key(),
            tvm_version=tvm.__version__,
            schedule=schedule,
            measured={
                "median_ms": round(best.seconds * 1e3, 4),
                "gflops": round(spec.flops / best.seconds / 1e9, 2),
                "threads": int(os.environ.get("TVM_NUM_THREADS", target.num_cores)),
                "date": time.strftime("%Y-%m-%d"),
            },
            tuner={"method": options.method, "grid_candidates": len(results),
                   "grid_failed": sum(not math.isfinite(m.seconds) for m in results),
                   "confirmed": f"best median of {CONFIRM_ROUNDS} alternating rounds "
                                f"among the grid's top {CONFIRM_TOP}"},
        )
        path = write_record(record, options.library or library_path())
    return TuneResult(spec, best, len(results), path, interrupted)


def tune_specs(
    specs: list[ConvSpec],
    target: TargetInfo,
    options: TuneOptions,
    progress: Progress | None = None,
) -> list[TuneResult]:
    """Tune several specs in turn; Ctrl-C keeps every record finished so far."""
    from convgen.runtime.kernel import use_all_cores

    use_all_cores()
    deadline = time.monotonic() + options.minutes * 60 if options.minutes else None
    results = []
    for spec in specs:
        result = tune_spec(spec, target, options, deadline, progress)
        results.append(result)
        if result.interrupted:
            break
    return results


# ---- CUDA: candidates generated here, measured on the GPU machine ----------------------


def emit_cuda_candidates(specs: list[ConvSpec], target: TargetInfo, out_dir: Path,
                         per_template: int | None = None) -> int:
    """Write the candidates (template knobs, `per_template` at most of each, and the
    direct fallback) of every spec as deferred CUDA artifacts under out_dir, with the
    index `convgen measure` reads. Returns the number of candidates."""
    from convgen.compiler.build import build_artifact
    from convgen.tuning.measure import INDEX

    if not target.is_cuda:
        raise UnsupportedError("tune: --emit-candidates is for CUDA targets")
    out_dir.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"target": target.config_dict, "target_key": target.key(),
                             "specs": []}
    count = 0
    for spec in specs:
        cands = [*candidates_for(spec, target, per_template), Candidate("fallback", {})]
        entries = []
        for i, cand in enumerate(cands):
            sub = out_dir / spec.name() / f"c{i:03d}"
            try:
                art = build_artifact(spec, target, sub, verify=False, defer_nvcc=True,
                                     template=cand.template, knobs=cand.knobs)
            except Exception:  # a candidate TVM cannot lower: skip it, the search goes on
                continue
            entries.append({"template": cand.template, "knobs": cand.knobs,
                            "manifest": str(art.manifest_path.relative_to(out_dir))})
            count += 1
        index["specs"].append({"spec": spec.to_dict(), "candidates": entries})
    (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return count


def ingest_cuda_results(directory: Path, library: Path | None = None) -> list[Path]:
    """results.json from `convgen measure` -> one record per spec (its fastest candidate)."""
    import tvm

    from convgen.tuning.measure import INDEX, RESULTS

    index = json.loads((directory / INDEX).read_text())
    try:
        results = json.loads((directory / RESULTS).read_text())
    except OSError:
        raise UnsupportedError(
            f"tune: {directory / RESULTS} not found: run `convgen measure {directory}` on the "
            "GPU machine first"
        ) from None
    written = []
    for entry in results["specs"].values():
        spec = ConvSpec.from_dict(entry["spec"])
        ok = [r for r in entry["candidates"] if r["median_ms"]]
        if not ok:
            continue
        best = min(ok, key=lambda r: r["median_ms"])
        schedule = ({"kind": "fallback"} if best["template"] == "fallback" else
                    {"kind": "template", "name": best["template"], "knobs": best["knobs"]})
        record = Record(
            spec=spec, target_key=index["target_key"], tvm_version=tvm.__version__,
            schedule=schedule,
            measured={"median_ms": round(best["median_ms"], 5),
                      "gflops": round(spec.flops / best["median_ms"] / 1e6, 1),
                      "device": results.get("device", ""), "date": time.strftime("%Y-%m-%d"),
                      "peers_ms": entry.get("peers_ms", {})},
            tuner={"method": "template grid on the device", "candidates": len(entry["candidates"]),
                   "failed": len(entry["candidates"]) - len(ok)},
        )
        written.append(write_record(record, library or library_path()))
    return written
