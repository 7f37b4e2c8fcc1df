"""A deployed model's other operators (element-wise, pooling, reductions, the final
GEMM) on the CPU: one generic schedule, no tuning.

After FuseOps/FuseTIR each of them is a PrimFunc of a few blocks. Relax's default
CPU pipeline compiles them as written: every intermediate buffer materialised,
and nothing in parallel. What pays here:

  * inlining the spatial blocks into their consumer, so a fused add + relu reads
    its inputs once and keeps no intermediate buffer; but not a small one that
    the consumer broadcasts (a per-channel gate), which would then be recomputed
    for every pixel (`_broadcast_producers`);
  * vectorizing an element-wise nest by a lane count that divides its innermost
    extent (with one that does not, TVM cannot simplify the index over a vector
    and emits gathers: 18x slower on a 56-wide row);
  * a layout transpose into channels-last with a few channels (the model's input,
    224 x 224 x 3) in the output's order, the channel loop unrolled and the pixel
    loop left to LLVM's loop vectorizer (`_interleaves`);
  * a concatenation along the innermost axis (fused with what reads it)
    partitioned at its inputs' boundaries, a vector loop per input: a vector
    across two inputs evaluates its selects lane by lane;
  * reductions (pooling, mean) with the channels innermost, vectorized, below
    the window loops; a reduction along its own contiguous innermost axis
    (LayerNorm, softmax) as a vector of partial sums;
  * threads only for operators of 128 K elements or more: a parallel region costs
    a few microseconds to wake the pool, as much as a small one takes on one core
    (LLVM already vectorizes the innermost loop of such a nest).

The convolutions are convgen's own kernels, marked `tirx.is_scheduled`, which
this pass leaves alone.
"""

from __future__ import annotations

import math
from typing import Any

from convgen.compiler.schedule.common import divisor_at_most
from convgen.runtime.kernel import CACHE_LINE

# element-wise nests with fewer outputs run on one core (see above); reductions below
# this much work (outputs x reduction extent) too. Inside a model an operator's
# inputs come from the layers before it, partly out of cache, and two cores move
# them nearly twice as fast: at 187-800 K elements DenseNet's concatenations (with
# their BatchNorm and ReLU) and SqueezeNet's ran 1.7-2.2x faster in parallel (Zen 5),
# and the model's input transpose (150 K) 11 us on one core, 5 on two.
PARALLEL_MIN_OUTPUTS = 1 << 17
PARALLEL_MIN_WORK = 1 << 19
LINE_FLOATS = CACHE_LINE // 4  # float32 elements per cache line
BROADCAST = 8  # `_broadcast_producers`: a producer this many times smaller stays apart


def schedule_model_ops() -> Any:
    """The pass: `OtherOpsCPU` on every PrimFunc not yet scheduled."""
    from tvm.s_tir import dlight

    return dlight.ApplyDefaultSchedule(_rule())


def schedule_model_ops_gpu() -> Any:
    """The pass for CUDA models: TVM's own GPU rules (dlight), which bind every
    operator's loops to threads; the generic fallback takes what the others do not."""
    from tvm.s_tir import dlight

    gpu = dlight.gpu
    return dlight.ApplyDefaultSchedule(gpu.Matmul(), gpu.GEMV(), gpu.Reduction(),
                                       gpu.GeneralReduction(), gpu.Fallback())


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
            kept = _broadcast_producers(sch, blocks)
            blocks = kept + try_inline_contiguous_spatial(
                sch, [b for b in blocks if b not in kept])
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
                    if _interleaves(sch, block.block_rv, extents):
                        *loops, _pixels, channels = loops
                        sch.unroll(channels)
                        if loops and outputs >= PARALLEL_MIN_OUTPUTS:
                            sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])
                        continue
                    order = _contiguous_innermost(sch, block.block_rv, extents, widest)
                    if order is not None:
                        sch.reorder(*[loops[i] for i in order])
                    order = order or list(range(len(loops)))
                    loops, extents = [loops[i] for i in order], [extents[i] for i in order]
                    strided = _strided_read(sch, block.block_rv, order, extents)
                    scattered = order[-1] != len(order) - 1 or strided is not None
                    cuts = [] if scattered else _cuts(sch, block, extents[-1])
                    lanes, piece_lanes = (next((n for n in (widest, 16, 8, 4)
                                                if n <= widest and e % n == 0), None)
                                          for e in (extents[-1], math.gcd(extents[-1], *cuts)))
                    if cuts and piece_lanes:
                        _partition(sch, loops[-1], cuts, piece_lanes)
                        loops = loops[:-1]
                    elif lanes and outputs >= 4 * lanes:
                        # the vector within the innermost loop, so every lane's index
                        # is the first one's plus its lane (the fused index would
                        # hide that behind divisions: gathers)
                        *loops, last = loops
                        last, inner = sch.split(last, factors=[None, lanes])
                        loops.append(last)
                        sch.vectorize(inner)
                        if strided is not None:
                            loops = _line_inside(sch, loops, strided, extents[strided])
                    if loops and outputs >= PARALLEL_MIN_OUTPUTS:
                        sch.parallel(sch.fuse(*loops) if len(loops) > 1 else loops[0])
                    elif len(loops) > 1:
                        sch.fuse(*loops)
                else:
                    sch = _reduction(sch, block.block_rv, extents, spatial, widest)
            return sch

    return OtherOpsCPU()


