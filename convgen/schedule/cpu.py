"""CPU (LLVM) schedules."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from convgen.schedule.common import Template, divisor_at_most, has_block, new_schedule
from convgen.spec import ConvSpec
from convgen.targets import TargetInfo

if TYPE_CHECKING:
    from tvm.s_tir import Schedule
    from tvm.tirx import PrimFunc

FALLBACK_NAME = "cpu_generic"
TEMPLATES: list[Template[Any]] = []


def _parallel_outer(sch: Schedule, loops: list[Any], extents: list[int], cores: int) -> None:
    """Fuse leading loops until there is enough parallel work for every core, then parallelize."""
    take, work = 1, extents[0]
    while take < len(loops) - 1 and work < 4 * cores:
        work *= extents[take]
        take += 1
    fused = sch.fuse(*loops[:take]) if take > 1 else loops[0]
    sch.parallel(fused)


def fallback(func: PrimFunc, spec: ConvSpec, target: TargetInfo) -> Schedule:
    """Correct for every spec, and much faster than the bare loop nest: pad inlined,
    the outer loops parallel, the innermost output axis moved inside the reduction
    and vectorized. Not tuned: the templates are the fast path."""
    sch = new_schedule(func)
    if has_block(sch, "pad"):
        sch.compute_inline(sch.get_sblock("pad"))
    conv = sch.get_sblock("conv")
    out_shape = spec.out_shape
    nsp = len(out_shape)
    loops = sch.get_loops(conv)
    spatial, reduction = loops[:nsp], loops[nsp:]
    lanes = target.vector_bits() // 32 or 4
    inner = divisor_at_most(out_shape[-1], lanes)
    io, ii = sch.split(spatial[-1], [None, inner])
    sch.reorder(*spatial[:-1], io, *reduction, ii)
    extents = [*out_shape[:-1], out_shape[-1] // inner]
    _parallel_outer(sch, [*spatial[:-1], io], extents, target.num_cores)
    if inner > 1:
        sch.vectorize(ii)
    # The accumulator's zero-init moves out of the reduction loops (it would
    # otherwise be a branch on the first reduction step inside the hot loop).
    init = sch.decompose_reduction(conv, reduction[0])
    if inner > 1:
        from tvm.tirx import ForKind

        init_inner = sch.get_loops(init)[-1]
        if sch.get(init_inner).kind != ForKind.VECTORIZED:
            sch.vectorize(init_inner)
    if has_block(sch, "out"):
        out = sch.get_sblock("out")
        oloops = sch.get_loops(out)
        _parallel_outer(sch, oloops, list(out_shape), target.num_cores)
    return sch
