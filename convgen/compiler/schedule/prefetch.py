"""Software prefetch of the packed weights inside a register tile's reduction loop.

In a model a layer's weights come from memory at every call: ResNet-50's weights
(100 MB, 166 MB with the Winograd layers' transformed ones) do not stay in a 32 MB
L3 from one inference to the next. A register tile reads its weights as one
contiguous stream per channel vector (`WeightPacking`: [K/lanes, ..., C, lanes]),
64 bytes per vector and reduction step, and waits on that stream where the
hardware prefetchers run too short a distance ahead of it. One prefetch per
stream and cache line (at every step for 16-lane vectors, every other step for
8-lane ones), `AHEAD_BYTES` ahead in the same stream, keeps the stream in L1
before the loads reach it; past the end of one vector's run the address walks on
into the next run in storage order, which is what the tile reads next. Measured
on Zen 4 (benchmarks/NOTES.md), ms, after 64 MB of other traffic / warm: ResNet-50's
C512 7x7 Winograd layer (1 x 8 GEMM tile) 1.277 -> 1.167 / 1.061 -> 0.798, its
C256 14x14 0.956 -> 0.900 / 0.697 -> 0.554. On a direct 1x1 layer (C512 7x7
K2048, 2 x 7) the stack array was the gain, 0.680 -> 0.618 / 0.547 -> 0.509, and
the prefetch added nothing cold and 2.5% warm.

Where the parallel loop's iterations come in runs that read the same weights
(`group`: a channel block's output rows with the blocks outside the rows, a
Winograd plane's tile blocks), the first iteration of a run streams them from
memory and the others reread them from L2: memory then works in bursts, at a
pace the FMAs cannot follow (64 KB per block of 2 x 16 channels of a C512 1x1
layer in one row's 3584 steps), and idles while the rest of the run computes. So
such a run prefetches the next run's weights instead, its steps mapped evenly
onto their cache lines (one prefetch per line, at the first step of each block of
steps where the run has more steps than lines: an AVX2 tile's step is only 8 FMAs;
C256 56x56 1x1 K64 in AVX2 code on Zen 4 ran 0.737 ms with a prefetch at every
step, 0.632 once per line, 0.619 with none, warm), and the next run finds them
in cache. Only where two
runs' weights fit in L2: otherwise the next run's evict the lines this run
rereads (ResNet-50's C512 14x14 3x3 stride 2, 589 KB per block of 2 x 16
channels: 1.52 -> 2.0-2.3 ms after 64 MB of other traffic, whatever the
prefetch's locality hint). Measured on Zen 4 (18 GB/s from memory on two
cores), the run-packed entry after 64 MB of other traffic / warm, ms: C512 7x7
1x1 K2048 (2 x 7) 0.672 -> 0.575-0.580 / 0.508 -> 0.527-0.536. Inside ResNet-50
(`scripts/profile_model.py`, two runs each) its three such layers went from
0.645-0.697 to 0.543-0.603 ms, its last stride-2 1x1 (C1024 14x14 K2048) from
1.26-1.29 to 1.07-1.09. Not where a window's unrolled taps repeat the step loop
(cpu_kvec on a 3x3 layer: each tap's pass over the input channels is a few FMAs
per step): those runs keep the stream prefetch, which ran as fast as none. The
run-packed entry, 1 x 7 tiles, cold / warm, ms: ResNet-50's C256 28x28 3x3
stride 2 1.377 / 1.134 with the next run's prefetch, 1.197 / 1.101 without;
ResNet-18's C256 14x14 3x3 stride 2 K512 0.728 / 0.667 against 0.676 / 0.569,
and inside ResNet-18 (`scripts/profile_model.py`) 1.34-1.50 against 0.71-0.72.

The prefetch is a call in the reduction loop, and LLVM keeps the accumulators in
registers across such a call only if it can prove the call does not write them:
a stack array it can, a workspace allocation (TVM's lowering of a "local"
buffer) it cannot, and it then stores every accumulator at every step (2.7x
slower). So the tile's accumulators are a "global" buffer under TVM's stack
limit (`accumulator_scope`), and only such tiles take the prefetch.

The prefetch is not a schedule primitive: it is added to the scheduled function,
which is wrapped in a new schedule (as `cuda.workspace_as_argument` does).
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any

from convgen.compiler.compute import ENTRY
from convgen.compiler.schedule.common import new_schedule
from convgen.runtime.manifest import PACKED_WEIGHT

if TYPE_CHECKING:
    from tvm.s_tir import Schedule

    from convgen.compiler.targets import TargetInfo

# TVM lowers a "global" buffer smaller than this (its kMaxStackAlloca) inside a
# kernel to a stack array; anything else to a workspace allocation.
STACK_ARRAY_BYTES = 1024
# Register tiles accumulate in float32, whatever the data type.
ACCUMULATOR_BYTES = 4
# How far ahead of the loads the prefetch runs: about one memory latency (100 ns)
# of a tile's reduction steps (a step of 14 FMAs is 4-5 ns; 64 steps of one
# 64-byte vector are 4 KB). 4-16 KB measured alike, 2 KB 3% slower.
AHEAD_BYTES = 4096
# At most this many prefetches per reduction step (one per weight vector it loads).
MAX_STREAMS = 8
# The longest run of reduction steps between two of the next run's prefetches.
MAX_EVERY = 16
# The fixed-point fraction that maps a run's steps onto the next run's cache lines.
FRACTION_BITS = 16


def accumulator_bytes(vectors: int, lanes: int) -> int:
    """A register tile's accumulators: `vectors` vectors of `lanes` lanes."""
    return vectors * lanes * ACCUMULATOR_BYTES