def _broadcast_producers(sch: Any, blocks: list[Any]) -> list[Any]:
    """The element-wise blocks whose output is at most 1/BROADCAST of the largest one
    the function writes: a per-channel value that a consumer broadcasts over every
    pixel. Inlined, the consumer would recompute it for each pixel: a
    squeeze-excitation gate, x * sigmoid(s) with s one value per channel, evaluated
    its sigmoid (an exp and a division) 56 x 56 times per channel (EfficientNet-B0).
    Kept as a nest of its own, it is computed once into a buffer of its own size."""
    from tvm import tirx

    def size(block: Any) -> int:
        """Elements of the block's one output, 0 where it has several or a symbolic
        shape."""
        writes = sch.get(block.block_rv).writes
        shape = writes[0].source.shape if len(writes) == 1 else [None]
        return math.prod(d.value for d in shape) \
            if all(isinstance(d, tirx.IntImm) for d in shape) else 0

    largest = max((size(b) for b in blocks), default=0)
    return [b for b in blocks if b.is_injective() and sch.get(b.block_rv).reads
            and 0 < size(b) * BROADCAST <= largest]


def _cuts(sch: Any, block: Any, extent: int) -> list[int]:
    """Where the innermost axis passes from one input to the next: a concatenation
    reads input i at `c - k_i` for c in [k_i, k_i + its extent), selecting by c
    (`if_then_else(192 <= c, d[c - 192], ...)`); a pad along that axis reads its
    input up to the input's extent. A vector across such a boundary holds lanes of
    two inputs, so TVM evaluates its selects lane by lane, scalar."""
    from tvm import tirx

    axis = block.iters[-1].var
    found: set[int] = set()
    for access in sch.get(block.block_rv).reads:
        if not access.region:  # a scalar (a Gather's one index)
            continue
        start, k = access.region[-1].min, None
        if start.same_as(axis):
            k = 0
        elif isinstance(start, tirx.Add | tirx.Sub) and start.a.same_as(axis) \
                and isinstance(start.b, tirx.IntImm):
            k = start.b.value if isinstance(start, tirx.Sub) else -start.b.value
        size = access.source.shape[-1]
        if k is not None and isinstance(size, tirx.IntImm):
            found |= {k, k + size.value}
    return sorted(c for c in found if 0 < c < extent)


