"""The CPU schedule of Winograd F(m x m, 3 x 3) (the algorithm: `compiler/winograd.py`).

Per stage, the register and memory model:

  * input transform ("wino_bt" then "wino_v"): per tile and per vector of input
    channels (channels-last padded input, so each tap is one contiguous load),
    the alpha x alpha rows then columns in registers, every transform index
    unrolled so each output is a few adds of constant-coefficient terms; V is
    written as alpha^2 planes of [tiles, C].
  * batched GEMM ("bgemm"), the FLOPs: for each of the alpha^2 planes, pt tiles x
    nkv vectors of `lanes` output channels accumulated in registers across all
    input channels (cpu_kvec's register tile: one broadcast of V and nkv loads of
    U per step), U packed [alpha^2, K/lanes, C, lanes] so the loads are
    contiguous.
  * output transform ("wino_at", then the rows): per tile and vector of output
    channels, columns then rows in registers, unrolled like the input transform.
  * "out": the crop of whole tiles to the output (+ the fused epilogue), in the
    output's layout.

The stages are arranged one of two ways (the `rows` knob):

  * fused (rows > 0): the parallel tasks are runs of `rows` tile rows, and each
    task pads its input rows, transforms them, multiplies its tiles on every plane
    and writes its outputs through the inverse transform, with the crop and
    epilogue, before the next: its V and M blocks (alpha^2 x tiles x C or K) stay
    in L2 between the stages, and one parallel region does the whole layer. Every
    task reads all of U, so this suits U of a few times L2 or less (the early,
    wide layers, whose V and M are the large arrays: 1.8 MB each at 56x56 C64).
  * staged (rows = 0): each stage over the whole layer before the next, each in
    parallel (planes x tile blocks for the GEMM), V and M whole arrays in memory
    between them; each plane's U block (C x K) is read once per tile block. This
    suits the deep layers, whose U is many MB and whose tiles are few, and dilated
    layers, whose tiles (one dilation phase each) are not runs of output rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from convgen.compiler import winograd
from convgen.compiler.compute import WeightPacking, winograd_prim_func
from convgen.compiler.schedule.common import (
    Template,
    accumulator_budget,
    divisor_at_most,
    divisors,
    has_block,
    loops_below,
    new_schedule,
)
from convgen.compiler.schedule.prefetch import (
    accumulator_bytes,
    accumulator_scope,
    prefetch_weights,
)
from convgen.compiler.targets import DEFAULT_FMA_BITS_PER_CYCLE, TargetInfo
from convgen.spec import ConvSpec

if TYPE_CHECKING:
    from tvm.s_tir import Schedule
    from tvm.tirx import PrimFunc

NAME = "cpu_winograd"


@dataclass(frozen=True)
class WinogradKnobs:
    """F(tile x tile, 3x3); the GEMM's register tile: pt tiles x nkv vectors of
    `lanes` output channels; rows: tile rows per task of the fused arrangement, 0
    for the staged one (the module docstring)."""

    tile: int
    lanes: int
    nkv: int
    pt: int
    rows: int = 0


def _lanes(spec: ConvSpec, target: TargetInfo) -> int:
    vec = target.fp32_lanes
    for lanes in (vec, vec // 2):
        if spec.out_channels % lanes == 0:
            return lanes
    return 0


def _applies(spec: ConvSpec, target: TargetInfo) -> bool:
    return winograd.declines(spec) is None and _lanes(spec, target) > 0


def _knobs(spec: ConvSpec, target: TargetInfo, tile: int) -> WinogradKnobs:
    """Staged: the register tile cpu_kvec's way: per step pt broadcasts and nkv loads
    feed pt x nkv FMAs, within the accumulator budget. But a tile of one tile (pt = 1)
    rereads the plane's U (C x K, from L2) for every tile, so any tile of several
    comes first: with 16 registers (budget 8) on 28x28 C128, 8 channel vectors x 1
    tile ran 0.82 ms, 1 x 7 0.52 (AVX2 code, on Zen 4). Then, among the tiles whose
    loads the core issues as fast as their FMAs need them, the fewest tile blocks:
    each block rereads the plane's U, and the deep layers' U planes (256 KB-1 MB) come
    from L2 or beyond. A 512-bit FMA issues once a cycle on Zen 4, so there 1 x 8 (9
    loads per 8 FMAs) beat 2 x 4, C512 7x7 0.727 against 0.832 ms; in 8-lane AVX2
    code, two FMAs a cycle, 1 x 8 needs 2.3 loads a cycle and lost, 1.512 against
    1.216 (benchmarks/NOTES.md). Where no such tile exists, the most FMAs per load."""
    lanes = _lanes(spec, target)
    budget = accumulator_budget(target)
    tiles = winograd.tiles(spec, tile)

    def rank(k: WinogradKnobs) -> tuple[bool, bool, int, float]:
        fed = target.fmas_per_cycle(k.lanes) / _fmas_per_load(k) <= target.loads_per_cycle
        return k.pt > 1, fed, -(tiles // k.pt) if fed else 0, _fmas_per_load(k)

    best = None
    for nkv in (2, 4, 1, 8):
        nkv = divisor_at_most(spec.out_channels // lanes, nkv)
        knobs = WinogradKnobs(tile, lanes, nkv, divisor_at_most(tiles, max(1, budget // nkv)))
        if best is None or rank(knobs) > rank(best):
            best = knobs
    assert best is not None
    return best


def _fused_knobs(spec: ConvSpec, target: TargetInfo, tile: int) -> WinogradKnobs:
    """Fused, one tile row per task: one channel vector by the longest run of the
    row's tiles within the accumulator budget. A task's V block is only a row of
    tiles, reread from L1 by every channel vector; one vector of U per step then
    feeds pt FMAs. On 56x56 C64 (Zen 4) 1 x 14 ran 0.33-0.40 ms, 2 x 7 0.37-0.43;
    on 28x28 C128 1 x 7 0.40, 2 x 7 0.45 (benchmarks/NOTES.md)."""
    per_row = winograd.tile_grid(spec, tile)[1]
    return WinogradKnobs(tile, _lanes(spec, target), 1,
                         divisor_at_most(per_row, accumulator_budget(target)), rows=1)


def _fmas_per_load(k: WinogradKnobs) -> float:
    return k.nkv * k.pt / (k.nkv + k.pt)


def _task_tiles(spec: ConvSpec, tile: int, rows: int) -> int:
    """Tiles per parallel task of the GEMM's tile loop: a fused task's `rows` rows of
    tiles, or (staged, rows = 0) all of the layer's."""
    if rows:
        return rows * winograd.tile_grid(spec, tile)[1]
    return winograd.tiles(spec, tile)


