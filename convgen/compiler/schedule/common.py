"""The template and family types, and small helpers the schedule templates share."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from convgen.compiler.compute import ENTRY, Variant, WeightPacking, conv_prim_func
from convgen.compiler.targets import TargetInfo
from convgen.errors import UnsupportedError
from convgen.spec import ConvSpec

if TYPE_CHECKING:
    from tvm.s_tir import Schedule
    from tvm.tirx import PrimFunc

K = TypeVar("K")


def default_variant(spec: ConvSpec, knobs: Any) -> Variant:
    return Variant()


def storage_order(spec: ConvSpec, target: TargetInfo, knobs: Any) -> WeightPacking:
    return WeightPacking()


@dataclass(frozen=True)
class Template(Generic[K]):
    """A named schedule template: its knob type, the heuristic that picks knobs for a
    spec (None: the template does not apply by default), the grid of raw knob points
    that tuning searches (it may reach specs the heuristic declines), the function
    that applies it (None: does not apply to these knobs), the form of the
    algorithm it schedules, and the layout it reads packed weights in (the
    `convgen_run_packed` entry: `apply` is then given the packed variant)."""

    name: str
    knobs_type: type[K]
    heuristic: Callable[[ConvSpec, TargetInfo], K | None]
    grid: Callable[[ConvSpec, TargetInfo], Iterable[K]]
    apply: Callable[[PrimFunc, ConvSpec, TargetInfo, K], Schedule | None]
    variant: Callable[[ConvSpec, K], Variant] = default_variant
    packing: Callable[[ConvSpec, TargetInfo, K], WeightPacking] = storage_order
    max_candidates: int | None = None  # tuning measures at most this many points
    # another algorithm than direct convolution: its name, and its PrimFunc
    # (spec, target, knobs, packed) in place of `compute.conv_prim_func`
    algorithm: str = "direct"
    prim_func: Callable[[ConvSpec, TargetInfo, K, bool], PrimFunc] | None = None

    def candidates(self, spec: ConvSpec, target: TargetInfo) -> list[K]:
        """What tuning measures: the heuristic's knobs first, then the grid's points,
        each once, at most `max_candidates`."""
        default = self.heuristic(spec, target)
        points = [default] if default is not None else []
        for k in self.grid(spec, target):
            if k not in points:
                points.append(k)
        return points[: self.max_candidates]

    def knobs(self, values: dict[str, Any]) -> K:
        """Knobs from their stored form (a record, a manifest, the CLI)."""
        try:
            return self.knobs_type(**values)
        except TypeError as err:
            raise UnsupportedError(f"schedule: knobs {values} do not fit {self.name}: {err}") \
                from None

    def schedule(self, spec: ConvSpec, target: TargetInfo, knobs: K,
                 packed: bool = False) -> Schedule | None:
        """The algorithm in the form this template asks for, scheduled (None: declined);
        `packed`: the form that reads the weights as `packing` lays them out."""
        if self.prim_func is not None:
            return self.apply(self.prim_func(spec, target, knobs, packed), spec, target, knobs)
        variant = self.variant(spec, knobs)
        if packed:
            variant = dataclasses.replace(variant, packing=self.packing(spec, target, knobs))
        return self.apply(conv_prim_func(spec, target, variant), spec, target, knobs)


@dataclass(frozen=True)
class Family:
    """The templates of one target kind, tried in order, and the generic fallback that
    schedules every spec."""

    kind: str  # "llvm" or "cuda"
    templates: tuple[Template[Any], ...]
    fallback_name: str
    fallback: Callable[[PrimFunc, ConvSpec, TargetInfo], Schedule]
    packs_weights: bool = False  # its artifacts export the packing and run-packed entries

    def template(self, name: str) -> Template[Any]:
        for t in self.templates:
            if t.name == name:
                return t
        names = ", ".join([*(t.name for t in self.templates), self.fallback_name])
        raise UnsupportedError(f"schedule: no {self.kind} template named {name!r} ({names})")

    def schedule_fallback(self, spec: ConvSpec, target: TargetInfo,
                          packed: bool = False) -> Schedule:
        variant = Variant(packing=WeightPacking()) if packed else Variant()
        return self.fallback(conv_prim_func(spec, target, variant), spec, target)


def accumulator_budget(target: TargetInfo) -> int:
    """Accumulator registers a CPU register tile may hold: with 16 registers, 8,
    leaving the rest for the weight vectors and broadcasts one reduction step loads
    (14 spilled); with 32, 14. Fewer than about 6 cannot cover the FMA latency (4
    cycles, 2 FMA pipes: 8 independent chains keep both busy)."""
    return 14 if target.vector_registers >= 32 else 8


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


def first_valid(preferred: Iterable[K], valid: Callable[[K], bool]) -> K | None:
    """The first of a heuristic's knob points, in order of preference, that is valid."""
    return next((k for k in preferred if valid(k)), None)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of n that is <= limit (at least 1)."""
    for d in range(min(n, limit), 0, -1):
        if n % d == 0:
            return d
    return 1
