"""CPU (LLVM) schedules.

Templates, tried in order:
  * `cpu_direct_nchw` (channels-first): a register-tiled direct convolution.
    Each task owns kt output channels x wt output columns of one output row;
    the float32 accumulators for that tile stay in vector registers across the
    whole reduction (rc, r...), each input vector load feeds kt FMAs against
    broadcast weights. The flip sits on the input tap (compute.py), so `conv`
    only shifts the contiguous input load: measured as fast as `corr`.
The fallback (`cpu_generic`) works for every spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from convgen.schedule.common import Template, divisor_at_most, divisors, has_block, new_schedule
from convgen.spec import ConvSpec
from convgen.targets import TargetInfo

if TYPE_CHECKING:
    from tvm.s_tir import Schedule
    from tvm.tirx import PrimFunc

FALLBACK_NAME = "cpu_generic"


@dataclass(frozen=True)
class DirectKnobs:
    """The register tile: kt output channels x wt output columns."""

    kt: int
    wt: int


def _direct_knobs(spec: ConvSpec, target: TargetInfo) -> DirectKnobs | None:
    if spec.channels_last or spec.dtype != "float32":
        return None
    # wt must divide the output width: a ragged tail became a guarded loop and
    # fell from 179 to 60 GFLOP/s (C64 56x56 3x3, wt 16 vs 8, 2 threads, Zen 4).
    # 14-wide tiles (8 + 8 lanes, masked) measured 158 GFLOP/s on C128 28x28 3x3
    # where 7-wide ones gave 58.
    wt = divisor_at_most(spec.out_size[-1], 16)
    if wt < 4:
        return None
    # Accumulators: kt x ceil(wt / 8) 256-bit vectors, within the register file
    # (16 ymm with AVX2, 32 with AVX-512) less two for the input vector and the
    # broadcast weight; a 7x16 tile that spilled ran at ~65 GFLOP/s on AVX2.
    regs = 32 if target.vector_bits() >= 512 else 16
    per_channel = -(-wt // 8)
    kt = divisor_at_most(spec.out_channels, min(16, (regs - 2) // per_channel))
    if kt < 2:
        return None
    return DirectKnobs(kt=kt, wt=wt)


def _direct_candidates(spec: ConvSpec, target: TargetInfo) -> list[DirectKnobs]:
    """Every register tile that fits the register file (the tuning grid)."""
    if _direct_knobs(spec, target) is None:
        return []
    regs = 32 if target.vector_bits() >= 512 else 16
    wts = [d for d in divisors(spec.out_size[-1]) if 4 <= d <= 32]
    kts = [d for d in divisors(spec.out_channels) if 2 <= d <= 32]
    return [DirectKnobs(kt, wt) for wt in wts for kt in kts if kt * -(-wt // 8) <= regs - 2]


def _direct(func: PrimFunc, spec: ConvSpec, target: TargetInfo, knobs: DirectKnobs) -> Schedule:
    sch = new_schedule(func)
    conv = sch.get_sblock("conv")
    acc = sch.cache_write(conv, 0, "local")  # the register tile; `acc` writes it back
    if has_block(sch, "out"):
        sch.reverse_compute_inline(sch.get_sblock("out"))  # bias fused into the write-back
    nd = spec.ndim
    loops = sch.get_loops(conv)
    n, k, *spatial = loops[: 2 + nd]
    rc, *taps = loops[2 + nd :]
    ko, ki = sch.split(k, [None, knobs.kt])
    wo, wi = sch.split(spatial[-1], [None, knobs.wt])
    sch.reorder(n, ko, *spatial[:-1], wo, rc, *taps, ki, wi)
    sch.parallel(sch.fuse(n, ko, *spatial[:-1]))
    sch.reverse_compute_at(acc, wo)
    sch.unroll(ki)
    sch.vectorize(wi)
    sch.decompose_reduction(conv, rc)
    sch.vectorize(sch.get_loops(acc)[-1])
    if has_block(sch, "pad"):
        # padding is materialised once (a cheap copy) so the hot loop's loads are
        # unguarded; inlined, every lane carried a bounds check
        pad = sch.get_sblock("pad")
        sch.parallel(sch.fuse(*sch.get_loops(pad)[:2]))
    return sch


TEMPLATES: list[Template[Any]] = [
    Template("cpu_direct_nchw", DirectKnobs, _direct_knobs, _direct_candidates, _direct),
]


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
