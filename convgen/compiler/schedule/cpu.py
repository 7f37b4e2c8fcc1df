"""CPU (LLVM) schedules.

Templates, tried in order (each applies where its heuristic returns knobs; tuning
also tries a template's grid where its heuristic declines):

  * `cpu_cvec` (channels-last, input channels per group a multiple of the
    vector; by default where the reduction is long): vectorized over the input
    channels, i.e. the reduction, which is contiguous in both the NHWC input and
    the OHWI weights: both are read in storage order, no repack. The register
    tile is pw output pixels x kb output channels, each accumulator a vector of
    partial sums, summed across lanes once per tile (rfactor).
  * `cpu_wvec` (channels-first, unit stride along the row): vectorized over the
    output row: `lanes` outputs x `rows` rows x kb channels, weights broadcast
    from storage order (no repack), the GEMM shape of a 1x1 conv over (H, W);
    with k_inner the channel blocks run inside the spatial tile, so one input
    tile serves every output channel from L1. A row that tiles of `lanes` do not
    cover is widened to whole tiles and cropped in the write-back (a 7-wide row
    runs in 8 lanes); a row of whole half vectors that no other template takes
    (56 wide on 16 lanes, K24) runs half vectors. For depthwise the padded planes
    are produced inside the parallel loop, where they stay in L1.
  * `cpu_kvec`: vectorized over output channels (dense and grouped convs whose
    K/groups is a multiple of the vector, and NHWC depthwise, where the vector
    spans groups). The weights are read as [K/lanes, reduction dims, lanes], so
    each load is one contiguous vector: packed once by `convgen_pack` for a bound
    kernel, repacked inside every call of the plain entry; the register tile is pw
    output pixels x nkv channel vectors, accumulated in registers across the
    whole reduction; NCHW keeps the accumulator channel-innermost and scatters
    once in the write-back. The channel blocks run outside the rows (their
    weights stay in L1 while the rows stream past) or, where every row can reread
    all the weights from cache (depthwise, small 1x1), inside each row, so the
    activations are read and written once in storage order. Depthwise reads its
    zero padding in the loads rather than copying padded planes. A channels-last
    row that no tile of FMA_CHAINS accumulators divides (7 wide, 16 registers) is
    computed wider and cropped in the write-back (`wide`); a windowed layer with its
    blocks outside the rows may instead run each image's pixels as one row (`flat`),
    its tiles across row ends. The unrolled tile's
    order is the one whose live vectors the register file holds (`_pixels_inner`).
Before these, the family tries `cpu_winograd` (`schedule/winograd.py`), another
algorithm for dense 3x3 stride-1 layers (dilated too) with enough channels and tiles.
Every template unrolls small kernel windows, which turns the flipped tap of
`conv` into constant offsets (conv == corr), and unrolls the write-back so the
whole register tile stays in registers. The fallback (`cpu_generic`) works for
every spec. The measurements behind each heuristic are in benchmarks/NOTES.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from convgen.compiler.compute import Variant, WeightPacking, reads_packed_weight
from convgen.compiler.schedule.common import (
    Family,
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
    stack_vectors,
)
from convgen.compiler.targets import TargetInfo
from convgen.spec import ConvSpec

if TYPE_CHECKING:
    from tvm.s_tir import Schedule
    from tvm.tirx import PrimFunc

FALLBACK_NAME = "cpu_generic"
# independent accumulators that keep the FMA pipes busy: 4 cycles of latency x 2 pipes
FMA_CHAINS = 8
# with 16 registers, a windowed layer's reduction of at least this many steps
# (C/groups x taps: the 7x7 stem's 147, C16 3x3's 144; C8 3x3's 72 ran straight-line)
# takes tiles of up to LONG_WINDOW_TILE accumulators (`kvec_heuristic`)
LONG_REDUCTION = 128
LONG_WINDOW_TILE = 12


@dataclass
class _Loops:
    """The conv block's loops by role (independent of layout)."""

    n: Any
    k: Any
    sp: list[Any]  # output spatial loops, outermost first
    rc: Any
    r: list[Any]  # kernel-window loops


def _conv_loops(sch: Schedule, block: Any, spec: ConvSpec, flat: bool = False) -> _Loops:
    d = spec.ndim - flat  # (flat pixels: the last two spatial axes are one)
    loops = sch.get_loops(block)
    if spec.channels_last:
        return _Loops(loops[0], loops[1 + d], list(loops[1 : 1 + d]), loops[2 + d],
                      list(loops[3 + d :]))
    return _Loops(loops[0], loops[1], list(loops[2 : 2 + d]), loops[2 + d], list(loops[3 + d :]))


def _vectorize_inner(sch: Schedule, loop: Any, cap: int = 16) -> None:
    """Vectorize the largest divisor (<= cap) of a loop's extent (no predicated tails)."""
    v = divisor_at_most(int(sch.get(loop).extent), cap)
    if v > 1:
        _, vi = sch.split(loop, [None, v])
        sch.vectorize(vi)


def write_back_at(sch: Schedule, wb: Any, at: Any) -> None:
    """Attach the accumulator's write-back under loop `at`, its loops unrolled and the
    innermost vectorized: with every index constant LLVM keeps the whole tile in
    registers (a rolled write-back leaves it on the stack, stored and reloaded)."""
    sch.reverse_compute_at(wb, at)
    loops = loops_below(sch, wb, at)
    if not loops:  # a tile of one output element (K = 1, one pixel): nothing to unroll
        return
    *outer, inner = loops
    for lp in outer:
        sch.unroll(lp)
    _vectorize_inner(sch, inner)


def unroll_window(sch: Schedule, window: list[Any], spec: ConvSpec) -> None:
    """Unroll the kernel-window loops: conv's flipped tap becomes constant offsets,
    so conv runs the same code as corr. Big windows: the innermost loop only."""
    for r in window if math.prod(spec.kernel_size) <= 32 else window[-1:]:
        sch.unroll(r)


