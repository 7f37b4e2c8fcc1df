"""Schedules: hand-written templates per target family, and the chooser.

A template is a function `(func, spec, target, knobs) -> Schedule | None`
(None: does not apply to this spec), given the algorithm (`compute.py`) in the
form it asks for (a `compute.Variant`). Its knobs are a frozen dataclass; each
template module has a heuristic that picks default knobs from the spec and the
target, and a grid of candidates that `convgen tune` measures.

The chooser, in order: a tuned record for exactly this spec, target and TVM
version (the record library, `schedules/`); else the first template whose
heuristic applies; else the family's generic fallback, which works for every spec.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convgen.compiler.compute import conv_prim_func
from convgen.compiler.targets import TargetInfo
from convgen.errors import UnsupportedError
from convgen.spec import ConvSpec

if TYPE_CHECKING:
    from tvm.s_tir import Schedule

    from convgen.compiler.schedule.common import Template


@dataclass(frozen=True)
class ScheduleChoice:
    """What the manifest records about how a kernel was scheduled."""

    kind: str  # "record", "template" or "fallback"
    name: str  # the template's name ("meta_schedule" for a replayed trace)
    knobs: dict[str, Any]
    record: str | None = None  # the record file, when kind == "record"

    def describe(self) -> str:
        knobs = ", ".join(f"{k}={v}" for k, v in self.knobs.items())
        text = f"{self.kind} {self.name}" + (f" ({knobs})" if knobs else "")
        return text + (f" from {Path(self.record).name}" if self.record else "")

    def brief(self) -> str:
        """For a table cell: `cpu_kvec lanes=8,nkv=4,pw=4 (record)`."""
        knobs = ",".join(f"{k}={v}" for k, v in self.knobs.items())
        return " ".join(x for x in (self.name, knobs, f"({self.kind})") if x)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScheduleChoice:
        return cls(d["kind"], d["name"], d.get("knobs", {}), d.get("record"))

    def to_dict(self) -> dict[str, Any]:
        d = {"kind": self.kind, "name": self.name, "knobs": self.knobs}
        if self.record:
            d["record"] = self.record
        return d


def family(target: TargetInfo) -> Any:
    if target.is_cuda:
        from convgen.compiler.schedule import cuda

        return cuda
    from convgen.compiler.schedule import cpu

    return cpu


def template_named(target: TargetInfo, name: str) -> Template[Any]:
    for t in family(target).TEMPLATES:
        if t.name == name:
            return t
    raise UnsupportedError(f"schedule: no {target.kind} template named {name!r}")


def _apply(template: Template[Any], spec: ConvSpec, target: TargetInfo, knobs: Any) -> Any:
    """The template's schedule of the algorithm in the form it asks for (None: declined)."""
    func = conv_prim_func(spec, template.variant(spec, knobs))
    return template.apply(func, spec, target, knobs)


def forced_schedule(
    spec: ConvSpec, target: TargetInfo, name: str, knobs: dict[str, Any], kind: str = "template",
) -> tuple[Schedule, ScheduleChoice]:
    """A named template with explicit knobs, or "fallback" for the generic schedule
    (records and tuning use this)."""
    fam = family(target)
    if name in ("fallback", fam.FALLBACK_NAME):
        choice_kind = "fallback" if kind == "template" else kind
        return fam.fallback(conv_prim_func(spec), spec, target), ScheduleChoice(
            choice_kind, fam.FALLBACK_NAME, {})
    template = template_named(target, name)
    sch = _apply(template, spec, target, template.knobs_type(**knobs))
    if sch is None:
        raise UnsupportedError(f"schedule: template {name} does not apply to {spec.name()}")
    return sch, ScheduleChoice(kind, name, knobs)


def schedule_for(
    spec: ConvSpec, target: TargetInfo, use_records: bool = True
) -> tuple[Schedule, ScheduleChoice]:
    """The best schedule convgen knows for this spec on this target."""
    fam = family(target)
    if use_records:
        from convgen.compiler.records import find_record, record_path

        record = find_record(spec, target)
        if record is not None:
            sched = record.schedule
            path = str(record_path(Path(""), target.key(), spec))
            if sched["kind"] in ("template", "fallback"):
                sch, choice = forced_schedule(spec, target, sched.get("name", "fallback"),
                                              sched.get("knobs", {}), kind="record")
                return sch, dataclasses.replace(choice, record=path)
            if sched["kind"] == "trace":
                from convgen.tuning.metaschedule import replay_trace

                sch = replay_trace(spec, sched["trace"])
                return sch, ScheduleChoice("record", "meta_schedule", {}, path)
    for template in fam.TEMPLATES:
        knobs = template.default_knobs(spec, target)
        if knobs is None:
            continue
        sch = _apply(template, spec, target, knobs)
        if sch is not None:
            return sch, ScheduleChoice("template", template.name, dataclasses.asdict(knobs))
    sch = fam.fallback(conv_prim_func(spec), spec, target)
    if sch is None:
        raise UnsupportedError(f"no {target.kind} schedule applies to {spec.describe()}")
    return sch, ScheduleChoice("fallback", fam.FALLBACK_NAME, {})
