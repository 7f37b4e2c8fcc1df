"""Schedules: hand-written templates per target family, and the chooser.

A template is a function `(func, spec, target, knobs) -> Schedule | None`
(None: does not apply to this spec). Its knobs are a frozen dataclass; each
template module has a heuristic that picks default knobs from the spec and the
target. The chooser takes the first template that applies, else the family's
generic fallback, which works for every spec.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from convgen.errors import UnsupportedError
from convgen.spec import ConvSpec
from convgen.targets import TargetInfo

if TYPE_CHECKING:
    from tvm.s_tir import Schedule
    from tvm.tirx import PrimFunc


@dataclass(frozen=True)
class ScheduleChoice:
    """What the manifest records about how a kernel was scheduled."""

    kind: str  # "template" or "fallback"
    name: str  # the template's name
    knobs: dict[str, Any]

    def describe(self) -> str:
        knobs = ", ".join(f"{k}={v}" for k, v in self.knobs.items())
        return f"{self.kind} {self.name}" + (f" ({knobs})" if knobs else "")


def schedule_for(
    func: PrimFunc, spec: ConvSpec, target: TargetInfo
) -> tuple[Schedule, ScheduleChoice]:
    """The best schedule convgen knows for this spec on this target."""
    if target.is_cuda:
        from convgen.schedule import cuda as family
    else:
        from convgen.schedule import cpu as family  # type: ignore[no-redef]

    for template in family.TEMPLATES:
        knobs = template.default_knobs(spec, target)
        if knobs is None:
            continue
        sch = template.apply(func, spec, target, knobs)
        if sch is not None:
            return sch, ScheduleChoice("template", template.name, dataclasses.asdict(knobs))
    sch = family.fallback(func, spec, target)
    if sch is None:
        raise UnsupportedError(f"no {target.kind} schedule applies to {spec.describe()}")
    return sch, ScheduleChoice("fallback", family.FALLBACK_NAME, {})
