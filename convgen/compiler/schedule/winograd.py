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
    contiguous; one plane's U block (C x K) stays in L1/L2 while the tiles stream.
  * output transform ("wino_at", "wino_y"): per tile and vector of output
    channels, columns then rows in registers, unrolled like the input transform.
  * "out": the crop of whole tiles to the output (+ the fused epilogue), in the output's layout.

The planes and tiles are the parallel axes: alpha^2 x tiles/pt tasks.
"""

from __future__ import annotations

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
from convgen.compiler.targets import TargetInfo
from convgen.spec import ConvSpec

if TYPE_CHECKING:
    from tvm.s_tir import Schedule
    from tvm.tirx import PrimFunc

NAME = "cpu_winograd"


@dataclass(frozen=True)
class WinogradKnobs:
    """F(tile x tile, 3x3); the GEMM's register tile: pt tiles x nkv vectors of
    `lanes` output channels."""

    tile: int
    lanes: int
    nkv: int
    pt: int


def _lanes(spec: ConvSpec, target: TargetInfo) -> int:
    vec = target.fp32_lanes
    for lanes in (vec, vec // 2):
        if spec.out_channels % lanes == 0:
            return lanes
    return 0


def _applies(spec: ConvSpec, target: TargetInfo) -> bool:
    return winograd.declines(spec) is None and _lanes(spec, target) > 0


def _knobs(spec: ConvSpec, target: TargetInfo, tile: int) -> WinogradKnobs:
    """The register tile cpu_kvec's way: per step pt broadcasts and nkv loads feed
    pt x nkv FMAs, so the squarest tile within the accumulator budget (the tile
    count often has few divisors: 7 x 7 tiles of a 28x28 output)."""
    lanes = _lanes(spec, target)
    budget = accumulator_budget(target)
    tiles = winograd.tiles(spec, tile)
    best = None
    for nkv in (2, 4, 1, 8):
        nkv = divisor_at_most(spec.out_channels // lanes, nkv)
        knobs = WinogradKnobs(tile, lanes, nkv, divisor_at_most(tiles, max(1, budget // nkv)))
        if best is None or _fmas_per_load(knobs) > _fmas_per_load(best):
            best = knobs
    assert best is not None
    return best


def _fmas_per_load(k: WinogradKnobs) -> float:
    return k.nkv * k.pt / (k.nkv + k.pt)


# Each plane's U block (C x K) is read once per call and used by every tile: below
# this many tiles the GEMMs are bound by reading U (C512 7x7 K512: F(4x4) has 4
# tiles and ran 161-166 effective GFLOP/s, F(2x2) 16 tiles and 225-268, direct 137-188).
MIN_TILES = 16


def _heuristic(spec: ConvSpec, target: TargetInfo) -> WinogradKnobs | None:
    """Where the channels make the GEMMs worth their transforms (each input and output
    element is transformed once per C x K multiply-adds of the GEMM): F(4x4), else
    F(2x2) where F(4x4) leaves too few tiles to reuse U. F(6x6), as fast as F(4x4)
    on 56x56 and 28x28 but 4x less accurate, is left to tuning."""
    if not _applies(spec, target) or min(spec.in_channels, spec.out_channels) < 32:
        return None
    for tile in (4, 2):
        if winograd.tiles(spec, tile) >= MIN_TILES:
            return _knobs(spec, target, tile)
    return None


def _grid(spec: ConvSpec, target: TargetInfo) -> Iterator[WinogradKnobs]:
    if not _applies(spec, target):
        return
    lanes = _lanes(spec, target)
    budget = accumulator_budget(target) + 4
    for tile in winograd.TILES:
        yield _knobs(spec, target, tile)  # valid however small the layer
        for nkv in divisors(spec.out_channels // lanes):
            for pt in divisors(winograd.tiles(spec, tile)):
                if nkv <= 8 and pt <= 16 and 6 <= nkv * pt <= budget:
                    yield WinogradKnobs(tile, lanes, nkv, pt)


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
            or winograd.tiles(spec, knobs.tile) % knobs.pt:
        return None
    vec = target.fp32_lanes
    sch = new_schedule(func)
    if has_block(sch, "wino_u"):
        # The plain entry transforms the weights on every call: each (channel vector,
        # input channel) reads its 3x3 taps once and makes all alpha^2 outputs from
        # them in registers (the planes outermost would read the weights alpha^2 times).
        u = sch.get_sblock("wino_u")
        if spec.channels_last:  # OHWI: one pass to [K, C, 3, 3], so each tap block is contiguous
            wc = sch.cache_read(u, 0, "global")
            sch.transform_layout(wc, ("write", 0), lambda k, r, s, c: (k, c, r, s))
            sch.parallel(sch.get_loops(wc)[0])
        e, kb, c, lane, r, s = sch.get_loops(u)
        sch.reorder(kb, c, e, r, s, lane)
        sch.parallel(kb)
        for loop in (e, r, s):
            sch.unroll(loop)
        sch.vectorize(lane)
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
    wb = sch.cache_write(gemm, 0, "local")
    eps, nu, t, k, rc = sch.get_loops(gemm)
    to, ti = sch.split(t, [None, knobs.pt])
    ko, kvo, kvi = sch.split(k, [None, knobs.nkv, knobs.lanes])
    sch.reorder(eps, nu, to, ko, rc, ti, kvo, kvi)
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
    # output transform: per tile and channel vector, columns then rows in registers
    _transform(sch, "wino_y", "wino_at", tile_axis=0, vec=vec)
    # the crop into the output's layout (+ bias)
    out = sch.get_sblock("out")
    loops = sch.get_loops(out)
    sch.parallel(sch.fuse(*loops[:2]))
    _, inner = _vector_split(sch, loops[-1], vec)
    sch.vectorize(inner)
    return sch


TEMPLATE = Template(NAME, WinogradKnobs, _heuristic, _grid, _apply, packing=_packing,
                    algorithm="winograd", prim_func=_prim_func)