def _fusable(spec: ConvSpec, tile: int, rows: int) -> bool:
    """Where the fused arrangement's loop nest exists: compute_at makes no loop for an
    extent of one, so a task of a single tile, or a single input channel, leaves the
    GEMM without the loops it tiles; and its tiles are runs of output rows, which a
    dilated layer's phases are not."""
    return (_task_tiles(spec, tile, rows) > 1 and spec.in_channels > 1
            and winograd.phases(spec) == 1)


def _fuses(spec: ConvSpec, target: TargetInfo, tile: int) -> bool:
    """Whether the fused arrangement pays: every task rereads U, so U within 4x L2
    (then it comes from L2 or L3 at the pace of pt FMAs per vector loaded), a tile
    row's V and M blocks within half of L2, and a task per core at least. Measured
    on Zen 4 (2 cores, 1 MB L2 each), bound kernels, warm / after 64 MB of other
    traffic: 56x56 C64 F(4x4) (U 0.6 MB) 0.33 / 0.54 ms fused against 0.45 / 0.79
    staged; 28x28 C128 (U 2.4 MB) 0.40 / 0.71 against 0.57 / 0.79; batch 8 56x56
    4.1 / 4.1 against 8.0 / 8.4; but 14x14 C256 (U 9.4 MB, 4 tile rows) 0.65-0.73 /
    1.2-1.7 against 0.65 / 1.03."""
    alpha = tile + 2
    row_tiles = winograd.tile_grid(spec, tile)[1]
    row_bytes = alpha * alpha * row_tiles * (spec.in_channels + spec.out_channels) * 4
    tasks = spec.batch * winograd.tile_grid(spec, tile)[0]  # a task's rows: one image's
    return (_u_rereadable(spec, target, tile) and row_bytes <= target.l2_bytes // 2
            and tasks >= target.num_cores and _fusable(spec, tile, 1))


# FMA lanes a core issued per cycle where `_u_rereadable`'s bound was measured: Zen 4,
# one 512-bit FMA a cycle (the default FMA width, as Zen 3's two 256-bit ones).
MEASURED_FMA_LANES = DEFAULT_FMA_BITS_PER_CYCLE // 32


