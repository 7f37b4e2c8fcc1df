"""Schedules: hand-written templates per target family, and the chooser.

A template (`common.Template`) is a function `(func, spec, target, knobs) ->
Schedule | None` (None: does not apply to this spec), given the algorithm
(`compute.py`) in the form it asks for (a `compute.Variant`). Its knobs are a
frozen dataclass; its heuristic picks default knobs from the spec and the target
(asking the target's hardware model, `TargetInfo`), and its grid yields the
points `convgen tune` measures. A `common.Family` holds a target kind's
templates, in the order the chooser tries them, and its generic fallback.

The chooser, in order: a tuned record for exactly this spec, target and TVM
version (the record library, `compiler.records`); else the first template whose
heuristic applies; else the family's generic fallback, which works for every spec.
`packed_schedule` gives the same choice's schedule of the run-packed entry.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convgen.compiler.compute import WeightPacking
from convgen.compiler.records import META_SCHEDULE, Record, find_record
from convgen.compiler.schedule.common import Family
from convgen.compiler.targets import TargetInfo
from convgen.errors import UnsupportedError
from convgen.runtime.manifest import ScheduleChoice
from convgen.spec import ConvSpec

if TYPE_CHECKING:
    from tvm.s_tir import Schedule


def family(target: TargetInfo) -> Family:
    if target.is_cuda:
        from convgen.compiler.schedule import cuda

        return cuda.FAMILY
    from convgen.compiler.schedule import cpu

    return cpu.FAMILY


def family_for_key(target_key: str) -> Family:
    """The family of a record library's target key (`cuda-sm_90`, `llvm-znver4-avx512`)."""
    if target_key.startswith("cuda"):
        from convgen.compiler.schedule import cuda

        return cuda.FAMILY
    from convgen.compiler.schedule import cpu

    return cpu.FAMILY


ALGORITHMS = ("auto", "direct", "winograd")


def _algorithm_of(fam: Family, template_name: str) -> str:
    if template_name in (fam.fallback_name, META_SCHEDULE):
        return "direct"
    return fam.template(template_name).algorithm


def forced_schedule(
    spec: ConvSpec, target: TargetInfo, name: str, knobs: dict[str, Any], kind: str = "forced",
) -> tuple[Schedule, ScheduleChoice]:
    """A named template with explicit knobs, or the family's fallback by its name
    (records and tuning use this)."""
    fam = family(target)
    if name == fam.fallback_name:
        return fam.schedule_fallback(spec, target), ScheduleChoice(kind, name)
    template = fam.template(name)
    sch = template.schedule(spec, target, template.knobs(knobs))
    if sch is None:
        raise UnsupportedError(f"schedule: template {name} does not apply to {spec.name()}")
    return sch, ScheduleChoice(kind, name, knobs)


def recorded_schedule(spec: ConvSpec, target: TargetInfo,
                      record: Record) -> tuple[Schedule, ScheduleChoice]:
    """A record's schedule: its template and knobs, or its MetaSchedule trace replayed."""
    rec = record.schedule
    if rec.trace is not None:
        from convgen.compiler.schedule.trace import replay_trace

        return replay_trace(spec, target, rec.trace), ScheduleChoice(
            "record", META_SCHEDULE, {}, record.relpath)
    sch, choice = forced_schedule(spec, target, rec.template, rec.knobs, kind="record")
    return sch, dataclasses.replace(choice, record=record.relpath)


def schedule_for(
    spec: ConvSpec, target: TargetInfo, library: Path | None = None, use_records: bool = True,
    algorithm: str = "auto",
) -> tuple[Schedule, ScheduleChoice]:
    """The best schedule convgen knows for this spec on this target: its record in
    `library` (default: the shipped one, or $CONVGEN_SCHEDULES), else the first
    template whose heuristic applies, else the fallback. `algorithm` "direct" or
    "winograd" keeps to that algorithm's templates (and records); asked for by name,
    an algorithm whose heuristic declines still runs with its first grid point."""
    if algorithm not in ALGORITHMS:
        raise UnsupportedError(f"algorithm: {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    fam = family(target)
    if use_records:
        record = find_record(spec, target, library)
        if record is not None and algorithm in ("auto", _algorithm_of(
                fam, record.schedule.template)):
            return recorded_schedule(spec, target, record)
    for template in fam.templates:
        if algorithm not in ("auto", template.algorithm):
            continue
        knobs = template.heuristic(spec, target)
        if knobs is None and algorithm == template.algorithm != "direct":
            knobs = next(iter(template.candidates(spec, target)), None)
        if knobs is None:
            continue
        sch = template.schedule(spec, target, knobs)
        if sch is not None:
            return sch, ScheduleChoice("heuristic", template.name, dataclasses.asdict(knobs))
    if algorithm not in ("auto", "direct"):
        reason = declined(spec, target, algorithm) or "no template took it"
        raise UnsupportedError(f"algorithm: {algorithm} does not apply to {spec.name()} on "
                               f"{target.key()}: {reason}")
    return fam.schedule_fallback(spec, target), ScheduleChoice("fallback", fam.fallback_name)


def declined(spec: ConvSpec, target: TargetInfo, algorithm: str) -> str | None:
    """Why an algorithm other than direct convolution does not apply (None: it does),
    for messages and `inspect`."""
    templates = [t for t in family(target).templates if t.algorithm == algorithm]
    if not templates:
        return f"{target.kind} has no {algorithm} templates"
    from convgen.compiler import winograd

    reason = winograd.declines(spec)
    if reason is None and not any(t.candidates(spec, target) for t in templates):
        reason = f"the output channels ({spec.out_channels}) are not a multiple of the vector"
    return reason


def packed_schedule(spec: ConvSpec, target: TargetInfo,
                    choice: ScheduleChoice) -> tuple[Schedule, WeightPacking] | None:
    """The run-packed entry's schedule for a choice `schedule_for` (or `forced_schedule`)
    made, and the weight layout it reads. None where the family has no packed entries
    (CUDA, for now) or the choice is a MetaSchedule trace (recorded on the plain form);
    a bound kernel then holds its weights and calls the plain entry."""
    fam = family(target)
    if not fam.packs_weights or choice.name == META_SCHEDULE:
        return None
    if choice.name == fam.fallback_name:
        return fam.schedule_fallback(spec, target, packed=True), WeightPacking()
    template = fam.template(choice.name)
    knobs = template.knobs(choice.knobs)
    sch = template.schedule(spec, target, knobs, packed=True)
    if sch is None:
        raise UnsupportedError(f"schedule: template {choice.name} declined the packed "
                               f"form of {spec.name()}")
    return sch, template.packing(spec, target, knobs)