def stack_vectors(lanes: int) -> int:
    """The most accumulator vectors of `lanes` lanes a stack array holds."""
    return (STACK_ARRAY_BYTES - 1) // accumulator_bytes(1, lanes)


def accumulator_scope(tile_bytes: int) -> str:
    """The storage scope of a register tile's accumulators: a stack array where it
    fits one (LLVM then keeps them in registers whatever else the loop calls)."""
    return "global" if tile_bytes < STACK_ARRAY_BYTES else "local"


def prefetch_weights(sch: Schedule, update: Any, tile_bytes: int, cpu: TargetInfo,
                     group: int = 0) -> Schedule:
    """`sch` with a prefetch of each weight vector the block `update` loads per step
    of its innermost serial reduction loop, AHEAD_BYTES ahead in its stream; or, with
    `group`, where each run of `group` consecutive iterations of the parallel loop
    reads the same weights and two runs' weights fit in the L2 of `cpu`, prefetches
    of the next run's weights spread evenly over this run's steps (the module
    docstring). Unchanged where the accumulators are not a stack array
    (`accumulator_scope`), the block reads no packed weights, or no serial loop steps
    through them."""
    if accumulator_scope(tile_bytes) != "global":
        return sch
    func = sch.mod[ENTRY]
    weight = next((p for p in func.params if p.name == PACKED_WEIGHT), None)
    if weight is None:
        return sch
    name = sch.get(update).name_hint
    found = _find_update(func.body, name)
    if found is None:
        return sch
    realize, loops = found
    indices = _weight_indices(realize, weight)
    if indices is None:
        return sch
    placed = _prefetch_loop(loops, indices)
    if placed is None:
        return sch
    target, inner = placed
    line = _line_elements(weight, cpu)
    calls, every = (_next_group(weight, indices, loops, target, group, cpu.l2_bytes, line)
                    if group else ([], 1))
    if not calls:
        calls, every = _prefetches(weight, indices, inner), _steps_per_line(weight, target, line)
    if not calls or len(calls) > MAX_STREAMS:
        return sch
    return new_schedule(func.with_body(_prepend(func.body, target, calls, every)))