def _u_rereadable(spec: ConvSpec, target: TargetInfo, tile: int) -> bool:
    """Whether U is small enough for every fused task to read it all: within 4x L2 on
    a core of MEASURED_FMA_LANES, less on faster ones, which wait on the rereads from L3
    sooner. Beyond, the fused tasks measured fastest only warm (tuning's timing), and
    lost wherever U came from memory: ResNet-50's C256 14x14 (9.4 MB) deployed 42.63 ms
    fused against 40.05 staged; C512 7x7 (16.8 MB) through `k(x)` in `convgen bench`
    1.13-1.28 ms fused against 0.84-0.89 staged. On Zen 5 (32 lanes a cycle) the 28x28
    C128 layers (2.4 MB) ran 0.151 ms staged against 0.178 fused alone, 0.151-0.160
    against 0.217-0.227 inside ResNet-50 (benchmarks/NOTES.md). So tuning offers the
    fused arrangement only within this bound too."""
    u_bytes = math.prod(winograd.packed_shape(spec, tile, 1)) * 4  # float32
    speed = target.fma_lanes_per_cycle(_lanes(spec, target)) / MEASURED_FMA_LANES
    return u_bytes * max(1.0, speed) <= 4 * target.l2_bytes


# Each plane's U block (C x K) is read once per call and used by every tile: below
# this many tiles the GEMMs are bound by reading U (C512 7x7 K512: F(4x4) has 4
# tiles and ran 161-166 effective GFLOP/s, F(2x2) 16 tiles and 225-268, direct 137-188).
MIN_TILES = 16
# And the transforms must be paid for: a tile takes a layer only where its GEMMs need
# this many times fewer multiply-adds than direct convolution (`winograd.saving`).
# C512 7x7 K512 F(2x2): 1.72, faster than direct (above). A layer dilated past its
# output's size crops most of each tile: DeepLab's C512 28x28 K256 dilated by 12,
# F(4x4) 1.36, ran 9.6-10.2 ms as direct's 9.7 (F(2x2), 0.77, 15.8), AVX2 code on
# Zen 4 (benchmarks/NOTES.md).
MIN_SAVING = 1.5


def _heuristic(spec: ConvSpec, target: TargetInfo) -> WinogradKnobs | None:
    """Where the channels make the GEMMs worth their transforms (each input and output
    element is transformed once per C x K multiply-adds of the GEMM): F(4x4), else
    F(2x2) where F(4x4) leaves too few tiles to reuse U. F(6x6), as fast as F(4x4)
    on 56x56 and 28x28 but 4x less accurate, is left to tuning, and so is F(3x3),
    slower than F(4x4) warm but with 30% less U to read from memory in a model."""
    if not _applies(spec, target) or min(spec.in_channels, spec.out_channels) < 32:
        return None
    for tile in (4, 2):
        if winograd.tiles(spec, tile) >= MIN_TILES and winograd.saving(spec, tile) >= MIN_SAVING:
            if _fuses(spec, target, tile):
                return _fused_knobs(spec, target, tile)
            return _knobs(spec, target, tile)
    return None


