"""A depthwise layer and the 1 x 1 layer that reads it, as one CPU kernel
(`cpu_separable`): the depthwise-separable pair of MobileNet-style blocks, which
`deploy` finds in a model (`compute.separable_tensors` is the algorithm).

Run apart, the depthwise layer writes its whole output and the 1 x 1 layer reads
it back: MobileNetV2's 56x56x144 is 1.8 MB, past L2, and both layers are cheap
enough per byte that moving it costs as much as computing it. Here the 1 x 1 layer
runs as `cpu_kvec` with its channel blocks inside each output row and the rows in
parallel, and every row first computes the depthwise row it reads, all channels
of it, into a buffer of its own thread (one row: 32 KB at 56x144, 27 KB at
7x960), where the pointwise tiles find it in L1/L2. A 1 x 1 layer reads exactly
one input row per output row, so nothing is computed twice. The depthwise row is
tiled as `cpu_kvec` tiles it alone (channel vectors by a run of pixels, the
padding read in the loads).

Measured on Zen 4 (`llvm-znver4-avx512`, benchmarks/NOTES.md): a prototype of
the fused pair ran in 0.57-0.85 of the time of the two kernels called one after
the other, on MobileNetV2's pairs from 112x112x32 to 7x7x960; inside the whole
model, where the layers apart find more of the intermediate in cache, MobileNetV2
went from 4.11 to 3.84 ms end to end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from convgen.compiler.compute import ENTRY, WeightPacking, separable_prim_func
from convgen.compiler.schedule.common import has_block, loops_below
from convgen.compiler.schedule.cpu import (
    FMA_CHAINS,
    KvecKnobs,
    channel_pad,
    kvec_heuristic,
    kvec_lanes,
    kvec_prefetch,
    kvec_schedule,
    unroll_window,
    write_back_at,
)
from convgen.compiler.targets import TargetInfo
from convgen.errors import UnsupportedError
from convgen.spec import ConvSpec

if TYPE_CHECKING:
    from tvm.s_tir import Schedule
    from tvm.tirx import PrimFunc

TEMPLATE = "cpu_separable"
STAGE_TEMPLATE = "cpu_kvec"  # the template whose knobs each stage takes


@dataclass(frozen=True)
class SeparableKnobs:
    """Each stage's `cpu_kvec` register tile: the depthwise row's (dw_nkv vectors of
    dw_lanes channels by dw_pw pixels) and the pointwise layer's (nkv vectors of
    lanes output channels by pw pixels)."""

    dw_lanes: int
    dw_nkv: int
    dw_pw: int
    lanes: int
    nkv: int
    pw: int


def declines(depthwise: ConvSpec, pointwise: ConvSpec, target: TargetInfo) -> str | None:
    """Why the pair does not run as one kernel (None: it does)."""
    if target.is_cuda:
        return "CPU only"
    if depthwise.dtype != "float32" or pointwise.dtype != "float32":
        return "float32 only"
    if not (depthwise.channels_last and pointwise.channels_last and depthwise.ndim == 2):
        return "2-D channels-last layers only"
    if not depthwise.depthwise_like or depthwise.residual:
        return "the first layer is not depthwise, or adds a residual"
    if depthwise.out_size[-1] == 1 or 1 in depthwise.kernel_size:
        return "rows of one pixel, or a window one tap wide"
    if (pointwise.kernel_size != (1, 1) or pointwise.stride != (1, 1) or any(pointwise.pads)
            or pointwise.groups != 1 or pointwise.data_shape != depthwise.out_shape):
        return "the second layer is not a dense 1 x 1, stride 1, on the first one's output"
    # the 1 x 1 stage may compute channels past K on zero weights (`channel_pad`); the
    # depthwise row would need as many zero input channels, a copy of its input
    dw_lanes = kvec_lanes(depthwise, target)
    if not dw_lanes or channel_pad(depthwise, dw_lanes):
        return "depthwise channels not a multiple of half a vector"
    if pointwise.weight_bytes > 2 * target.l2_bytes:
        # every row rereads all the 1 x 1 weights; measured up to 1.2 MB (C960 -> 320,
        # 7 rows) on a 1 MB L2, still faster fused
        return "the 1 x 1 weights are larger than twice L2"
    return None


def pays(depthwise: ConvSpec, target: TargetInfo, knobs: SeparableKnobs) -> bool:
    """Whether running the pair as one kernel (where `declines` allows it) is worth it
    against the two layers apart. The fused 1 x 1 stage tiles one output row at a
    time, unwidened and unmerged; with 16 registers a 14- or 7-wide row then takes 1
    x 7, 7 FMA chains and a load per FMA, where the layer alone runs 4 x 3 on merged
    rows (`cpu.rows_to_merge`). So with fewer chains than FMA_CHAINS the pair runs
    apart where the depthwise output fits L2 and fusing saves little traffic.
    MobileNetV2, AVX2 code on Zen 4 (`scripts/profile_model.py`, benchmarks/NOTES.md),
    fused against apart, ms: its C576 14x14 pairs 0.195 against 0.032 + 0.132, C960
    7x7 0.148 against 0.017 + 0.105, C384 14x14 0.095 against 0.022 + 0.065; its
    56x56 C144 pair (1.8 MB between, 3 x 4 tiles) 0.215 against 0.161 + 0.140. (32
    registers: 512-bit FMAs, whose pipes 7 chains fill, and 14-wide 2 x 7 tiles.)"""
    chains = knobs.nkv * knobs.pw
    return (target.vector_registers >= 32 or chains >= FMA_CHAINS
            or depthwise.out_bytes > target.l2_bytes)


def knobs(depthwise: ConvSpec, pointwise: ConvSpec, target: TargetInfo,
          depthwise_knobs: dict[str, Any] | None,
          pointwise_knobs: dict[str, Any] | None) -> SeparableKnobs:
    """Each stage's tile as `cpu_kvec` would run its layer alone (`depthwise_knobs` /
    `pointwise_knobs`: that layer's record, None where it has none for cpu_kvec: the
    heuristic). Only the order changes: rows outermost, as the fusion needs."""

    def tile(spec: ConvSpec, recorded: dict[str, Any] | None) -> KvecKnobs:
        # the pair computes its rows as they are: no widened tile
        if recorded is not None and not recorded.get("wide"):
            return KvecKnobs(**recorded)
        chosen = kvec_heuristic(spec, target, widen=False)
        assert chosen is not None  # `declines` checked the lanes
        return chosen

    dw, pw = tile(depthwise, depthwise_knobs), tile(pointwise, pointwise_knobs)
    return SeparableKnobs(dw.lanes, dw.nkv, dw.pw, pw.lanes, pw.nkv, pw.pw)


def schedule(func: PrimFunc, depthwise: ConvSpec, pointwise: ConvSpec, target: TargetInfo,
             knobs: SeparableKnobs) -> Schedule:
    """The pointwise stage as `cpu_kvec` (rows in parallel), the depthwise row computed
    under each row, before the pointwise tiles that read it."""
    rows_parallel = KvecKnobs(knobs.lanes, knobs.nkv, knobs.pw, k_inner=True)
    sch = kvec_schedule(func, pointwise, target, rows_parallel, prefetch=False)
    assert sch is not None  # (declines only widened rows)
    if has_block(sch, "dw_pad"):
        sch.compute_inline(sch.get_sblock("dw_pad"))  # read in the loads (`_kvec_pad_at`)
    dw = sch.get_sblock("dw_conv")
    mid = sch.get_sblock("dw_out") if has_block(sch, "dw_out") else dw
    # the parallel loop over output rows, of the pointwise block that reads the row
    # (TVM's buffer compaction then allocates the depthwise row in it: per thread)
    update = sch.get_consumers(mid)[0]
    row = sch.get_loops(update)[0]
    if mid is not dw:
        sch.compute_at(mid, row)
    sch.compute_at(dw, row)
    wb = sch.cache_write(dw, 0, "local")
    if has_block(sch, "dw_out"):
        sch.reverse_compute_inline(sch.get_sblock("dw_out"))  # bias, activation
    # compute_at makes loops only for the extents the row needs that exceed one: the
    # pixels, the channels and the window (`declines` keeps each of them wider), not
    # the single input channel
    below = loops_below(sch, dw, row)
    if len(below) != 2 + depthwise.ndim:
        raise UnsupportedError(f"schedule: {TEMPLATE} found {len(below)} loops in the "
                               "depthwise row, not pixels, channels and window")
    x, c, *window = below
    co, cvo, cvi = sch.split(c, [None, knobs.dw_nkv, knobs.dw_lanes])
    xo, xi = sch.split(x, [None, knobs.dw_pw])
    sch.reorder(co, xo, *window, xi, cvo, cvi)
    sch.unroll(xi)
    sch.unroll(cvo)
    sch.vectorize(cvi)
    unroll_window(sch, window, depthwise)
    write_back_at(sch, wb, xo)
    init = sch.decompose_reduction(dw, window[0])
    sch.vectorize(sch.get_loops(init)[-1])
    return kvec_prefetch(sch, update, pointwise, target, rows_parallel)


def prim_func(depthwise: ConvSpec, pointwise: ConvSpec, target: TargetInfo,
              knobs: SeparableKnobs) -> tuple[PrimFunc, WeightPacking, WeightPacking]:
    """The pair's scheduled run-packed PrimFunc, and each stage's weight packing."""
    packings = WeightPacking(knobs.dw_lanes), WeightPacking(knobs.lanes)
    func = separable_prim_func(depthwise, pointwise, target, *packings,
                               channel_extra=channel_pad(pointwise, knobs.lanes))
    return schedule(func, depthwise, pointwise, target, knobs).mod[ENTRY], *packings
