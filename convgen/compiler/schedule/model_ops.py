"""A deployed model's other operators (element-wise, pooling, reductions, the final
GEMM) on the CPU: one generic schedule, no tuning.

After FuseOps/FuseTIR each of them is a PrimFunc of a few blocks. Relax's default
CPU pipeline compiles them as written: every intermediate buffer materialised,
and nothing in parallel. What pays here:

  * inlining the spatial blocks into their consumer, so a fused add + relu reads
    its inputs once and keeps no intermediate buffer;
  * vectorizing an element-wise nest by a lane count that divides its innermost
    extent (with one that does not, TVM cannot simplify the index over a vector
    and emits gathers: 18x slower on a 56-wide row);
  * threads only for large operators: a parallel region costs several
    microseconds to wake the pool, more than a 200 K-element ReLU takes on one
    core (LLVM already vectorizes the innermost loop of such a nest).

The convolutions are convgen's own kernels, marked `tirx.is_scheduled`, which
this pass leaves alone.
"""

from __future__ import annotations

import math
from typing import Any

# element-wise nests with fewer outputs run on one core (see above); reductions below
# this much work (outputs x reduction extent) too
PARALLEL_MIN_OUTPUTS = 1 << 20
PARALLEL_MIN_WORK = 1 << 21


def schedule_model_ops() -> Any:
    """The pass: `OtherOpsCPU` on every PrimFunc not yet scheduled."""
    from tvm.s_tir import dlight

    return dlight.ApplyDefaultSchedule(_rule())


def _rule() -> Any:
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import try_inline_contiguous_spatial
    from tvm.target.codegen import llvm_get_vector_width

    class OtherOpsCPU(dlight.ScheduleRule):  # type: ignore[misc]
        def apply(self, func: Any, target: Any, _tunable: bool) -> Any:
            if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
                return None
            sch = s_tir.Schedule(func)
            blocks = normalize_prim_func(sch)
            if blocks is None:
                return None
            blocks = try_inline_contiguous_spatial(sch, blocks)
            bits = llvm_get_vector_width(target)
            widest = max((bits if bits > 0 else 128) // 32, 4)  # float32 lanes
            for block in blocks:
                loops = sch.get_loops(block.block_rv)
                kinds = block.dom_kind()
                spatial = len(kinds) - len(kinds.lstrip("S"))
                extents = [_extent(sch, loop) for loop in loops]
                if spatial == 0 or len(loops) != len(kinds) or None in extents:
                    continue
                outputs = math.prod(extents[:spatial])
                if block.is_injective():
                    lanes = next((n for n in (widest, 16, 8, 4)
                                  if n <= widest and extents[-1] % n == 0), None)
                    outer = sch.fuse(*loops) if len(loops) > 1 else loops[0]
                    if lanes and outputs >= 4 * lanes:
                        outer, inner = sch.split(outer, factors=[None, lanes])
                        sch.vectorize(inner)
                    if outputs >= PARALLEL_MIN_OUTPUTS:
                        sch.parallel(outer)
                elif math.prod(extents) >= PARALLEL_MIN_WORK and outputs >= 2:
                    sch.parallel(sch.fuse(*loops[:spatial]) if spatial > 1 else loops[0])
            return sch

    return OtherOpsCPU()


def _extent(sch: Any, loop: Any) -> int | None:
    extent = sch.get(loop).extent
    try:
        return int(extent)
    except (TypeError, ValueError):  # symbolic
        return None
