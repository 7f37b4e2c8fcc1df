"""CUDA schedules."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from convgen.schedule.common import Template, has_block, new_schedule
from convgen.spec import ConvSpec
from convgen.targets import TargetInfo

if TYPE_CHECKING:
    from tvm.s_tir import Schedule
    from tvm.tirx import PrimFunc

FALLBACK_NAME = "cuda_generic"
TEMPLATES: list[Template[Any]] = []

# 128 threads a block: 4 warps keep an SM's schedulers busy with several blocks
# resident, and divide every output size we have seen without many idle lanes.
FALLBACK_THREADS = 128


def fallback(func: PrimFunc, spec: ConvSpec, target: TargetInfo) -> Schedule:
    """One thread per output element, the sum in a register. Correct for every spec."""
    sch = new_schedule(func)
    if has_block(sch, "pad"):
        sch.compute_inline(sch.get_sblock("pad"))
    conv = sch.get_sblock("conv")
    nsp = len(spec.out_shape)
    if has_block(sch, "out"):
        last = sch.get_sblock("out")
        sch.set_scope(conv, 0, "local")
    else:
        last = sch.cache_write(conv, 0, "local")
    fused = sch.fuse(*sch.get_loops(last)[:nsp])
    bx, tx = sch.split(fused, [None, FALLBACK_THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.compute_at(conv, tx)
    return sch