def kvec_lanes(spec: ConvSpec, target: TargetInfo) -> int:
    """Channel-vector width: a whole vector if the channel axis allows, else half of
    one. Depthwise: the vector spans groups, contiguous only in NHWC. An ungrouped
    channels-last layer takes whole vectors, the last one partly past K
    (`channel_pad`), where that adds an eighth of the channels or less, even where
    half a vector divides K: half vectors need twice the loads and broadcasts per
    FMA (SqueezeNet's C512 13x13 1x1 K1000: 0.86 ms against 1.21, Zen 4); or where
    whole vectors compute more lanes a cycle than half ones by more than the padding
    adds (`_whole_vectors_outrun_the_padding`: Zen 5's K24 at 16 lanes). Else half
    a vector, padded if it must be. A depthwise layer pads only where half a vector
    does not divide: its pad stage then copies the input with the extra channels,
    which cost more than the half vectors (MobileNetV3's C72-C232: 0.007-0.055 ms
    against 0.011-0.068 warm). A grouped channels-last layer with a multiple of 4
    output channels per group but not of half a vector: vectors of 4
    (`GROUP_LANES`). 0: none of these."""
    kg, g, vec = spec.out_channels_per_group, spec.groups, target.fp32_lanes
    if spec.depthwise_like and not spec.channels_last:
        return 0
    ext = kg if kg > 1 or spec.channels_per_group > 1 else g
    padded = (g == 1 or spec.depthwise_like) and spec.channels_last
    fits = _at_most_an_eighth(channel_pad(spec, vec), spec.out_channels)
    if ext % vec == 0 and (kg % vec == 0 or kg == 1):
        return vec
    if padded and g == 1 and (fits or _whole_vectors_outrun_the_padding(spec, target)):
        return vec
    if ext % (vec // 2) == 0 and (kg % (vec // 2) == 0 or kg == 1):
        return vec // 2
    if padded:
        return vec if fits else vec // 2
    if spec.channels_last and kg % GROUP_LANES == 0:
        return GROUP_LANES
    return 0


# Grouped channels-last layers whose output channels per group half a vector does not
# divide (ResNeXt-50's first stage: 32 groups of 4) take vectors of 4 channels within
# one group: a quarter of a 512-bit FMA's work, but each lane's input channels stay
# contiguous. Vectors spanning groups gather their inputs (4.72 ms for that layer,
# alone); cpu_generic's scalar code ran it 4.5 ms in the model, 4-lane vectors 0.76,
# onnxruntime 0.9 (Zen 4, benchmarks/NOTES.md).
GROUP_LANES = 4


def _whole_vectors_outrun_the_padding(spec: ConvSpec, target: TargetInfo) -> bool:
    """Whole vectors over K padded to a multiple of them compute the useful channels
    faster than half vectors over K: the lanes a core's FMAs cover per cycle grow by
    more than the padding's share. Where the FMA units are as wide as the vector (Zen 5
    and Xeon Scalable at 512 bits, every AVX2 core at 256) whole vectors issue at the
    same rate as half ones, so they do twice the lanes and pay wherever the padding
    adds less than K again: K24 at 16 lanes pads 8 (1.33x the FMAs at 2x the lanes).
    Where a 512-bit FMA issues as two 256-bit halves (Zen 4) the lanes a cycle are the
    same either way and only the load count decides (`_at_most_an_eighth`). Measured
    on Zen 5: MobileNetV2's 56x56 C144 -> K24 at 8 lanes ran at 98% of the 256-bit
    FMA peak, half the machine's (benchmarks/NOTES.md)."""
    vec, k = target.fp32_lanes, spec.out_channels
    whole, half = target.fma_lanes_per_cycle(vec), target.fma_lanes_per_cycle(vec // 2)
    return (k + channel_pad(spec, vec)) * half < k * whole


def channel_pad(spec: ConvSpec, lanes: int) -> int:
    """Output channels an ungrouped or depthwise layer computes past K, on zero weights
    (a depthwise one on as many zero input channels), so that vectors of `lanes`
    cover K (`Variant.channel_extra`; cropped in the write-back). The alternative is
    cpu_generic's scalar code: ShuffleNet's C116 14x14 1x1 K116 ran 0.35 ms there,
    onnxruntime 0.05 (Zen 4, benchmarks/NOTES.md)."""
    if spec.groups == 1 or spec.depthwise_like:
        return -spec.out_channels % lanes
    return 0


def _channel_vectors(spec: ConvSpec, lanes: int) -> int:
    """Vectors of `lanes` the register tiles block the channel extent into."""
    return -(-_channel_ext(spec) // lanes)


PadAt = Literal["front", "tile", "load"]
"""Where a template produces the zero padding: materialised once before the
convolution, per tile inside its parallel loop, or read in the convolution's own
loads (a select on the tap's position)."""


def _prepare(sch: Schedule, spec: ConvSpec, pad_at: PadAt) -> tuple[Any, Any]:
    """The padding stage, common to the templates. Returns (conv, the pad block, or None
    where there is none left to place)."""
    conv = sch.get_sblock("conv")
    pad = sch.get_sblock("pad") if has_block(sch, "pad") else None
    if pad is None:
        return conv, None
    if pad_at == "front":
        # Dense convs: materialise the padded input once, in parallel (a few % of the
        # run), so no bounds check sits in the FMA loop.
        loops = sch.get_loops(pad)
        sch.parallel(sch.fuse(*loops[:2]))
        _vectorize_inner(sch, loops[-1])
    elif pad_at == "load":
        sch.compute_inline(pad)
        return conv, None
    return conv, pad


def _finish_pad(sch: Schedule, pad: Any, par: Any, pad_at: PadAt) -> None:
    """Few FLOPs per input element: the padded planes are produced inside the tile,
    where they stay in L1 for the taps that reread them."""
    if pad is not None and pad_at == "tile":
        sch.compute_at(pad, par)
        _vectorize_inner(sch, sch.get_loops(pad)[-1])


@dataclass(frozen=True)
class KvecKnobs:
    """Register tile: pw output pixels x nkv vectors of `lanes` output channels.
    k_inner: the channel blocks loop inside each output row (rows in parallel)
    rather than outside all of them (blocks in parallel). wide: the row computed
    this many outputs wider and cropped in the write-back (channels-last), so a
    row no good pixel tile divides takes one (7 wide as 8: 2 x 4 tiles). flat: the
    image's pixels as one row (`Variant.flat_pixels`; `wide` then widens that row),
    the channel blocks outside it."""

    lanes: int
    nkv: int
    pw: int
    k_inner: bool = False
    wide: int = 0
    flat: bool = False


def _channel_ext(spec: ConvSpec) -> int:
    """The channel extent a register tile blocks: K/groups, or for depthwise (one
    output channel per group) the groups themselves."""
    kg = spec.out_channels_per_group
    return kg if kg > 1 else spec.groups


def kvec_heuristic(spec: ConvSpec, target: TargetInfo, widen: bool = True) -> KvecKnobs | None:
    """The tile below (`widen`: also on the row widened to a multiple of 4 or 8 pixels,
    where that loses at most one output in eight)."""
    lanes, vec = kvec_lanes(spec, target), target.fp32_lanes
    if not lanes or (lanes < vec and not spec.channels_last):
        # half vectors pay only for NHWC; NCHW then does better along the row (cpu_wvec)
        return None
    # Per reduction step a tile broadcasts pw inputs and loads nkv weight vectors for
    # pw * nkv FMAs: the squarest tile within the budget needs the fewest loads (ties:
    # two channel vectors). 32 registers hold 16 accumulators, the weight vectors and a
    # broadcast; 16 registers hold 8.
    budget = accumulator_budget(target) + (2 if target.vector_registers >= 32 else 0)
    if spec.weight_bytes > target.l2_bytes:
        # Weights that stream from memory in a model: a tile under the stack limit
        # keeps its accumulators in a stack array and prefetches the weights
        # (`prefetch.py`); 16 vectors of 16 lanes are 1 KB, a workspace allocation.
        # C512 28x28 1x1 K1024 (2 MB), 2 x 7 against 4 x 4: 4.33 / 4.56 ms warm,
        # 4.61 / 4.88 after 64 MB of other traffic (Zen 4, benchmarks/NOTES.md).
        budget = min(budget, stack_vectors(lanes))
    k_inner = _kvec_k_inner(spec, target)
    if spec.depthwise_like and spec.stride[-1] == 1:
        # Depthwise: every input vector feeds a single channel vector, so more channel
        # vectors share no loads; along a stride-1 row the pixels' taps overlap, and
        # the unrolled tile reuses each loaded input vector for several of them. One
        # channel vector by a run of pixels, half the accumulator budget (the taps'
        # inputs take the other registers): 74-82 GFLOP/s on MobileNetV2's depthwise
        # layers against 42-69 for 2 vectors by 4 pixels (Zen 4, benchmarks/NOTES.md).
        # Strided rows share no taps: the dense rule below. A row no such run divides
        # (7 wide, 16 registers) takes up to the whole budget rather than single pixels.
        w = spec.out_size[-1]
        pw = divisor_at_most(w, budget // 2)
        return KvecKnobs(lanes, 1, pw if pw >= 3 else divisor_at_most(w, budget), k_inner)

    w = spec.out_size[-1]
    best = None
    # (8 vectors by 2 pixels scores 1.6 FMAs per load on a 14-wide row, 2 x 7 1.56,
    # but its weight loads come from L2 beside a long reduction and are reused by 2
    # pixels only: ConvNeXt's C1536 14x14 1x1 K384 1.52 ms against 1.08, and never
    # faster on the 14x14 1x1 layers measured, Zen 4, benchmarks/NOTES.md)
    shapes = [2 * vec // lanes, 4 * vec // lanes, vec // lanes]
    dense_budget = budget
    long_tiles = False
    if w == 1:
        # a single pixel (a classifier, a squeeze-excitation gate) reuses no weight
        # vector however the tile is shaped: up to 8 channel vectors, as many chains.
        # Each weight vector then feeds one FMA, which LLVM reads from memory as the
        # FMA's operand, so 16 registers hold them too (8 accumulators, a broadcast).
        # AVX2 code on Zen 4, warm / after 64 MB: the 1000-way classifier (125
        # vectors: 5 x 1) on C1280 0.094 / 0.201 ms against 1 x 1's 0.101 / 0.283,
        # on C2048 0.076 / 0.247 against 0.143 / 0.271 (benchmarks/NOTES.md).
        shapes.append(8 * vec // lanes)
    few_registers = target.vector_registers < 32 and not spec.depthwise_like
    pointwise_blocks_outside = (math.prod(spec.kernel_size) == 1 and not k_inner
                                and _channel_vectors(spec, lanes) % 4 == 0
                                and _shared_evenly(spec, 4 * vec // lanes, lanes, target))
    if few_registers:
        # 16 registers: a tile of fewer than FMA_CHAINS accumulators leaves the FMA
        # pipes idle whatever it saves in loads, so more chains (up to FMA_CHAINS)
        # rank before fewer loads; two channel vectors or one, and two may take 5
        # pixels (10 accumulators in 13 registers). Four vectors by 2 pixels lost
        # when it ran channel vectors inner (LLVM kept a short reduction's weights on
        # the stack across the row's tiles; `_pixels_inner` now runs it the other
        # way), AVX2 code on Zen 4 (benchmarks/NOTES.md), C96 14x14 1x1 K576: 4 x 2
        # 0.178 ms, 2 x 5 on the row widened to 15 0.141; a depthwise-separable
        # pair's 14-wide 1x1 stage (its rows do not widen), C384 -> K96: 4 x 2 0.185,
        # 2 x 2 0.161, 1 x 7 0.126. Rows of 4-pixel tiles (56, 28) keep 2 x 4, as
        # fast as 2 x 5 or 2 x 6 on the row widened to 60 (56x56 1x1 C64 K256: 0.60
        # against 0.68 and 0.68; C256 K64 0.63 against 0.64 and 0.61).
        shapes.remove(4 * vec // lanes)
        dense_budget = budget + 2
        # A window whose reduction runs long may take two channel vectors by 6 pixels
        # (12 accumulators, 2 weight vectors and a broadcast in 15 registers) on a row
        # widened to a multiple of 6: 1.5 FMAs per load against 2 x 4's 1.33. AVX2
        # code on Zen 5, warm (benchmarks/NOTES.md): ResNet's 7x7 stem on 112 -> 114
        # 0.94 ms against 1.07; C64 56x56 3x3 stride 2 K128 on 28 -> 30 0.48 against
        # 0.52; C128 so 0.99 against 1.07. A short reduction runs straight-line (the
        # unrolled taps by a few channels) and lost: C3 3x3 K32 0.150 against 0.114,
        # C8 3x3 K64 0.228 against 0.139.
        long_tiles = long_window(spec) and lanes == vec
        if _channel_vectors(spec, lanes) % 2:
            # An odd count of channel vectors, which two do not divide (K24: 3, K40:
            # 5), would take single vectors by 8 pixels, a broadcast per FMA. Three
            # vectors by 4 pixels, or five by 2, fill the 16 registers (accumulators,
            # a weight vector each, a broadcast) and LLVM keeps them there, AVX2 code
            # on Zen 4 (benchmarks/NOTES.md): MobileNetV2's C96 56x56 1x1 K24 0.083
            # ms against 0.147; EfficientNet's C144 28x28 K40 0.057 against 0.086 (1
            # x 10 on the row widened to 30). Where two divide, 3 x 4 measured
            # within the noise of 2 x 4 (K96-K192).
            shapes += [3 * vec // lanes, 5 * vec // lanes]
        elif pointwise_blocks_outside:
            # A 1x1 layer with its channel blocks outside the rows writes each
            # block's channels of every output pixel (and reads the residual's) at
            # a stride of the whole pixel: 2 vectors are one 64-byte line per pixel,
            # 4 vectors two adjacent ones. 4 x 3, pixels inner (`_pixels_inner`),
            # holds 12 accumulators in 16 registers, its 4 weight vectors for a
            # 1x1 reduction in L1. AVX2 code on Zen 4, warm / after 64 MB of other
            # traffic (benchmarks/NOTES.md): ResNet-50's C128 28x28 K512 with its
            # residual, on the row widened to 30, 0.61 / 0.66 ms against 2 x 4's
            # 0.66 / 0.86; MobileNetV2's C96 14x14 K576 0.119 / 0.143 against 2 x 5's
            # 0.125 / 0.178. Not for windows: the stems and stride-2 3x3 layers ran
            # 20-40% slower at 4 x 3 (their block weights stream from L2, read by 3
            # pixels each rather than 4), nor with the blocks inside the rows, which
            # write whole rows (C16 112x112 K96 within 0.01 ms warm, 10% slower cold).
            # Nor where its blocks leave the cores unevenly loaded: MobileNetV2's 7x7
            # 1x1 K160 layers on one merged row of 49 (`rows_to_merge`) have 5 blocks
            # of 4 vectors, 10 of 2; C960 -> K160 with its residual (AVX2 code on Zen
            # 5, warm / after 64 MB), 2 x 5 on 50
            # 0.062-0.066 / 0.070-0.080 ms against 4 x 3 on 51's 0.070-0.073 / 0.081-0.087
            # and 2 x 4 on rows of 7 widened to 8, 0.077 / 0.095 (benchmarks/NOTES.md).
            shapes.append(4 * vec // lanes)

    # A row no tile of FMA_CHAINS accumulators divides is widened where that helps:
    # with 16 registers a 7-wide row (ResNet-50's last stage) takes only 1 x 7 (7
    # chains, 0.875 FMAs per load) or single pixels, and widened to 8 it takes 2 x 4
    # (1.33). Inside ResNet-50 (AVX2 code, on Zen 4) its 7x7 1x1 layers ran 0.87-0.92
    # ms against 1.00-1.10, the stride-2 C512 3x3 1.78-1.80 against 2.06-2.28. With
    # 32 registers 2 x 7 keeps 14 chains and won: 0.56-0.70 ms against 0.69-0.78
    # widened to 4 x 4. An unpadded row is widened in place (`Variant.clamp_row`:
    # the padded copy of the input it would need cost AVX2 code's C2048 7x7 1x1 K512
    # 0.78 ms against 0.64, C1024 14x14 K256 0.57 against 0.50); a padded layer's
    # copy, which exists anyway, only grows by the extra columns.
    # A tile of single pixels loads each weight vector for one FMA: beside a long
    # reduction (C288 3x3 stride 2, 1.3 MB per block of 8 vectors) those loads come
    # from L2 and the layer ran 6.96 ms at 8 x 1 against 2.96 at 2 x 6 on its row
    # widened from 17 to 18 (Zen 4). So it never ends the search, however many chains.
    def pixels_max(nkv: int) -> int:
        """The widest tile of nkv channel vectors the rules above allow."""
        if long_tiles and nkv == 2:
            return LONG_WINDOW_TILE // nkv
        if few_registers and nkv > 2:
            return _pixels_max(nkv, target)
        return max(1, dense_budget // nkv)

    widths = [0, *_kvec_widenings(spec)] if widen else [0]
    for extra in widths:
        # (with 16 registers a single channel vector does not end it either: two by 5
        # on a widened row won where widening was allowed, C96 14x14 K576 0.141 ms
        # against 1 x 7's 0.176)
        # (nor, for a layer that may take 4 x 3, a tile on the unwidened row)
        if (best is not None and best.nkv * best.pw >= FMA_CHAINS and best.pw > 1
                and not (few_registers and (best.nkv * best.lanes == vec
                                            or pointwise_blocks_outside
                                            or (long_tiles and best.nkv * best.pw
                                                < LONG_WINDOW_TILE)))):
            break
        for nkv in shapes:
            nkv = divisor_at_most(_channel_vectors(spec, lanes), nkv)
            pw_max = pixels_max(nkv)
            pw = divisor_at_most(w + extra, pw_max)
            if few_registers and nkv * lanes == 4 * vec and 1 < pw < pw_max:
                # 4 x 3 only: a depthwise-separable pair's 14-wide 1x1 stage at 4 x 2
                # (pixels inner) took MobileNetV2 for znver3 to 5.27 / 5.31 ms against
                # 1 x 7's 5.07 / 5.00 (benchmarks/NOTES.md)
                continue
            tile = KvecKnobs(lanes, nkv, pw, wide=extra)
            if best is None or _tile_rank(spec, tile, target) > _tile_rank(spec, best, target):
                best = tile
    assert best is not None
    if widen and few_registers and not k_inner and _flat_applies(spec):
        # The image's pixels as one row (`KvecKnobs.flat`), so the tile runs across
        # row ends: nothing widened but the image's last tile. With 16 registers the
        # rows of the late stages are narrow for 2 x 6 or 2 x 5: AVX2 code on Zen 5,
        # warm (benchmarks/NOTES.md), C512 14x14 3x3 stride 2 (7-wide rows) 2 x 4 on 8
        # 1.24 ms, 2 x 5 on the flat 50 1.01; C256 28x28 stride 2 2 x 5 on 15 1.16,
        # 2 x 6 on 198 1.01; C128 56x56 stride 2 2 x 6 on 30 0.98, flat 0.92.
        for nkv in shapes:
            nkv = divisor_at_most(_channel_vectors(spec, lanes), nkv)
            for pw in range(pixels_max(nkv), 1, -1):
                tile = KvecKnobs(lanes, nkv, pw, wide=_flat_extra(spec, pw), flat=True)
                if _flat_fits(spec, tile) and (
                        _tile_rank(spec, tile, target) > _tile_rank(spec, best, target)):
                    best = tile
    return dataclasses.replace(best, k_inner=k_inner)


def _flat_applies(spec: ConvSpec) -> bool:
    """The layers `kvec_heuristic` may run on flat pixels: dense, channels-last, a
    window or a stride (a pointwise layer's rows merge instead, `rows_to_merge`)."""
    return (spec.channels_last and spec.ndim >= 2 and spec.groups == 1
            and not spec.pointwise)


def _flat_pixels(spec: ConvSpec) -> int:
    """Output pixels of an image's last two spatial axes: the flat row's length."""
    return math.prod(spec.out_size[-2:])


def _flat_extra(spec: ConvSpec, pw: int) -> int:
    """The pixels a flat row of pw-pixel tiles computes past the image's."""
    return -_flat_pixels(spec) % pw


def long_window(spec: ConvSpec) -> bool:
    """A dense layer with a kernel window and at least LONG_REDUCTION multiply-adds per
    output: its reduction stays a loop, which 12 accumulators leave registers for."""
    return (math.prod(spec.kernel_size) > 1 and not spec.depthwise_like
            and spec.gemm_shape[2] >= LONG_REDUCTION)


def _tile_rank(spec: ConvSpec, k: KvecKnobs, target: TargetInfo) -> tuple[int, float]:
    """How `kvec_heuristic` ranks dense tiles: with 16 registers the FMA chains first
    (up to FMA_CHAINS), then the FMAs per load (a broadcast or a weight vector) that
    compute outputs kept (the widened row's extra outputs are FMAs thrown away)."""
    chains = (min(k.nkv * k.pw, FMA_CHAINS)
              if target.vector_registers < 32 and not spec.depthwise_like else 0)
    w = _flat_pixels(spec) if k.flat else spec.out_size[-1]
    return chains, k.nkv * k.pw / (k.nkv + k.pw) * w / (w + k.wide)


def rows_to_merge(spec: ConvSpec, target: TargetInfo) -> int:
    """How many output rows a pointwise layer's kernel runs as one row
    (`ConvSpec.rows_merged`; 1: none), for a caller that can view its tensors so
    (`deploy`). A row that the best tile does not divide is widened, and its extra
    outputs are FMAs thrown away: with 16 registers 4 x 3 widens ResNet-50's 28- and
    14-wide rows to 30 and 15 (6.7% of the FMAs), a 7-wide row takes 2 x 4 widened
    to 8 (12.5%). Merged, the rows run 4 x 3 across their ends, and only the merged
    row's end is widened: 196 pixels to 198, 49 to 51. The fewest rows within 1% of
    the best tile's rank, keeping the parallel loop's iterations (channel blocks times
    merged rows) at least four per core or a multiple of the cores: MobileNetV2's
    14x14 1x1 layers to K64 and K96 as 2 rows of 98 (2 and 3 blocks, 4 and 6 tasks on
    2 cores) ran 2-7% faster than on rows of 14 widened to 15 (AVX2 code on Zen 4,
    `scripts/ab_layers.py` both ways round); its 7x7 K160 layers as one row of 49 in
    10 blocks of 2 vectors (2 x 5 on 50), as 5 blocks of 4 would leave a core idle for
    a fifth of the time. Only where the layer's own tile
    widens its rows (32 registers: 2 x 7 on 7, 14, 28 and 56, nothing thrown away),
    and only for tiles with the channel blocks outside the rows, where each block
    streams every row past its weights anyway (inside, a longer row rereads all the
    weights less often but gives the cores fewer rows to share)."""
    if not spec.pointwise or not spec.channels_last or spec.ndim < 2:
        return 1
    base = kvec_heuristic(spec, target)
    if base is None or base.k_inner or not base.wide:
        return 1
    ranked = []
    for rows in divisors(spec.out_size[-2]):
        merged = spec.rows_merged(rows)
        k = kvec_heuristic(merged, target)
        if k is None or k.k_inner:
            continue
        if rows > 1 and not _shared_evenly(merged, k.nkv, k.lanes, target):
            continue
        ranked.append((rows, _tile_rank(merged, k, target)))
    chains = max(r[0] for _, r in ranked)
    best = max(r[1] for _, r in ranked if r[0] == chains)
    return next(rows for rows, r in ranked if r[0] == chains and r[1] >= 0.99 * best)


def _shared_evenly(spec: ConvSpec, nkv: int, lanes: int, target: TargetInfo) -> bool:
    """Whether the parallel loop of a tile of nkv channel vectors with its blocks
    outside the rows (blocks times rows of output pixels) shares among the cores with
    little idle time: at least four iterations per core, or a multiple of the cores."""
    tasks = _channel_vectors(spec, lanes) // nkv * _output_rows(spec)
    return tasks >= 4 * target.num_cores or tasks % target.num_cores == 0


def _pixels_inner(spec: ConvSpec, nkv: int, pw: int, target: TargetInfo) -> bool:
    """The order of a dense tile's unrolled FMAs in each reduction step. Channel
    vectors inner (per pixel, one broadcast feeds an FMA with each weight vector): the
    tile holds its nkv * pw accumulators, the nkv weight vectors (LLVM loads each once
    and keeps it for every pixel) and a broadcast. Pixels inner (per weight vector, an
    FMA with each pixel's broadcast): the accumulators, pw broadcasts and one weight
    vector. With 16 registers the shorter of the two goes inner: 4 x 3 holds 12 + 3 +
    1 with pixels inner, 12 + 4 + 1 the other way, where LLVM spilled accumulators in
    the reduction loop (ResNet-50's C128 28x28 1x1 K512, AVX2 code on Zen 4, pixels
    inner against channel vectors inner: 0.61 ms against 1.21; 4 x 2 0.78 against
    1.99; 5 x 2, K40 on C144 28x28, 0.076 against 0.082 after 64 MB of other
    traffic). 32 registers hold either order.
    (Depthwise loads input vectors, not broadcasts: its order stays.)"""
    return (target.vector_registers < 32 and not spec.depthwise_like and 1 < pw < nkv)


def _pixels_max(nkv: int, target: TargetInfo) -> int:
    """The widest tile of nkv channel vectors the register file holds (a weight vector
    or broadcast beside the accumulators; in either order, `_pixels_inner`)."""
    regs = target.vector_registers - 1
    vectors_inner = (regs - nkv) // nkv
    pixels_inner = min(regs // (nkv + 1), nkv - 1)
    return max(1, vectors_inner, pixels_inner)


def _kvec_widenings(spec: ConvSpec) -> list[int]:
    """Outputs a channels-last dense row may be widened by: to a multiple of any tile
    width up to 16, losing at most one output in eight (as `cpu_wvec` widens rows to
    whole vectors). A prime row has no tile but single pixels otherwise: Inception-v3's
    17-wide 1x7 layers ran 8 channel vectors by 1 pixel, one broadcast per 8 FMAs,
    where 18 takes 4 by 3 (benchmarks/NOTES.md)."""
    if not spec.channels_last or spec.depthwise_like:
        return []
    return sorted({e for e in (row_extra(spec, p) for p in range(2, 17))
                   if e and _wastes_little(spec, e)})


def _output_rows(spec: ConvSpec) -> int:
    """Rows of output pixels (every spatial axis but the last, times the batch)."""
    return spec.batch * math.prod(spec.out_size[:-1])


def _kvec_k_inner(spec: ConvSpec, target: TargetInfo) -> bool:
    """Blocks outside the rows keep one block's weights in L1 while every row streams
    past them, which suits weights too big to stay in cache whole; but each block then
    reads the activations in strided pieces (a block's channels of every pixel), and
    writes the output so, one block at a time. Where every row can reread all the
    weights from cache (depthwise; dense layers with weights within a sixteenth of L2,
    such as a mobile network's small 1x1 layers: at 98 and 221 KB, 1x1 layers on 14x14
    lost 4-7%), the blocks run inside each row instead: the activations stream through
    once, in storage order (on MobileNetV2's C24 56x56 1x1 and C144 3x3 depthwise
    layers, one after the other: 10-20% less time, benchmarks/NOTES.md). The rows are
    then what the threads share, so there must be at least two per core (depthwise
    C960 7x7, 7 rows on 2 cores: 62 GFLOP/s against 30 with the blocks outside).

    Also a dense layer of fewer input channels than a vector, whatever its weights:
    with the blocks outside the rows, each block pads its own copy of every input
    row it reads (`_kvec_pad_at`). The 3-channel 7x7 stem (36 KB of weights, past a
    sixteenth of a 512 KB L2), AVX2 code, 2 x 4, warm / after 64 MB of other
    traffic: 1.79 / 1.94 ms outside, 1.57 / 1.68 inside (Zen 4, benchmarks/NOTES.md)."""
    return _k_inner_fits(spec, target) and (
        spec.depthwise_like or spec.weight_bytes <= target.l2_bytes // 16
        or (spec.groups == 1 and spec.in_channels < target.fp32_lanes))


def _k_inner_fits(spec: ConvSpec, target: TargetInfo) -> bool:
    """Where the blocks may run inside the rows at all (the grid tries both there):
    channels-last (channels-first reads every input channel per block either way),
    weights that rows can reread from L2, two rows per core. Tuning times a layer
    warm, its weights in L3 from the previous call; a model calls it after the other
    layers, so rows rereading weights larger than L2 would wait on memory there
    (MobileNetV2's C320 7x7 1x1 K1280, 1.6 MB: tuned at 166 GFLOP/s, 109 in the
    model). Weights of L2's size still gain: ResNet-50's C256 14x14 K1024 (1 MB,
    with its residual) ran 221 GFLOP/s with the blocks inside the rows against
    162-181 outside, and the model 35.7 ms against 37.0 with it and C1024 K256 so."""
    return (spec.channels_last and spec.weight_bytes <= target.l2_bytes
            and _output_rows(spec) >= 2 * target.num_cores)


def _kvec_grid(spec: ConvSpec, target: TargetInfo) -> Iterator[KvecKnobs]:
    default = kvec_heuristic(spec, target)
    if default is None:
        return
    budget = accumulator_budget(target) + 4  # the tuner may try slightly larger tiles
    inner = [False, True] if _k_inner_fits(spec, target) else [False]
    for extra in [0, *_kvec_widenings(spec)]:
        for nkv in divisors(_channel_vectors(spec, default.lanes)):
            for pw in divisors(spec.out_size[-1] + extra):
                if nkv <= 8 and pw <= 16 and nkv * pw <= budget and (not extra or pw > 1):
                    for k_inner in inner:
                        yield KvecKnobs(default.lanes, nkv, pw, k_inner, extra)
    if _flat_applies(spec):
        for nkv in divisors(_channel_vectors(spec, default.lanes)):
            for pw in range(2, min(16, budget // nkv) + 1):
                flat = KvecKnobs(default.lanes, nkv, pw, wide=_flat_extra(spec, pw), flat=True)
                if nkv <= 8 and _flat_fits(spec, flat):
                    yield flat


def kvec_schedule(func: PrimFunc, spec: ConvSpec, target: TargetInfo,
                  knobs: KvecKnobs, prefetch: bool = True) -> Schedule | None:
    """The `cpu_kvec` tile; without `prefetch`, for a schedule that goes on to schedule
    more blocks: it then adds the weights' prefetch itself, last (`kvec_prefetch`)."""
    if knobs.flat:
        if not _flat_fits(spec, knobs):
            return None
    elif knobs.wide and knobs.wide not in _kvec_widenings(spec):
        return None
    cropped = knobs.wide or channel_pad(spec, knobs.lanes)
    sch = new_schedule(func)
    pad_at = _kvec_pad_at(spec, target, knobs)
    conv, pad = _prepare(sch, spec, pad_at)
    lanes, nkv, pw = knobs.lanes, knobs.nkv, knobs.pw
    # Weights in [K/lanes, reduction dims, lanes] (`_kvec_packing`): one contiguous
    # vector load per (k-vector, c, r) instead of a lanes-way gather. Packed once by
    # `convgen_pack` for the run-packed entry; the plain entry repacks on every call.
    if not reads_packed_weight(func):
        wc = sch.cache_read(conv, 1, "global")
        sch.transform_layout(wc, ("write", 0), lambda k, *rest: (k // lanes, *rest, k % lanes))
        sch.parallel(sch.get_loops(wc)[0])
        if has_block(sch, "weight_pad"):  # the zero channels, made in the same repack
            sch.compute_inline(sch.get_sblock("weight_pad"))
    # the accumulators: pw x nkv vectors (`prefetch.accumulator_scope`)
    acc_scope = accumulator_scope(_kvec_tile_bytes(knobs))
    unflatten = None
    if knobs.flat:
        # a tile of the flat row spans rows of the output, a region no loop nest of
        # the output's writes: the tile is written back to the flat accumulator, and
        # "out" (the unflattening crop + the epilogue) is a pass of its own over the
        # output, paid for in every flat layer measured (benchmarks/NOTES.md)
        wb = sch.cache_write(conv, 0, acc_scope)
        unflatten = sch.get_sblock("out")
    elif cropped:
        # the crop of the widened row or channels (+ the epilogue) is the write-back,
        # as in cpu_wvec
        sch.set_scope(conv, 0, acc_scope)
        wb = sch.get_sblock("out")
    else:
        wb = sch.cache_write(conv, 0, acc_scope)
    if not spec.channels_last:
        # keep the accumulator channel-innermost; the NCHW scatter happens in the write-back
        sch.transform_layout(conv, ("write", 0), lambda n, k, *s: (n, *s, k))
    if has_block(sch, "out") and not cropped and unflatten is None:
        sch.reverse_compute_inline(sch.get_sblock("out"))  # bias/cast in the write-back
    loops = _conv_loops(sch, conv, spec, knobs.flat)
    g = spec.groups
    if spec.out_channels_per_group > 1:
        # split at the group boundary first, so k // Kg becomes the group loop and the
        # input channel index stays affine in the vector lane
        grp, ko, kvo, kvi = sch.split(loops.k, [g, None, nkv, lanes])
        kouter = [grp, ko]
    else:
        ko, kvo, kvi = sch.split(loops.k, [None, nkv, lanes])
        kouter = [ko]
    owo, owi = sch.split(loops.sp[-1], [None, pw])
    # NCHW: rc outermost (one input plane at a time); NHWC: rc innermost (contiguous).
    # The k-block sits outside the pixel loops so its weights stay in cache.
    red = [loops.rc, *loops.r] if not spec.channels_last else [*loops.r, loops.rc]
    if knobs.k_inner:
        sch.reorder(loops.n, *loops.sp[:-1], *kouter, owo, *red, owi, kvo, kvi)
        par = sch.fuse(loops.n, *loops.sp[:-1])
    else:
        sch.reorder(loops.n, *kouter, *loops.sp[:-1], owo, *red, owi, kvo, kvi)
        par = sch.fuse(loops.n, *kouter, *loops.sp[:-1])
    sch.parallel(par)
    if _pixels_inner(spec, nkv, pw, target):
        sch.reorder(kvo, owi)
    sch.unroll(owi)
    sch.unroll(kvo)
    sch.vectorize(kvi)
    unroll_window(sch, loops.r, spec)
    write_back_at(sch, wb, owo)
    init = sch.decompose_reduction(conv, red[0])
    sch.vectorize(sch.get_loops(init)[-1])
    if unflatten is not None:
        *rows, last = sch.get_loops(unflatten)
        sch.parallel(sch.fuse(*rows[:-1]))
        _vectorize_inner(sch, last, target.fp32_lanes)
    _finish_pad(sch, pad, par, pad_at)  # (in the tile only with the blocks outside rows)
    return kvec_prefetch(sch, conv, spec, target, knobs) if prefetch else sch


def kvec_prefetch(sch: Schedule, update: Any, spec: ConvSpec, target: TargetInfo,
                  knobs: KvecKnobs) -> Schedule:
    """The weights' prefetch (`prefetch.prefetch_weights`) of a `cpu_kvec` tile whose
    reduction block is `update`: the last step of any schedule it is part of. The
    prefetch is added to the scheduled function, which comes back in a schedule built
    afresh; that fresh analysis cannot prove that a cropped write-back (K padded to
    whole vectors) inside a loop over several channel blocks reads only what the tile
    wrote, so it no longer calls the scope a stage pipeline, and compute_at and
    compute_inline refuse to run in it (a fused pair of K24 in two 16-lane blocks)."""
    # with the blocks outside the rows, each block's rows (consecutive parallel
    # iterations) read the same weights
    rows = 0 if knobs.k_inner else math.prod(spec.out_size[:-2 if knobs.flat else -1])
    return prefetch_weights(sch, update, _kvec_tile_bytes(knobs), target, group=rows)


def _kvec_tile_bytes(knobs: KvecKnobs) -> int:
    """The tile's accumulators: pw x nkv vectors (`prefetch.accumulator_scope`)."""
    return accumulator_bytes(knobs.pw * knobs.nkv, knobs.lanes)


def _flat_fits(spec: ConvSpec, knobs: KvecKnobs) -> bool:
    """Whether a tile may run on the image's pixels as one row (`KvecKnobs.flat`):
    channels-last, two or more spatial axes, the channel blocks outside the rows (the
    rows are no longer what the cores share), and a widening that wastes little."""
    pixels = _flat_pixels(spec)
    return (spec.channels_last and spec.ndim >= 2 and not knobs.k_inner
            and (pixels + knobs.wide) % knobs.pw == 0 and knobs.wide < knobs.pw
            and _at_most_an_eighth(knobs.wide, pixels))


# A grouped layer's block reads its group's channels of each pixel: a slice of at
# most this many cache lines, the pixels a whole pixel's channels apart (2 KB at
# C512), copied per block in the tile. Read in place, ResNeXt-50's 32 groups of 16
# and 32 (AVX-512 tiles 1 x 14 and 2 x 7) ran 0.24 and 0.15 ms, copied 0.095 and
# 0.074. The likely cause (not measured with counters): addresses 4 KB apart share
# L1 sets, and a tile of 14 pixels reads 14 lines of the same few sets per step.
# 4 groups of 64 (4 lines) ran as fast either way, 2 groups of 128 (8 lines) 0.93
# in place against 1.00 copied (Zen 5, benchmarks/NOTES.md).
GROUP_SLICE_LINES = 2


def _kvec_pad_at(spec: ConvSpec, target: TargetInfo, knobs: KvecKnobs) -> PadAt:
    """Depthwise: each input vector feeds only its own taps' FMAs, so copying padded
    planes, even into L1, costs as much as the convolution. The loads read the padding
    instead: a select on the tap pixel's position, one scalar test for the whole
    channel vector, outside any reduction (the taps are unrolled and there is one
    input channel). MobileNetV2's C144 56x56: 0.083 ms against 0.132 with planes
    padded in the tile; C96 112x112 stride 2: 0.111 against 0.217 (Zen 4,
    benchmarks/NOTES.md). Several input channels per group put that test inside the
    reduction (16 groups of 8: 1.25 ms against 0.99 padded in the tile; dense C128
    56x56 stride 2: 1.60 against 1.13 padded up front). Padded in the tile, each
    channel block copies its own channels of the rows it reads, once per output row:
    worth it where the blocks run outside the rows and each would otherwise read a
    strided slice of every pixel (16 groups of 8: 0.50 ms against 0.55 up front;
    `GROUP_SLICE_LINES`), and for a dense layer with the blocks inside the rows whose
    rows are copied at most twice (`_input_row_copies`); otherwise up front (the
    3-channel stem, one block: 1.13 against 1.19; 16 groups of 8 with the blocks
    inside the rows: 0.36 against 0.39)."""
    if spec.depthwise_like:
        # (zero input channels past C: a padded copy, as loads past C would leave the
        # tensor at its last pixel)
        return "front" if channel_pad(spec, knobs.lanes) else "load"
    blocks = _channel_vectors(spec, knobs.lanes) // knobs.nkv
    if not knobs.k_inner and (
            (spec.channels_per_group < target.fp32_lanes and blocks > 1)
            or (spec.groups > 1 and spec.channels_per_group * spec.element_bytes
                <= GROUP_SLICE_LINES * target.cache_line_bytes)):
        return "tile"
    if knobs.k_inner and spec.groups == 1 and spec.in_channels >= target.fp32_lanes \
            and _input_row_copies(spec) <= 2:
        return "tile"
    return "front"


def _input_row_copies(spec: ConvSpec) -> int:
    """How many output rows' padded windows hold each input row (at least once):
    the copies padding in the tile makes when each output row pads its own.

    Padded up front, a dense layer's whole input is copied in a pass of its own
    before any FMA, and in a model that pass reads the input from L3 or memory
    with nothing to overlap it; padded per output row (blocks inside the rows) the
    copy of a few rows interleaves with the FMAs that read them, from L2. At stride
    2 a 3x3 window's rows are copied twice: ResNet-50's C128 56x56 3x3 stride 2
    (1 x 14), after 64 MB of other traffic, 1.31-1.33 -> 1.22-1.25 ms, as fast warm;
    at stride 1 (3 copies) 2% faster cold and 1-3% slower warm, and the 3-channel
    7x7 stem (4 copies of 3-channel rows) 1.34 -> 1.40 (Zen 4, benchmarks/NOTES.md)."""
    return math.prod(-(-extent // stride) for extent, stride in
                     zip(spec.dilated_kernel_size[:-1], spec.stride[:-1], strict=True))


def _kvec_packing(spec: ConvSpec, target: TargetInfo, knobs: KvecKnobs) -> WeightPacking:
    return WeightPacking(knobs.lanes)


@dataclass(frozen=True)
class WvecKnobs:
    """Register tile: `lanes` outputs along the row x `rows` rows x kb channels,
    weights broadcast from storage order (no repack). k_inner puts the channel
    blocks inside the spatial tile loop, so one input tile serves every output
    channel from L1."""

    lanes: int
    kb: int
    rows: int = 1
    k_inner: bool = False


def _wvec_applies(spec: ConvSpec) -> bool:
    return not spec.channels_last and spec.stride[-1] == 1 and spec.out_size[-1] >= 4


def _wvec_tile(knobs: WvecKnobs, target: TargetInfo) -> int:
    """Accumulator registers of a tile."""
    return knobs.kb * knobs.rows * -(-knobs.lanes // target.fp32_lanes)


def _row_choices(spec: ConvSpec) -> list[int]:
    return [r for r in divisors(spec.out_size[-2]) if r <= 8] if spec.ndim >= 2 else [1]


def _at_most_an_eighth(extra: int, kept: int) -> bool:
    """Whether `extra` outputs computed beside `kept` useful ones, to fill whole tiles
    or vectors, are at most one in eight of all."""
    return 7 * extra <= kept


def _wastes_little(spec: ConvSpec, extra: int) -> bool:
    """A row widened by `extra` outputs loses at most one output in eight."""
    return _at_most_an_eighth(extra, spec.out_size[-1])


def row_extra(spec: ConvSpec, lanes: int) -> int:
    """Outputs the row is widened by so that tiles of `lanes` cover it."""
    return -spec.out_size[-1] % lanes


def _row_vector_choices(spec: ConvSpec, target: TargetInfo) -> list[int]:
    """Tile widths along the row: its divisors, and whole vectors where the row is
    widened to fit them, wasting at most one lane in eight."""
    w, vec = spec.out_size[-1], target.fp32_lanes
    widened = [v for v in (vec, 2 * vec, 4 * vec) if _wastes_little(spec, row_extra(spec, v))]
    return sorted(set(divisors(w)) | set(widened))


def _wvec_variant(spec: ConvSpec, knobs: WvecKnobs) -> Variant:
    """Weights are broadcast from memory, so conv flips them, not the input tap (the
    input loads then come in corr's order, and so does LLVM's register allocation),
    and the row is widened to whole tiles."""
    return Variant(flip_weight=True, row_extra=row_extra(spec, knobs.lanes))


def _wvec_knobs(spec: ConvSpec, target: TargetInfo) -> WvecKnobs | None:
    if not _wvec_applies(spec):
        return None
    ext, vec = _channel_ext(spec), target.fp32_lanes
    if spec.depthwise_like:
        # Depthwise: each input vector feeds one channel's taps, so go wide along the
        # row (up to 4 vectors) and keep a few channels, within 8 accumulators.
        lanes = divisor_at_most(spec.out_size[-1], 4 * vec)
        return WvecKnobs(lanes, divisor_at_most(ext, max(1, 8 // -(-lanes // vec))))
    # Dense: one vector of the row x rows x kb channels. Rows that whole vectors do
    # not cover are left to cpu_kvec, unless a short row and few output pixels per
    # weight make cpu_kvec's per-call weight repack the larger cost (C512 7x7: the
    # 7-wide row runs widened to 8 lanes, `_wvec_variant`).
    w = spec.out_size[-1]
    kvec_takes_it = kvec_heuristic(spec, target) is not None
    lanes = vec
    if w % vec and w % (vec // 2) == 0 and not kvec_takes_it:
        # Rows of whole half vectors (56 wide, 16 lanes) where no other template takes
        # the layer (K24: no whole vector of output channels) run half vectors rather
        # than the generic fallback: MobileNetV2's C96 56x56 1x1 K24, AVX-512, 0.12 ms
        # warm / 0.18 after 64 MB against 0.42 / 0.47 (benchmarks/NOTES.md).
        lanes = vec // 2
    if w % lanes and not (w < vec and math.prod(spec.out_size) < 128):
        return None
    if not any(spec.pads) and kvec_takes_it:
        # Unpadded, the row vectors load straight from the caller's array, and numpy
        # starts its arrays 16 or 48 bytes past a cache line: every other 32-byte load
        # (every 64-byte one) then straddles two lines. cpu_kvec broadcasts its inputs,
        # scalars, and does not care. `k(x)` on such arrays, ms, cpu_wvec at 0 / 16 /
        # 48 bytes against cpu_kvec at 16 / 48: AVX2 code (znver3 heuristics, on Zen 4)
        # C256 56x56 1x1 K64 0.83 / 1.09 / 1.01 against 0.68 / 0.76, C64 K256 0.70 /
        # 0.93 / 0.91 against 0.80 / 0.76; AVX-512, C256 64x64 K64 0.71 / 0.88 / 0.90
        # against 0.81 / 0.81, C64 112x112 K128 1.17 / 1.68 / 1.57 against 1.43 / 1.46
        # (benchmarks/NOTES.md). Padded layers read the kernel's own padded copy.
        return None
    # Per reduction step a tile loads `rows` vectors and broadcasts kb weights for
    # rows * kb FMAs: the squarest tile within the budget needs the fewest loads.
    budget = accumulator_budget(target) + 2

    def fmas_per_load(k: WvecKnobs) -> tuple[float, int]:
        return k.kb * k.rows / (k.kb + k.rows), k.kb * k.rows

    best = WvecKnobs(lanes, 1)
    for rows in _row_choices(spec):
        tile = WvecKnobs(lanes, divisor_at_most(ext, max(1, budget // rows)), rows)
        if fmas_per_load(tile) > fmas_per_load(best):
            best = tile
    # k_inner (one input tile serves every channel block from L1) needs enough
    # spatial tiles to share out among the cores; else the channel blocks do that
    spatial_tiles = _output_rows(spec) // best.rows
    return dataclasses.replace(best, k_inner=spatial_tiles >= 4 * target.num_cores)


def _wvec_grid(spec: ConvSpec, target: TargetInfo) -> Iterator[WvecKnobs]:
    if not _wvec_applies(spec):
        return
    budget, vec = accumulator_budget(target) + 4, target.fp32_lanes
    for lanes in _row_vector_choices(spec, target):
        for rows in _row_choices(spec):
            for kb in divisors(_channel_ext(spec)):
                for k_inner in (False, True):
                    k = WvecKnobs(lanes, kb, rows, k_inner)
                    # fewer than 6 accumulators cannot cover the FMA latency;
                    # several rows pay with one vector per row (more spilled)
                    if (4 <= lanes <= 4 * vec and kb <= 16
                            and 6 <= _wvec_tile(k, target) <= budget
                            and (rows == 1 or (lanes <= vec and kb <= 8))):
                        yield k


def _wvec(func: PrimFunc, spec: ConvSpec, target: TargetInfo, knobs: WvecKnobs) -> Schedule | None:
    if knobs.rows > 1 and (spec.ndim < 2 or spec.out_size[-2] % knobs.rows):
        return None
    sch = new_schedule(func)
    # Few FLOPs per input element (depthwise): produce the padded planes in the tile,
    # where they stay in L1. Dense: pad once up front (per channel block, every block
    # would pad the same planes again). With k_inner a tile spans every channel: up
    # front too.
    pad_at: PadAt = ("tile" if spec.channels_per_group < target.fp32_lanes
                     and not knobs.k_inner else "front")
    conv, pad = _prepare(sch, spec, pad_at)
    if has_block(sch, "out"):  # the epilogue (and the crop of a widened row) writes back
        sch.set_scope(conv, 0, "local")
        wb = sch.get_sblock("out")
    else:
        wb = sch.cache_write(conv, 0, "local")
    loops = _conv_loops(sch, conv, spec)
    if spec.out_channels_per_group > 1:
        grp, ko, kb_l = sch.split(loops.k, [spec.groups, None, knobs.kb])
        kouter = [grp, ko]
    else:
        ko, kb_l = sch.split(loops.k, [None, knobs.kb])
        kouter = [ko]
    outer_sp, row_l = loops.sp[:-1], []
    if knobs.rows > 1:
        ho, hi = sch.split(loops.sp[-2], [None, knobs.rows])
        outer_sp, row_l = [*loops.sp[:-2], ho], [hi]
    owo, vl = sch.split(loops.sp[-1], [None, knobs.lanes])
    red = [loops.rc, *loops.r]
    if knobs.k_inner:
        sch.reorder(loops.n, *outer_sp, owo, *kouter, *red, kb_l, *row_l, vl)
        par, wb_at = sch.fuse(loops.n, *outer_sp), kouter[-1]
    else:
        sch.reorder(loops.n, *kouter, *outer_sp, owo, *red, kb_l, *row_l, vl)
        par, wb_at = sch.fuse(loops.n, *kouter), owo  # padded planes of a block made here
    sch.parallel(par)
    for loop in (kb_l, *row_l):
        sch.unroll(loop)
    sch.vectorize(vl)
    unroll_window(sch, loops.r, spec)
    write_back_at(sch, wb, wb_at)
    init = sch.decompose_reduction(conv, loops.rc)
    sch.vectorize(sch.get_loops(init)[-1])
    _finish_pad(sch, pad, par, pad_at)
    return sch


@dataclass(frozen=True)
class CvecKnobs:
    """Register tile: pw output pixels x kb output channels, each accumulator a vector
    of `lanes` partial sums over input channels (summed across lanes at the end)."""

    lanes: int
    kb: int
    pw: int


def _cvec_applies(spec: ConvSpec, target: TargetInfo) -> bool:
    return spec.channels_last and spec.channels_per_group % target.fp32_lanes == 0


def _cvec_knobs(spec: ConvSpec, target: TargetInfo) -> CvecKnobs | None:
    # Channels-last input and OHWI weights are both contiguous along the input
    # channels, so vectorizing the reduction reads both in storage order, without
    # a weight repack; but each tile ends in cross-lane sums. Since weights are
    # packed once (`bind`, deployed models), cpu_kvec reads them blocked by its
    # vector at no cost per call and needs no cross-lane sums: on ResNet-50's NHWC
    # 1x1 layers it ran 1.0-1.56x cvec's speed, and with its last vector partly past
    # K (`channel_pad`) 1.0-1.9x on C1024 1x1 layers of 10-1000 output channels
    # (benchmarks/NOTES.md). So the heuristic takes cvec only where kvec does not
    # apply; tuning still searches it.
    if (not _cvec_applies(spec, target) or spec.gemm_shape[2] < 1024
            or kvec_heuristic(spec, target) is not None):
        return None
    best, vec = None, target.fp32_lanes
    for kb in (2, 1, 4):  # the largest tile within the accumulator budget, 2 channels first
        kb = divisor_at_most(spec.out_channels, kb)
        pw = divisor_at_most(spec.out_size[-1], accumulator_budget(target) // kb)
        k = CvecKnobs(vec, kb, pw)
        if best is None or k.kb * k.pw > best.kb * best.pw:
            best = k
    return best


def _cvec_grid(spec: ConvSpec, target: TargetInfo) -> Iterator[CvecKnobs]:
    if not _cvec_applies(spec, target):
        return
    budget = accumulator_budget(target) + 4
    for kb in divisors(spec.out_channels):
        for pw in divisors(spec.out_size[-1]):
            if kb <= 8 and pw <= 16 and 6 <= kb * pw <= budget:
                yield CvecKnobs(target.fp32_lanes, kb, pw)


def _cvec(func: PrimFunc, spec: ConvSpec, target: TargetInfo, knobs: CvecKnobs) -> Schedule | None:
    if not spec.channels_last or spec.channels_per_group % knobs.lanes:
        return None
    sch = new_schedule(func)
    conv, _ = _prepare(sch, spec, "front")
    loops = _conv_loops(sch, conv, spec)
    _, rci = sch.split(loops.rc, [None, knobs.lanes])
    # the lanes become a data-parallel axis of a partial-sum block; "conv" keeps the
    # cross-lane sum, run right after each tile on its registers
    part = sch.rfactor(rci, len(spec.out_shape))
    final = sch.get_sblock("conv")
    loops = sch.get_loops(part)
    d = spec.ndim
    n, sp, k, (rco, rci, *rs) = loops[0], loops[1 : 1 + d], loops[1 + d], loops[2 + d :]
    ko, kb = sch.split(k, [None, knobs.kb])
    owo, pw = sch.split(sp[-1], [None, knobs.pw])
    # the channel block outermost and parallel: its weights (kb x R x S x C) are read
    # from memory once and reused from L2 by every pixel tile
    sch.reorder(n, ko, *sp[:-1], owo, *rs, rco, kb, pw, rci)
    par = sch.fuse(n, ko)
    sch.parallel(par)
    sch.unroll(kb)
    sch.unroll(pw)
    sch.vectorize(rci)
    unroll_window(sch, rs, spec)
    sch.set_scope(part, 0, "local")
    sch.reverse_compute_at(final, owo)
    if has_block(sch, "out"):  # bias/cast: after the cross-lane sum, on the same tile
        sch.set_scope(final, 0, "local")
        sch.reverse_compute_at(sch.get_sblock("out"), owo)
    init = sch.decompose_reduction(part, rs[0] if rs else rco)
    sch.vectorize(sch.get_loops(init)[-1])
    return sch


TEMPLATES: tuple[Template[Any], ...] = (
    Template("cpu_cvec", CvecKnobs, _cvec_knobs, _cvec_grid, _cvec),
    Template("cpu_wvec", WvecKnobs, _wvec_knobs, _wvec_grid, _wvec, _wvec_variant),
    Template("cpu_kvec", KvecKnobs, kvec_heuristic, _kvec_grid, kvec_schedule,
             lambda spec, knobs: Variant(row_extra=knobs.wide, clamp_row=True,
                                         channel_extra=channel_pad(spec, knobs.lanes),
                                         flat_pixels=knobs.flat),
             packing=_kvec_packing),
)


def register_tile(knobs: CvecKnobs | WvecKnobs | KvecKnobs, target: TargetInfo) -> int:
    """Accumulator registers a template's tile holds (what `accumulator_budget` bounds)."""
    if isinstance(knobs, WvecKnobs):
        return _wvec_tile(knobs, target)
    if isinstance(knobs, KvecKnobs):
        return knobs.nkv * knobs.pw
    return knobs.kb * knobs.pw


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
    inner = divisor_at_most(out_shape[-1], target.fp32_lanes)
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


def _family() -> Family:
    from convgen.compiler.schedule import winograd

    return Family("llvm", (winograd.TEMPLATE, *TEMPLATES), FALLBACK_NAME, fallback,
                  packs_weights=True)


FAMILY = _family()
