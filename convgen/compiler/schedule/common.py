"""Small helpers the schedule templates share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from convgen.compiler.compute import ENTRY, Variant
from convgen.compiler.targets import TargetInfo
from convgen.spec import ConvSpec

if TYPE_CHECKING:
    from tvm.s_tir import Schedule
    from tvm.tirx import PrimFunc

K = TypeVar("K")


def default_variant(spec: ConvSpec, knobs: Any) -> Variant:
    return Variant()


@dataclass(frozen=True)
class Template(Generic[K]):
    """A named schedule template: its knob type, the heuristic that picks knobs for
    a spec (None: the template does not apply), the knob grid that tuning searches,
    the function that applies it, and the form of the algorithm it schedules."""

    name: str
    knobs_type: type[K]
    default_knobs: Callable[[ConvSpec, TargetInfo], K | None]
    candidates: Callable[[ConvSpec, TargetInfo], list[K]]
    apply: Callable[[Any, ConvSpec, TargetInfo, K], Any]
    variant: Callable[[ConvSpec, K], Variant] = default_variant


def new_schedule(func: PrimFunc) -> Schedule:
    import tvm
    from tvm import s_tir

    sch = s_tir.Schedule(tvm.IRModule({ENTRY: func}))
    sch.work_on(ENTRY)
    return sch


def loops_below(sch: Schedule, block: Any, loop: Any) -> list[Any]:
    """The loops of `block` nested inside `loop` (which must enclose it)."""
    loops = sch.get_loops(block)
    stmt = sch.get(loop)
    return loops[1 + next(i for i, lp in enumerate(loops) if sch.get(lp).same_as(stmt)):]


def has_block(sch: Schedule, name: str) -> bool:
    try:
        sch.get_sblock(name)
    except Exception:  # TVM raises a plain error when the block is absent
        return False
    return True


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of n that is <= limit (at least 1)."""
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1