def _partition(sch: Any, loop: Any, cuts: list[int], lanes: int) -> None:
    """The innermost loop in vectors of `lanes`, the vectors partitioned at `cuts` (all
    multiples of `lanes`): one vectorized loop per piece, in which every select is
    decided, so each piece reads one input in whole vectors. A concatenation of
    DenseNet's (7 inputs, then BatchNorm and ReLU, 28 x 28 x 224): 0.134 -> 0.020 ms
    (Zen 4)."""
    outer, _ = sch.split(loop, factors=[None, lanes])
    pieces = sch.loop_partition(outer, factors=[
        (b - a) // lanes for a, b in zip([0, *cuts[:-1]], cuts)] + [None])
    for piece in pieces:
        (copy,) = sch.get_child_blocks(piece)
        sch.vectorize(sch.get_loops(copy)[-1])


def _contiguous_innermost(sch: Any, block: Any, extents: list[int],
                          widest: int) -> list[int] | None:
    """Where the innermost loop cannot be vectorized and LLVM cannot interleave it
    (`_interleaves`: a transpose into channels-last of more channels than a cache
    line, none a vector divides, such as ShuffleNetV2's 58, each read 784 elements
    apart), the loop order that moves innermost a loop that can, along which some
    buffer is contiguous: the transpose then reads whole vectors of a row and
    scatters them, instead of gathering every element (the model's input transpose,
    224 x 224 x 3, on Zen 4: 0.155 ms gathering, 0.067 scattering). None: the order
    stays."""
    if extents[-1] % 4 == 0:
        return None
    stmt = sch.get(block)
    variables = [iv.var for iv in stmt.iter_vars]
    if len(variables) != len(extents):
        return None
    for access in (*stmt.writes, *stmt.reads):
        if not access.region:
            continue
        last = access.region[-1].min
        pick = next((i for i, v in enumerate(variables) if last.same_as(v)), None)
        if pick is not None and extents[pick] % 4 == 0 and extents[pick] >= widest:
            return [*range(pick), *range(pick + 1, len(extents)), pick]
    return None


def _interleaves(sch: Any, block: Any, extents: list[int]) -> bool:
    """A layout transpose into channels-last with a few channels innermost (at most a
    cache line's worth, none a vector divides), whose input is contiguous along the
    pixel loop just outside them: the model's input, 224 x 224 x 3. Its pixel loop
    stays serial and its channel loop is unrolled, so LLVM's loop vectorizer sees the
    stores of consecutive pixels' channels as one interleaved group: it loads a vector
    of pixels from each channel's plane and shuffles them into whole vectors of the
    output. TVM's vectorizer, over a pixel loop moved inside the channels, stores each
    lane apart instead (`_contiguous_innermost`), and over the channels gathers every
    element. The input transpose alone and warm on Zen 5, 2 threads: 18.2 us with
    its lanes stored apart, 4.4 interleaved (gathering, 0.155 ms in a model on Zen
    4)."""
    if len(extents) < 2 or extents[-1] % 4 == 0 or extents[-1] > LINE_FLOATS:
        return False
    stmt = sch.get(block)
    if len(stmt.iter_vars) != len(extents):
        return False
    pixels = stmt.iter_vars[-2].var
    return any(access.region and access.region[-1].min.same_as(pixels)
               for access in stmt.reads)


def _strided_read(sch: Any, block: Any, order: list[int], extents: list[int]) -> int | None:
    """A layout transpose whose output is contiguous along the innermost loop but whose
    input is contiguous along another (channels-last back to channels-first at a
    model's output: each vector gathers 8 pixels' channel c): the position, in `order`,
    of that other loop, where it is an outer loop with a divisor above one to unroll
    (`_line_of`)."""
    stmt = sch.get(block)
    variables = [iv.var for iv in stmt.iter_vars]
    if len(variables) != len(order):
        return None
    for access in stmt.reads:
        if not access.region:
            continue
        last = access.region[-1].min
        pick = next((p for p, i in enumerate(order) if last.same_as(variables[i])), None)
        if pick is not None and pick < len(order) - 1 and _line_of(extents[pick]) > 1:
            return pick
    return None


def _line_of(extent: int) -> int:
    """The part of a strided loop `_line_inside` unrolls: a cache line's worth, or the
    largest divisor of its extent below it (a segmentation head's 21 classes: 7; its
    bilinear upsampling to 224 x 224 fused with the transpose back to NCHW, 1.55 ->
    0.74 ms on Zen 4)."""
    return divisor_at_most(extent, LINE_FLOATS)


def _line_inside(sch: Any, loops: list[Any], pick: int, extent: int) -> list[Any]:
    """The strided loop `loops[pick]` (`_strided_read`) split by a cache line's worth
    (`_line_of`), that part unrolled inside the others, just outside the vector: the
    lines a vector gathers from are then those the next vectors read, from L1. With that loop
    outermost, every gather went to L2: ResNet-50's 56 x 56 x 256 output back to
    NCHW, 800 K elements, 1.93 ms on one core (AVX2 code on Zen 4)."""
    outer, line = sch.split(loops[pick], factors=[None, _line_of(extent)])
    sch.reorder(*loops[pick + 1:], line)
    sch.unroll(line)
    return [*loops[:pick], outer, *loops[pick + 1:]]


def _reduction(sch: Any, block: Any, extents: list[int], spatial: int, widest: int) -> Any:
    """A reduction (pooling, mean): channels-last keeps the channels innermost and
    contiguous, so the reduction loops go outside them and the channels are
    vectorized, every window position one vector load and max/add per lane group
    (the accumulator's initialisation moved out of the reduction loops). One along
    its input's contiguous innermost axis instead: `_vector_partial_sums`. Where TVM
    refuses a step, the reduction stays as it was (on a copy of the schedule)."""
    from tvm.s_tir import ScheduleError

    row_lanes = _row_lanes(sch, block, extents, spatial, widest)
    if row_lanes:
        return _vector_partial_sums(sch, block, extents, spatial, row_lanes)
    lanes = next((n for n in (widest, 8, 4) if extents[spatial - 1] % n == 0), None)
    trial = sch.copy()
    try:
        loops = trial.get_loops(block)
        s_loops, r_loops = loops[:spatial], loops[spatial:]
        if lanes is not None:
            outer, inner = trial.split(s_loops[-1], factors=[None, lanes])
            trial.reorder(*s_loops[:-1], outer, *r_loops, inner)
            trial.vectorize(inner)
            s_loops = [*s_loops[:-1], outer]
        if math.prod(extents) >= PARALLEL_MIN_WORK and math.prod(extents[:spatial]) >= 2:
            trial.parallel(trial.fuse(*s_loops) if len(s_loops) > 1 else s_loops[0])
        if lanes is not None:  # last: vectorize and parallel need the block whole
            init = trial.decompose_reduction(block, r_loops[0])
            trial.vectorize(trial.get_loops(init)[-1])
    except ScheduleError:
        return sch
    return trial


def _row_lanes(sch: Any, block: Any, extents: list[int], spatial: int, widest: int
               ) -> int | None:
    """Where the reduction runs along the innermost axis of its input, contiguous
    (LayerNorm's mean and variance over the channels of a channels-last pixel, a
    softmax's sum), so that no spatial loop is: the vector width its extent takes."""
    stmt = sch.get(block)
    axis = stmt.iter_vars[-1].var
    if len(extents) == spatial or not any(
            access.region[-1].min.same_as(axis) for access in stmt.reads):
        return None
    return next((n for n in (widest, 8, 4) if extents[-1] % n == 0 and extents[-1] >= 2 * n),
                None)


def _vector_partial_sums(sch: Any, block: Any, extents: list[int], spatial: int,
                         lanes: int) -> Any:
    """The innermost reduction in vectors (`rfactor`): lane l sums the elements l, l +
    lanes, ... into a vector of partial sums, read in storage order, then the lanes
    are summed. A scalar running sum waits on its adder's latency at every element:
    ConvNeXt's LayerNorm over 384 channels at 14 x 14, 0.134 -> 0.018 ms (Zen 4).
    Where TVM refuses a step, the reduction stays as it was."""
    from tvm.s_tir import ScheduleError

    trial = sch.copy()
    try:
        _, inner = trial.split(trial.get_loops(block)[-1], factors=[None, lanes])
        partial = trial.rfactor(inner, factor_axis=spatial)
        loops = trial.get_loops(partial)
        trial.vectorize(loops[-1])
        if math.prod(extents) >= PARALLEL_MIN_WORK and math.prod(extents[:spatial]) >= 2:
            trial.parallel(trial.fuse(*loops[:spatial]) if spatial > 1 else loops[0])
        init = trial.decompose_reduction(partial, trial.get_loops(partial)[spatial])
        trial.vectorize(trial.get_loops(init)[-1])
    except ScheduleError:
        return sch
    return trial


def _extent(sch: Any, loop: Any) -> int | None:
    """A loop's extent, None where symbolic."""
    from tvm.s_tir.dlight.base import get_extent

    extent = get_extent(sch, loop)
    return extent if isinstance(extent, int) else None