def _grid(spec: ConvSpec, target: TargetInfo) -> Iterator[WinogradKnobs]:
    if not _applies(spec, target):
        return
    lanes = _lanes(spec, target)
    budget = accumulator_budget(target) + 4
    for tile in winograd.TILES:
        yield _knobs(spec, target, tile)  # valid however small the layer
        rows_per_image = winograd.tile_grid(spec, tile)[0]
        arrangements = [0] + [r for r in (1, 2) if rows_per_image % r == 0
                              and _fusable(spec, tile, r) and _u_rereadable(spec, target, tile)]
        for rows in arrangements:
            for nkv in divisors(spec.out_channels // lanes):
                for pt in divisors(_task_tiles(spec, tile, rows)):
                    if nkv <= 8 and pt <= 16 and 6 <= nkv * pt <= budget:
                        yield WinogradKnobs(tile, lanes, nkv, pt, rows)


def _packing(spec: ConvSpec, target: TargetInfo, knobs: WinogradKnobs) -> WeightPacking:
    return WeightPacking(knobs.lanes, winograd_tile=knobs.tile)


def _prim_func(spec: ConvSpec, target: TargetInfo, knobs: WinogradKnobs,
               packed: bool) -> PrimFunc:
    return winograd_prim_func(spec, target, knobs.tile, knobs.lanes, packed)


def _unroll_and_vectorize(sch: Schedule, loops: list[Any], lanes: int) -> None:
    """Unroll a transform's index loops and vectorize its channel loop, the last one
    (gone from `loops` when its extent is 1: every loop is then unrolled)."""
    *outer, last = loops
    for lp in outer:
        sch.unroll(lp)
    if int(sch.get(last).extent) == lanes and lanes > 1:
        sch.vectorize(last)
    else:
        sch.unroll(last)


def _transform(sch: Schedule, second: str, first: str, tile_axis: int, vec: int) -> None:
    """A transform's two stages: the tiles in parallel; per tile and vector of channels
    (the last axis) the first stage in registers, then the second; every transform
    index unrolled."""
    block = sch.get_sblock(second)
    *loops, chan = sch.get_loops(block)
    tile = loops.pop(tile_axis)
    co, ci = _vector_split(sch, chan, vec)
    sch.reorder(tile, co, *loops, ci)
    sch.parallel(tile)
    for lp in loops:
        sch.unroll(lp)
    sch.vectorize(ci)
    stage = sch.get_sblock(first)
    sch.compute_at(stage, co)
    _unroll_and_vectorize(sch, loops_below(sch, stage, co), int(sch.get(ci).extent))
    sch.set_scope(stage, 0, "local")


def _vector_split(sch: Schedule, loop: Any, cap: int) -> tuple[Any, Any]:
    v = divisor_at_most(int(sch.get(loop).extent), cap)
    outer, inner = sch.split(loop, [None, v])
    return outer, inner


def _apply(func: PrimFunc, spec: ConvSpec, target: TargetInfo,
           knobs: WinogradKnobs) -> Schedule | None:
    if not _applies(spec, target) or spec.out_channels % (knobs.lanes * knobs.nkv) \
            or winograd.tile_grid(spec, knobs.tile)[0] % max(1, knobs.rows) \
            or _task_tiles(spec, knobs.tile, knobs.rows) % knobs.pt \
            or (knobs.rows and not _fusable(spec, knobs.tile, knobs.rows)):
        return None
    vec = target.fp32_lanes
    sch = new_schedule(func)
    if has_block(sch, "wino_u"):
        # the plain entry transforms the weights on every call
        _transform_weights(sch, sch.get_sblock("wino_u"))
    if knobs.rows:
        gemm = _fused(sch, spec, knobs, vec)
        return prefetch_weights(sch, gemm, _tile_bytes(knobs), target)
    # padded input, channels-last
    pad = sch.get_sblock("pad")
    n, y, _, c = sch.get_loops(pad)
    sch.parallel(sch.fuse(n, y))
    _, ci = _vector_split(sch, c, vec)
    sch.vectorize(ci)
    # input transform: per tile and channel vector, rows then columns in registers
    _transform(sch, "wino_v", "wino_bt", tile_axis=2, vec=vec)
    # batched GEMM: pt tiles x nkv channel vectors per plane, over all input channels
    gemm = sch.get_sblock("bgemm")
    _gemm(sch, gemm, sch.get_loops(gemm), knobs, parallel=True)
    # output transform: per tile and channel vector, columns then rows in registers
    _transform(sch, "wino_y", "wino_at", tile_axis=0, vec=vec)
    # the crop into the output's layout (+ bias)
    out = sch.get_sblock("out")
    loops = sch.get_loops(out)
    sch.parallel(sch.fuse(*loops[:2]))
    _, inner = _vector_split(sch, loops[-1], vec)
    sch.vectorize(inner)
    # each plane's tile blocks (consecutive parallel iterations) read the same U
    return prefetch_weights(sch, gemm, _tile_bytes(knobs), target,
                            group=winograd.tiles(spec, knobs.tile) // knobs.pt)


def _tile_bytes(knobs: WinogradKnobs) -> int:
    """The GEMM's accumulators: pt tiles x nkv vectors."""
    return accumulator_bytes(knobs.pt * knobs.nkv, knobs.lanes)


def _gemm(sch: Schedule, gemm: Any, loops: list[Any], knobs: WinogradKnobs,
          parallel: bool) -> None:
    """The batched GEMM's register tile over its loops (eps, nu, t, k, rc): pt tiles x
    nkv channel vectors accumulated across every input channel, written back once;
    `parallel`: the planes and tile blocks are the parallel tasks."""
    eps, nu, t, k, rc = loops
    wb = sch.cache_write(gemm, 0, accumulator_scope(_tile_bytes(knobs)))
    to, ti = sch.split(t, [None, knobs.pt])
    ko, kvo, kvi = sch.split(k, [None, knobs.nkv, knobs.lanes])
    sch.reorder(eps, nu, to, ko, rc, ti, kvo, kvi)
    if parallel:
        sch.parallel(sch.fuse(eps, nu, to))
    sch.unroll(ti)
    sch.unroll(kvo)
    sch.vectorize(kvi)
    sch.reverse_compute_at(wb, ko)
    *outer, inner = loops_below(sch, wb, ko)
    for lp in outer:
        sch.unroll(lp)
    sch.vectorize(inner)
    init = sch.decompose_reduction(gemm, rc)
    sch.vectorize(sch.get_loops(init)[-1])


def _transform_weights(sch: Schedule, u: Any) -> None:
    """U's two stages, the channel vectors in parallel: per vector of output channels
    and input channel, its 9 taps loaded once (a gather across the vector's output
    channels, which are not adjacent in the weight's layout), the alpha x 3 rows in
    registers, then all alpha^2 values of U from them. U written out as a reduction
    over the taps instead (one product of three terms per tap and value) kept its
    partial sums in memory: the plain entry on ResNet-50's C256 14x14 layer took
    3.0-3.7 ms, now 0.8-2.0 (Zen 4, benchmarks/NOTES.md); a pass blocking the weights
    first, so that the taps are contiguous loads, gained nothing."""
    e, kb, c, lane = sch.get_loops(u)
    sch.reorder(kb, c, e, lane)
    sch.parallel(kb)
    sch.unroll(e)
    sch.vectorize(lane)
    gg = sch.get_sblock("wino_gg")
    sch.compute_at(gg, c)
    *rows, gg_lane = loops_below(sch, gg, c)
    for loop in rows:
        sch.unroll(loop)
    sch.vectorize(gg_lane)
    sch.set_scope(gg, 0, "local")


def _fused(sch: Schedule, spec: ConvSpec, knobs: WinogradKnobs, vec: int) -> Any:
    """The fused arrangement: the output's loops, split into tiles, are the nest; each
    task's stages are computed at its loop. Producers are placed where their
    consumer's loop reads them (compute_at), so each region is a task's own tiles
    (or its input rows, halo included) and the buffers shrink to them. Returns the
    GEMM's block."""
    m = knobs.tile
    # the rows of the output transform, computed as the crop writes each output
    sch.compute_inline(sch.get_sblock("wino_y"))
    out = sch.get_sblock("out")
    loops = sch.get_loops(out)
    n, yy, xx, k = loops if spec.channels_last else (loops[0], *loops[2:], loops[1])
    th, i = sch.split(yy, [None, m])  # tail tiles: predicated
    tw, j = sch.split(xx, [None, m])
    ko, ki = _vector_split(sch, k, vec)
    tho, thi = sch.split(th, [None, knobs.rows])
    sch.reorder(n, tho, thi, tw, ko, i, j, ki)
    task = sch.fuse(n, tho)
    sch.parallel(task)
    sch.unroll(i)
    sch.unroll(j)
    sch.vectorize(ki)
    at = sch.get_sblock("wino_at")  # the columns, per tile and channel vector
    sch.compute_at(at, ko)
    _unroll_and_vectorize(sch, loops_below(sch, at, ko), int(sch.get(ki).extent))
    sch.set_scope(at, 0, "local")
    gemm = sch.get_sblock("bgemm")
    sch.compute_at(gemm, task)
    _gemm(sch, gemm, loops_below(sch, gemm, task), knobs, parallel=False)
    v = sch.get_sblock("wino_v")
    sch.compute_at(v, task)
    eps, nu, t, c = loops_below(sch, v, task)
    co, ci = _vector_split(sch, c, vec)
    sch.reorder(t, co, eps, nu, ci)
    sch.unroll(eps)
    sch.unroll(nu)
    sch.vectorize(ci)
    bt = sch.get_sblock("wino_bt")
    sch.compute_at(bt, co)
    _unroll_and_vectorize(sch, loops_below(sch, bt, co), int(sch.get(ci).extent))
    sch.set_scope(bt, 0, "local")
    # the task's padded input rows (with the 2-row halo the next task pads again)
    pad = sch.get_sblock("pad")
    sch.compute_at(pad, task)
    _, ci = _vector_split(sch, loops_below(sch, pad, task)[-1], vec)
    sch.vectorize(ci)
    return gemm


TEMPLATE = Template(NAME, WinogradKnobs, _heuristic, _grid, _apply, packing=_packing,
                    algorithm="winograd", prim_func=_prim_func)
