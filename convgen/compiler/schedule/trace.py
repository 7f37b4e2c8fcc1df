"""MetaSchedule traces: the module MetaSchedule tunes, and a stored trace replayed onto it.

A record can hold a MetaSchedule trace instead of a template's knobs
(`convgen tune --method meta|both`); the chooser replays it here. The search
itself lives in `convgen.tuning.metaschedule`.
"""

from __future__ import annotations

from typing import Any

from convgen.compiler.targets import TargetInfo
from convgen.spec import ConvSpec


def workload(spec: ConvSpec, target: TargetInfo) -> Any:
    """The module MetaSchedule tunes and traces replay onto: IRModule({"main": f}),
    normalised as TuneContext does, so database hashes and replays agree. The
    PrimFunc keeps its global symbol, so the compiled entry is unchanged."""
    from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

    from convgen.compiler.compute import conv_prim_func

    return _normalize_mod(conv_prim_func(spec, target))


def replay_trace(spec: ConvSpec, target: TargetInfo, trace: list[Any]) -> Any:
    """A stored trace (plain JSON) applied to a fresh schedule of the spec's PrimFunc."""
    import tvm

    sch = tvm.s_tir.Schedule(workload(spec, target))
    tvm.s_tir.Trace.apply_json_to_schedule(trace, sch)
    return sch