def _line_elements(weight: Any, cpu: TargetInfo) -> int:
    """Elements of the packed weight per prefetch: a cache line, or a whole vector
    where a vector is wider."""
    return max(int(weight.shape[-1]), cpu.cache_line_bytes * 8 // weight.dtype.bits)


def _steps_per_line(weight: Any, target: Any, line: int) -> int:
    """Steps of loop `target` per `line` elements of a weight vector's stream (each
    step reads the next vector of `lanes`): 2 for 8-lane float32, so that a stream
    prefetch comes once per cache line rather than twice (at most MAX_EVERY; 1 where
    the loop's extent does not divide)."""
    every = min(MAX_EVERY, line // int(weight.shape[-1]))
    return every if int(target.extent) % every == 0 else 1


def _find_update(body: Any, name: str) -> tuple[Any, list[Any]] | None:
    """The SBlockRealize of block `name` and the loops around it, outermost first."""
    import tvm_ffi
    from tvm import s_tir, tirx

    stack: list[Any] = []
    found: list[tuple[Any, list[Any]]] = []

    def on_for(node: Any, visitor: Any) -> None:
        stack.append(node)
        visitor.default_visit(node)
        stack.pop()

    def on_realize(node: Any, visitor: Any) -> None:
        if node.block.name_hint == name:
            found.append((node, list(stack)))
        visitor.default_visit(node)

    tvm_ffi.structural_visit(body, [(tirx.For, on_for), (s_tir.SBlockRealize, on_realize)])
    return found[0] if len(found) == 1 else None


def _weight_indices(realize: Any, weight: Any) -> list[Any] | None:
    """The packed weight's indices in the update block, in the loop variables."""
    import tvm_ffi
    from tvm.ir.expr import TensorLoad

    loads: list[Any] = []
    tvm_ffi.structural_walk(realize.block.body, (TensorLoad, lambda n: (
        loads.append(n) if n.source.same_as(weight) else None)))
    if len({str(list(n.indices)) for n in loads}) != 1:
        return None
    bound = {iv.var: value for iv, value in zip(realize.block.iter_vars, realize.iter_values,
                                                strict=True)}
    return [_substitute(i, bound) for i in loads[0].indices]


def _substitute(expr: Any, mapping: dict[Any, Any]) -> Any:
    import tvm_ffi
    from tvm import tirx
    from tvm.sym.analyzer import Analyzer

    def remap(var: Any) -> Any:
        for key, value in mapping.items():
            if key.same_as(var):
                return value
        return var

    return Analyzer().simplify(tvm_ffi.structural_map(expr, (tirx.Var, remap)))


def _uses(expr: Any, var: Any) -> bool:
    import tvm_ffi
    from tvm import tirx

    hits: list[Any] = []
    tvm_ffi.structural_walk(expr, (tirx.Var, lambda v: hits.append(v) if v.same_as(var) else None))
    return bool(hits)


def _prefetch_loop(loops: list[Any], indices: list[Any]) -> tuple[Any, list[Any]] | None:
    """The innermost serial loop that steps through the weights, and the loops inside
    it (unrolled and vectorized: each iteration of the serial loop runs them all)."""
    from tvm import tirx

    for depth in range(len(loops) - 1, -1, -1):
        loop = loops[depth]
        if loop.kind == tirx.ForKind.SERIAL and int(loop.extent) > 1 and any(
                _uses(i, loop.loop_var) for i in indices):
            return loop, loops[depth + 1:]
    return None


def _prefetches(weight: Any, indices: list[Any], inner: list[Any]) -> list[Any]:
    """One prefetch per weight vector a step loads: every value of the inner loops that
    move across the weights' outer dimensions (the channel vectors, the window's taps),
    the vector's lanes (the vectorized loop) at its first, AHEAD_BYTES further along."""
    from tvm import tirx

    last = len(indices) - 1
    across = [lp for lp in inner if lp.kind != tirx.ForKind.VECTORIZED
              and any(_uses(i, lp.loop_var) for i in indices[:last])]
    fixed = [lp for lp in inner if not any(lp.same_as(a) for a in across)]
    ahead = AHEAD_BYTES * 8 // weight.dtype.bits
    calls = []
    for values in itertools.product(*(range(int(lp.extent)) for lp in across)):
        # (each loop's min plus an offset: a constant of the loop variable's type)
        at = {lp.loop_var: lp.min for lp in fixed}
        at.update({lp.loop_var: lp.min + v for lp, v in zip(across, values, strict=True)})
        idx = [_substitute(i, at) for i in indices]
        idx[last] = idx[last] + ahead
        calls.append(_prefetch(weight, idx))
    return calls


def _next_group(weight: Any, indices: list[Any], loops: list[Any], target: Any,
                group: int, cache_bytes: int, line: int) -> tuple[list[Any], int]:
    """Prefetches, and every how many steps of `target` they run, of the weights the
    next `group` parallel iterations read: the run's steps (of the serial loops from
    the parallel one down to `target`) mapped evenly onto the next run's cache lines,
    at most MAX_STREAMS per step (the last run's point past the weights' end: a
    prefetch never faults). Where a run has several steps per line, a prefetch every
    power of two of them (at most MAX_EVERY, dividing `target`'s extent): a step of an
    8-lane tile is only 8 FMAs (the module docstring). Empty where the
    weights of one run are not a contiguous block that the next run's follows, where
    two runs' weights exceed `cache_bytes` (the next run's would evict those this run
    rereads), where an unrolled loop (a window's taps) repeats the step loop, or where
    the line arithmetic would overflow the loop variables' type."""
    from tvm import tirx
    from tvm.sym.analyzer import Analyzer

    par = next((lp for lp in loops if lp.kind == tirx.ForKind.PARALLEL), None)
    if par is None:
        return [], 1
    between = loops[loops.index(par) + 1:loops.index(target) + 1]
    if any(lp.kind == tirx.ForKind.UNROLLED and int(lp.extent) > 1 for lp in between):
        return [], 1  # a window's taps around the step loop (the module docstring)
    steps_loops = [lp for lp in between
                   if lp.kind == tirx.ForKind.SERIAL and int(lp.extent) > 1]
    steps = group * math.prod(int(lp.extent) for lp in steps_loops)
    first = {lp.loop_var: lp.min for lp in loops if not lp.same_as(par)}

    def start(p: Any) -> list[Any]:
        """The weight index the run containing iteration p starts its reads at."""
        return [_substitute(i, {**first, par.loop_var: p}) for i in indices]

    def flat(idx: list[Any]) -> Any:
        off = idx[0]
        for dim, i in zip(weight.shape[1:], idx[1:], strict=True):
            off = off * dim + i
        return off

    analyzer = Analyzer()
    region = analyzer.simplify(flat(start(par.min + group)) - flat(start(par.min)))
    lanes = int(weight.shape[-1])
    if not isinstance(region, tirx.IntImm) or int(region) <= 0 or int(region) % lanes:
        return [], 1
    if 2 * int(region) * weight.dtype.bits // 8 > cache_bytes:
        return [], 1
    # a prefetch fetches a cache line (`line` elements): one per line of the region
    # (two vectors of 8 lanes share one)
    lines = -(-int(region) // line)
    every = 1
    while (every * 2 <= MAX_EVERY and int(target.extent) % (every * 2) == 0
           and steps // (every * 2) >= lines):
        every *= 2
    steps //= every
    per_step = -(-lines // steps)
    if per_step > MAX_STREAMS:
        return [], 1
    # slot s of the run's steps * per_step takes line s * lines / slots, as a multiply
    # and a shift: a division per step (by a constant, but signed) is ten integer
    # instructions, which held an AVX2 tile of 8 FMAs per step to half its speed.
    # The ratio rounds up and is at most 1, so consecutive slots take the same line or
    # the next one, and the last slot reaches the run's last line.
    slots = steps * per_step
    shift = FRACTION_BITS
    while shift and slots * _ratio(lines, slots, shift) >= 2**31:
        shift -= 1
    ratio = _ratio(lines, slots, shift)
    if slots * ratio >= 2**31:
        return [], 1
    position = par.loop_var % group
    for lp in steps_loops:
        extent = lp.extent // every if lp.same_as(target) else lp.extent
        offset = (lp.loop_var - lp.min) // every if lp.same_as(target) else lp.loop_var - lp.min
        position = position * extent + offset
    base = start(par.loop_var + group)
    calls = []
    for j in range(per_step):
        at = tirx.shift_right((position * per_step + j) * ratio, shift)
        calls.append(_prefetch(weight, [*base[:-1], base[-1] + at * line]))
    return calls, every


def _ratio(lines: int, slots: int, shift: int) -> int:
    """lines / slots in fixed point with `shift` fraction bits, rounded up."""
    return -(-(lines << shift) // slots)


def _prefetch(weight: Any, idx: list[Any]) -> Any:
    """llvm.prefetch(&weight[idx], read, locality 3 (keep in all levels), data cache),
    `idx` flattened however far its last index runs past that axis."""
    from tvm import tirx

    address = tirx.call_intrin("handle", "tirx.address_of", tirx.BufferLoad(weight, idx))
    return tirx.Evaluate(tirx.call_llvm_intrin(
        "void", "llvm.prefetch.p0", address, tirx.const(0, "int32"),
        tirx.const(3, "int32"), tirx.const(1, "int32")))


def _prepend(body: Any, target: Any, calls: list[Any], every: int = 1) -> Any:
    """`calls` at the top of loop `target`'s body; with `every`, the loop split into
    blocks of that many steps (its variable then runs over one block inside a loop
    over the blocks) and the calls at the top of each block, at its first step."""
    import tvm_ffi
    from tvm import tirx

    def at_target(node: Any) -> Any:
        if not node.loop_var.same_as(target.loop_var):
            return node
        if every == 1:
            return tirx.For(node.loop_var, node.min, node.extent, node.kind,
                            tirx.SeqStmt([*calls, node.body]), node.thread_binding,
                            node.annotations)
        dtype = node.loop_var.ty
        block = tirx.Var(f"{node.loop_var.name}_block", dtype)
        first = node.min + block * every
        steps = tirx.For(node.loop_var, first, tirx.const(every, dtype),
                         node.kind, node.body, node.thread_binding, node.annotations)
        at_first = [tvm_ffi.structural_map(c, (tirx.Var, lambda v: first if v.same_as(
            node.loop_var) else v)) for c in calls]
        return tirx.For(block, tirx.const(0, dtype), node.extent // every,
                        node.kind, tirx.SeqStmt([*at_first, steps]))

    return tvm_ffi.structural_map(body, (tirx.For, at_target))
