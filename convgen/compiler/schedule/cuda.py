"""CUDA schedules.

Templates, tried in order (each returns None where it does not apply):

  * `cuda_igemm_f16_tc` (groups == 1, float16): implicit GEMM on the tensor
    cores (wmma m16n16k16, float16 operands, float32 accumulators), M/N/K padded
    to the tile with pad_einsum, operands staged in shared memory, the fragment
    stored to shared and written out through the fused bias/cast epilogue.
  * `cuda_igemm_f32` (groups == 1, any dtype): implicit GEMM with CUDA cores.
    C[M, N] = A[M, K] * B[N, K]^T with M = batch * output pixels, N = output
    channels, K = C * R * S (K ordered like the weight's storage: (c, r, s)
    for channels-first, (r, s, c) for channels-last, so weight tiles and, for
    channels-last, input tiles are contiguous along K). Block tile BM x BN x BK
    in shared memory (both operands, stored K-major so the register tile reads
    vectors), TM x TN register tile per thread, optional register-staged
    prefetch (software pipelining: tile k+1 is loaded into registers while tile
    k is multiplied), optional split of K into (taps, channel tiles), tails
    padded by pad_einsum (guarded loads, guarded stores). Bound weights are
    packed [K, N] (`_igemm_packing`), so weight tiles load along N in vectors.
  * `cuda_depthwise` (groups == C, any channel multiplier): direct kernel, each
    thread owns vc channels x vw consecutive outputs along the innermost spatial
    axis with the float32 sums in registers; per tap row the input window and
    the row's filter taps are loaded into registers once.

  * `cuda_dlight_gemv` (groups == 1, one output pixel: a classifier on pooled
    features, a squeeze-excitation gate, which `_one_output_pixel` keeps off the
    implicit GEMMs): TVM dlight's GPU GEMV rule. Each output channel's weight row
    is contiguous along the reduction, and the layer reads every weight once: a
    warp per output channel, each lane a run of the row, the sums combined across
    the warp. (The fallback's thread per output channel reads its row alone,
    the warp's 32 rows 5 KB apart at C1280, and it ran C1280 -> K1000 in 112 us on
    an H200, against cuDNN's 34.)
  * `cuda_dlight_gemm` (groups == 1): TVM dlight's GPU Matmul rule, which sees
    the conv block as a GEMM by itself; kept as a tuning candidate.

Both implicit GEMMs can split the reduction across blocks (`split_k`, `_split_k`)
where the output tiles leave SMs idle, the partial sums in a workspace the
caller passes. Every template runs bound weights packed (`convgen_pack`), the
flip of `conv` applied there, so both modes run the same kernel.

The fallback (`cuda_direct`): one thread per output element, the float32 sum
in a register; correct for every spec.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from convgen.compiler.compute import (
    ENTRY,
    WeightPacking,
    reads_packed_weight,
    workspace_as_argument,
)
from convgen.compiler.schedule.common import (
    Family,
    Template,
    first_valid,
    has_block,
    loops_below,
    new_schedule,
)
from convgen.compiler.targets import TargetInfo
from convgen.spec import ConvSpec

if TYPE_CHECKING:
    from tvm.s_tir import Schedule
    from tvm.tirx import PrimFunc

FALLBACK_NAME = "cuda_direct"
FALLBACK_THREADS = 128
SUM_THREADS = 256  # threads per block of split-K's summing kernel


# ---------------------------------------------------------------------------------------
# shared: normalise the conv block to C[M, N] += A[M, K] * B[N, K]
# ---------------------------------------------------------------------------------------


def _roles(spec: ConvSpec, split_taps: bool) -> list[tuple[str, int]]:
    """(role, rank) of each conv block iter, in block iter order.

    Block iters: channels-first (n, k, sp..., rc, r...), channels-last
    (n, sp..., k, rc, r...). Role M fuses (n, sp...), N is k. With split_taps the
    reduction is two axes, T (the fused taps r...) and C (rc); otherwise one axis K
    fusing (rc, r...) channels-first or (r..., rc) channels-last (the weight's order)."""
    nd = spec.ndim
    sp = [("M", 1 + i) for i in range(nd)]
    if split_taps:
        taps = [("T", i) for i in range(nd)]
        rc = ("C", 0)
    else:
        taps = [("K", (i if spec.channels_last else 1 + i)) for i in range(nd)]
        rc = ("K", nd if spec.channels_last else 0)
    if spec.channels_last:
        return [("M", 0), *sp, ("N", 0), rc, *taps]
    return [("M", 0), ("N", 0), *sp, rc, *taps]


def _fusion_map(vars_roles, out_roles):
    """IndexMap over `vars_roles` [(var, extent, role, rank)] -> one fused index per role."""
    from tvm import tirx

    inputs = []
    parts: dict[str, list[tuple[int, Any, int]]] = {r: [] for r in out_roles}
    for i, (_, extent, role, rank) in enumerate(vars_roles):
        v = tirx.Var(f"i{i}", "int32")
        inputs.append(v)
        parts[role].append((rank, v, extent))
    out = []
    for role in out_roles:
        expr = tirx.IntImm("int32", 0)
        for _, v, extent in sorted(parts[role], key=lambda t: t[0]):
            expr = expr * extent + v
        out.append(expr)
    return tirx.IndexMap(inputs, out, None)


def _normalize_gemm(sch: Schedule, spec: ConvSpec, split_taps: bool) -> Any:
    """reindex + transform so `conv` is C[M, N] += A[M, K] * B[N, K] (K = (T, C) when
    split_taps), every access a plain block iter (what pad_einsum and tiling need)."""
    conv = sch.get_sblock("conv")
    roles = _roles(spec, split_taps)
    red = ["T", "C"] if split_taps else ["K"]
    block = sch.get(conv)
    iters = [(iv.var, int(iv.dom.extent), *roles[i]) for i, iv in enumerate(block.iter_vars)]
    by_var = {it[0]: it for it in iters}
    a_re = sch.reindex(conv, ("read", 0))
    b_re = sch.reindex(conv, ("read", 1))
    c_re = sch.reindex(conv, ("write", 0))
    block = sch.get(conv)

    def access_vars(region):
        found = []
        for r in region:
            assert r.min in by_var, f"non-trivial access {r.min} after reindex"
            found.append(by_var[r.min])
        return found

    sch.transform_layout(
        a_re, ("write", 0), _fusion_map(access_vars(block.reads[0].region), ["M", *red])
    )
    sch.transform_layout(
        b_re, ("write", 0), _fusion_map(access_vars(block.reads[1].region), ["N", *red])
    )
    sch.transform_layout(
        c_re, ("read", 0), _fusion_map(access_vars(block.writes[0].region), ["M", "N"])
    )
    sch.transform_block_layout(conv, _fusion_map(iters, ["M", "N", *red]))
    return conv


def _pad_to(sch: Schedule, conv: Any, sizes: tuple[int, int, int], tiles: tuple[int, ...]) -> None:
    if any(s % t for s, t in zip(sizes, tiles)):
        sch.pad_einsum(conv, list(tiles))


def _one_output_pixel(spec: ConvSpec) -> bool:
    """A GEMM of one row, one output pixel (M = 1: a classifier on pooled features, a
    squeeze-excitation gate), came out wrong from cuda_igemm_f32 on an H200, every
    output off (64 times the result for C1 -> K1). The generated code shows why: the
    one-row input tile is staged in shared memory whole, but the register fetches
    of both operands lose the reduction index (every unrolled step of a shared-memory
    tile reads element 0 of the input and the same weights), so each step
    multiplies the same pair. The tensor-core template stages its tiles the same way
    and is kept off such layers too (not run there). They go to `cuda_dlight_gemv`."""
    return spec.gemm_shape[0] == 1


def _inline_producers(sch: Schedule, block: Any) -> None:
    from tvm.s_tir.dlight.gpu.matmul import auto_inline_producers

    auto_inline_producers(sch, block)


def _inline_consumer_chain(sch: Schedule, block: Any) -> None:
    from tvm.s_tir.dlight.gpu.matmul import auto_inline_consumer_chain

    auto_inline_consumer_chain(sch, block)


# ---------------------------------------------------------------------------------------
# cuda_igemm_f32
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IgemmKnobs:
    """bm x bn: the block's output tile (output pixels x output channels); bk: the
    reduction step staged in shared memory; tm x tn: each thread's register tile;
    vec: elements per global load where an operand is contiguous along the reduction
    (channels-last inputs and weights); stages: 1 single-buffered, 2 register-staged
    prefetch (tile k+1 is loaded into registers while tile k is multiplied, then
    stored to shared memory); split_taps: reduce over (taps, channel tiles of bk)
    instead of one fused K = C*R*S axis (cheaper per-element index arithmetic,
    channels padded to bk); split_k: blocks along the reduction (`_split_k`), for
    layers whose output tiles alone leave SMs idle."""

    bm: int = 64
    bn: int = 64
    bk: int = 16
    tm: int = 4
    tn: int = 4
    vec: int = 4
    stages: int = 2
    split_taps: bool = True
    split_k: int = 1


def _igemm_threads(k: IgemmKnobs) -> int:
    return (k.bm // k.tm) * (k.bn // k.tn)


def _igemm_valid(k: IgemmKnobs, target: TargetInfo) -> bool:
    if min(k.bm, k.bn, k.bk, k.tm, k.tn, k.vec, k.split_k) < 1 or k.stages not in (1, 2):
        return False
    if k.bm % k.tm or k.bn % k.tn or k.bk % k.vec or k.tm > 8 or k.tn > 8:
        return False
    t = _igemm_threads(k)
    if t < 64 or t > 512 or t % target.warp_size:
        return False
    # every thread loads a whole number of vectors of each operand tile
    if (k.bm * k.bk) % (t * k.vec) or (k.bn * k.bk) % (t * k.vec):
        return False
    return 4 * (k.bm + k.bn + 8) * k.bk <= target.smem_per_block


def _use_split_taps(spec: ConvSpec, bk: int) -> bool:
    """Split when there are several taps and padding C to bk wastes at most 1/4."""
    c = spec.channels_per_group
    return math.prod(spec.kernel_size) > 1 and -(-c // bk) * bk <= 1.25 * c


def _igemm_f32_knobs(spec: ConvSpec, target: TargetInfo) -> IgemmKnobs | None:
    if spec.groups != 1 or _one_output_pixel(spec):
        return None
    m, n, kk = spec.gemm_shape
    # the biggest block tile that still gives at least one full wave of blocks
    # (small-M layers such as 7x7 outputs want split-K: not implemented)
    tiles = [
        (128, 128, 8, 8),
        (128, 64, 8, 4),
        (64, 64, 4, 4),
        (64, 32, 4, 4),
        (32, 64, 4, 4),
        (32, 32, 4, 4),
    ]
    blocks = [-(-m // bm) * -(-n // bn) for bm, bn, _, _ in tiles]
    pick = next(
        (i for i, b in enumerate(blocks) if b >= target.sm_count),
        max(range(len(tiles)), key=blocks.__getitem__),
    )
    bm, bn, tm, tn = tiles[pick]
    bk = 16 if kk >= 16 else 8
    split = _use_split_taps(spec, bk)
    if not split and bk == 16 and _use_split_taps(spec, 8):
        bk, split = 8, True
    preferred = (
        IgemmKnobs(bm, bn, bk, tm, tn, 4, 2, split),
        IgemmKnobs(bm, bn, bk, tm, tn, 1, 2, split),
        IgemmKnobs(bm, bn, 8, tm, tn, 1, 2, _use_split_taps(spec, 8)),
        IgemmKnobs(64, 64, 16, 4, 4, 4, 2, False),
    )
    knobs = first_valid(preferred, lambda k: _igemm_valid(k, target))
    if knobs is None:
        return None
    return dataclasses.replace(knobs, split_k=_igemm_split_k(spec, target, knobs))


MIN_SLICE_STEPS = 8  # split-K keeps this many shared-memory steps per slice, at least


def _igemm_split_k(spec: ConvSpec, target: TargetInfo, knobs: IgemmKnobs) -> int:
    return _split_k_parts(spec, target, knobs.bm, knobs.bn, _reduction_steps(spec, knobs))


def _split_k_parts(spec: ConvSpec, target: TargetInfo, bm: int, bn: int, steps: int) -> int:
    """Split-K slices for a bm x bn block tile whose reduction takes `steps` shared-memory
    steps: 1 where the output tiles fill at least half the SMs, else about enough
    slices for one block per SM, a divisor of the steps, each slice at least
    MIN_SLICE_STEPS long (the partial sums' round trip through L2 is then small
    beside the slice's own loads)."""
    m, n, _ = spec.gemm_shape
    blocks = -(-m // bm) * -(-n // bn)
    if 2 * blocks > target.sm_count:
        return 1
    want = min(16, -(-target.sm_count // blocks))
    fits = [p for p in range(1, want + 1) if steps % p == 0 and steps // p >= MIN_SLICE_STEPS]
    return max(fits, default=1)


def _igemm_f32_grid(spec: ConvSpec, target: TargetInfo) -> Iterator[IgemmKnobs]:
    """~20-30 points: tile shapes x reduction step x reduction form x pipelining."""
    if _igemm_f32_knobs(spec, target) is None:
        return
    tiles = [
        (64, 64, 4, 4),
        (128, 64, 8, 4),
        (64, 128, 4, 8),
        (128, 128, 8, 8),
        (64, 32, 4, 4),
        (32, 64, 4, 4),
        (32, 32, 4, 4),
    ]
    for (bm, bn, tm, tn), bk, split, stages in itertools.product(
        tiles, (8, 16), (False, True), (2, 1)
    ):
        if split and not _use_split_taps(spec, bk):
            continue
        if stages == 1 and (bm, bn) != (64, 64):
            continue
        k = IgemmKnobs(bm, bn, bk, tm, tn, 4, stages, split)
        if not _igemm_valid(k, target):
            k = IgemmKnobs(bm, bn, bk, tm, tn, 1, stages, split)
        if _igemm_valid(k, target):
            yield k
            parts = _igemm_split_k(spec, target, k)
            if parts > 1:  # an under-filled GPU: the same tile with split-K too
                yield dataclasses.replace(k, split_k=parts)


@dataclass(frozen=True)
class _SharedStage:
    """How cuda_igemm_f32 stages an operand tile in shared memory at reduction step
    `ko`: loaded cooperatively by the block's ty x tx threads in vectors, stored
    reduction-major (the register tile then reads tm or tn consecutive values)."""

    conv: Any
    ko: Any
    ndims: int  # the operand's loops: [m or n, (t,) k]
    ty: int
    tx: int
    split: bool
    pipeline: bool

    def fetch(self, sch: Schedule, index: int, k_inner: bool, vec: int) -> Any:
        blk = sch.cache_read(self.conv, index, "shared")
        sch.compute_at(blk, self.ko, preserve_unit_loops=True)
        loops = sch.get_loops(blk)[-self.ndims:]
        if not k_inner:
            sch.reorder(*loops[1:], loops[0])
            loops = [*loops[1:], loops[0]]
        fused = sch.fuse(*loops)
        _, t_y, t_x, vv = sch.split(fused, [None, self.ty, self.tx, vec])
        sch.bind(t_y, "threadIdx.y")
        sch.bind(t_x, "threadIdx.x")
        if vec > 1:
            sch.vectorize(vv)
        # reduction-major; rows padded by 4 words against bank conflicts of the
        # transposing stores
        if self.split:
            sch.transform_layout(blk, ("write", 0), lambda i, t, c: (t, c, i))
            sch.storage_align(blk, 0, axis=1, factor=32, offset=4)
        else:
            sch.transform_layout(blk, ("write", 0), lambda i, k: (k, i))
            sch.storage_align(blk, 0, axis=0, factor=32, offset=4)
        if self.pipeline:
            sch.annotate(blk, "tirx.manifest_shared_memory_local_stage", 1)
        return blk


def _reduction_steps(spec: ConvSpec, knobs: IgemmKnobs) -> int:
    """The shared-memory steps of cuda_igemm_f32's reduction (bk deep each)."""
    if knobs.split_taps:
        return math.prod(spec.kernel_size) * -(-spec.channels_per_group // knobs.bk)
    return -(-spec.gemm_shape[2] // knobs.bk)


def _split_k(sch: Schedule, conv: Any, parts: int, m_inner: bool) -> tuple[Any, ...]:
    """Split-K: the reduction (`conv`'s third loop, after m and n) cut into `parts`
    slices, each reduced by its own blocks (blockIdx.z, bound by the caller) into a
    float32 partial sum, then summed with the epilogue by a second kernel
    (`_sum_partials`). For layers whose output has too few tiles to fill the SMs:
    C512 7x7 at batch 1 is 49 x 512 outputs, 16 blocks of 32 x 64 for 132 SMs. The
    partial sums are a buffer of the kernel, [parts, M, N] (M and N padded to the
    tile) or with `m_inner` [parts, N, M]: contiguous along the axis the partial
    blocks write along (their threadIdx.x) and the summing kernel reads along. It
    becomes the entry's `workspace` argument (`compute.workspace_as_argument`): a
    precompiled artifact cannot allocate device memory itself. Returns the partial
    block (to schedule as `conv` would have been), the summing block, the partial
    sums' buffer name and the partial block's loops (the slice, then `conv`'s)."""
    ks, _ = sch.split(sch.get_loops(conv)[2], [parts, None])
    m, n = sch.get_loops(conv)[:2]
    sch.reorder(ks, m, n)
    partial = sch.rfactor(ks, 0)
    if m_inner:
        sch.transform_layout(partial, ("write", 0), lambda s, i, j: (s, j, i))
    buffer = sch.get(partial).writes[0].source.name
    return (partial, conv, buffer, *sch.get_loops(partial))


def _sum_partials(sch: Schedule, total: Any, m_inner: bool) -> None:
    """The split-K sum (`_split_k`): one thread per output element adds its `parts`
    partial sums in order (deterministic, no atomics) and applies the epilogue;
    consecutive threads along m (`m_inner`) or n, the partial sums' contiguous axis."""
    ks, m, n = sch.get_loops(total)
    outer, inner = (n, m) if m_inner else (m, n)
    sch.reorder(outer, inner, ks)
    bx, tx = sch.split(sch.fuse(outer, inner), [None, SUM_THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    acc = sch.cache_write(total, 0, "local")
    sch.reverse_compute_at(acc, tx, preserve_unit_loops=True)
    _inline_consumer_chain(sch, acc)
    sch.decompose_reduction(total, ks)


def _igemm_packing(spec: ConvSpec, target: TargetInfo, knobs: IgemmKnobs) -> WeightPacking:
    """Bound weights packed with the output channels innermost (the weight's other axes
    in storage order): the GEMM's B operand stored [K, N], as the shared-memory tile
    holds it. Consecutive threads then load consecutive output channels of one
    reduction index, in vectors, where storage order (OIHW) puts R*S words between
    two channels of one tap: one 32-byte sector per thread instead of per eight."""
    return WeightPacking(lanes=spec.out_channels)


def _igemm_f32(
    func: PrimFunc, spec: ConvSpec, target: TargetInfo, knobs: IgemmKnobs
) -> Schedule | None:
    if spec.groups != 1 or _one_output_pixel(spec) or not _igemm_valid(knobs, target):
        return None
    split = bool(knobs.split_taps)
    M, N, K = spec.gemm_shape
    n_ko = _reduction_steps(spec, knobs)
    if n_ko % knobs.split_k:
        return None
    # a one-step reduction has nothing to overlap
    pipeline = knobs.stages > 1 and n_ko // knobs.split_k >= 2
    sch = new_schedule(func)
    conv = _normalize_gemm(sch, spec, split)
    if split:
        T = math.prod(spec.kernel_size)
        _pad_to(sch, conv, (M, N, T, spec.channels_per_group), (knobs.bm, knobs.bn, 1, knobs.bk))
        m, n, t, c = sch.get_loops(conv)
        co, ki = sch.split(c, [None, knobs.bk])
        ko = sch.fuse(t, co)
    else:
        _pad_to(sch, conv, (M, N, K), (knobs.bm, knobs.bn, knobs.bk))
        m, n, k = sch.get_loops(conv)
        ko, ki = sch.split(k, [None, knobs.bk])
    m_fast = not spec.channels_last
    total = None
    if knobs.split_k > 1:
        conv, total, partials, ks, m, n, ko, ki = _split_k(sch, conv, knobs.split_k,
                                                           m_inner=m_fast)
    m_threads, n_threads = knobs.bm // knobs.tm, knobs.bn // knobs.tn
    bm_, mt, mi = sch.split(m, [None, m_threads, knobs.tm])
    bn_, nt, ni = sch.split(n, [None, n_threads, knobs.tn])
    # threadIdx.x runs along the output's contiguous axis: pixels (channels-first)
    # or channels (channels-last)
    ty, tx = (nt, mt) if m_fast else (mt, nt)
    ty_n, tx_n = (n_threads, m_threads) if m_fast else (m_threads, n_threads)
    sch.reorder(bm_, bn_, ty, tx, ko, ki, mi, ni)
    sch.bind(bm_, "blockIdx.x")
    sch.bind(bn_, "blockIdx.y")
    sch.bind(ty, "threadIdx.y")
    sch.bind(tx, "threadIdx.x")

    # register accumulator, written back per thread: with the fused bias/cast epilogue,
    # or with split-K as the block's partial sums
    acc = sch.cache_write(conv, 0, "local")
    sch.reverse_compute_at(acc, tx, preserve_unit_loops=True)
    if total is None:
        _inline_consumer_chain(sch, acc)
    else:
        sch.bind(ks, "blockIdx.z")
        _sum_partials(sch, total, m_inner=m_fast)

    cl, v = spec.channels_last, knobs.vec
    a_vec = v if cl and spec.channels_per_group % v == 0 else 1
    stage = _SharedStage(conv, ko, 3 if split else 2, ty_n, tx_n, split, pipeline)
    # channels-first inputs are contiguous along the pixels: fetch with m innermost
    a_sh = stage.fetch(sch, 0, k_inner=cl, vec=a_vec)
    if reads_packed_weight(func):  # packed output channels innermost (`_igemm_packing`)
        b_sh = stage.fetch(sch, 1, k_inner=False, vec=v if N % v == 0 else 1)
    else:
        b_vec = a_vec if split else (v if K % v == 0 else 1)
        b_sh = stage.fetch(sch, 1, k_inner=True, vec=b_vec)
    _inline_producers(sch, a_sh)
    _inline_producers(sch, b_sh)

    # register fragments of A and B for one k step (vector loads from shared memory)
    for index, t in ((0, knobs.tm), (1, knobs.tn)):
        loc = sch.cache_read(conv, index, "local")
        sch.compute_at(loc, ki, preserve_unit_loops=True)
        inner = sch.get_loops(loc)[-1]
        if t in (2, 4):
            sch.vectorize(inner)
        elif t % 4 == 0:
            sch.vectorize(sch.split(inner, [None, 4])[1])
    sch.unroll(ki)
    sch.unroll(mi)
    sch.unroll(ni)
    if pipeline:
        # ko's children after lowering: A g->r, A r->s, B g->r, B r->s, compute.
        # Order: load tile k+1 into registers, compute tile k, store k+1 to shared.
        sch.annotate(ko, "software_pipeline_stage", [0, 0, 0, 0, 1])
        sch.annotate(ko, "software_pipeline_order", [0, 3, 1, 4, 2])
    sch.decompose_reduction(conv, ko)
    if total is not None:
        return new_schedule(workspace_as_argument(sch.mod[ENTRY], partials))
    return sch


# ---------------------------------------------------------------------------------------
# cuda_igemm_f16_tc
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorCoreKnobs:
    """wmma m16n16k16 tiles: the block has wm x wn warps, each warp computes fm x fn
    16x16 accumulator fragments (block tile 16*fm*wm x 16*fn*wn), kf: 16-deep K
    fragments per shared-memory stage (bk = 16*kf); vec: float16 elements per global
    load where the operand is contiguous along K (8 = 16 bytes); stages and split_k
    as for cuda_igemm_f32 (2: register-staged prefetch of the next K tile; slices of
    the reduction for layers whose output tiles leave SMs idle)."""

    wm: int = 2
    wn: int = 2
    fm: int = 2
    fn: int = 2
    kf: int = 2
    vec: int = 8
    stages: int = 2
    split_k: int = 1


def _tc_tiles(k: TensorCoreKnobs) -> tuple[int, int, int]:
    return 16 * k.fm * k.wm, 16 * k.fn * k.wn, 16 * k.kf


def _tc_valid(k: TensorCoreKnobs, target: TargetInfo) -> bool:
    if min(k.wm, k.wn, k.fm, k.fn, k.kf, k.vec, k.split_k) < 1 or k.stages not in (1, 2):
        return False
    warps = k.wm * k.wn
    if warps > 8 or k.fm * k.fn > 16:
        return False
    bm, bn, bk = _tc_tiles(k)
    # TVM 0.27: when an operand's shared tile is at least as large as the float32
    # accumulator tile, storage rewrite shares their memory and codegen fails
    # ("tvm_access_ptr element type must match"); keep the accumulator larger.
    if 2 * min(bm, bn) <= bk:
        return False
    threads = target.warp_size * warps
    if (bm * bk) % (threads * k.vec) or (bn * bk) % (threads * k.vec):
        return False
    smem = 2 * (bm + bn) * (bk + 8) + 4 * warps * (16 * k.fm) * (16 * k.fn + 4)
    return smem <= target.smem_per_block


def _tc_applies(spec: ConvSpec) -> bool:
    if spec.groups != 1 or spec.dtype != "float16":
        return False
    m, n, kk = spec.gemm_shape
    # padding M, N and K up to the 16-multiples costs more than it saves on tiny GEMMs
    return m >= 16 and n >= 16 and kk >= 16


def _tc_knobs(spec: ConvSpec, target: TargetInfo) -> TensorCoreKnobs | None:
    if not _tc_applies(spec) or _one_output_pixel(spec):
        return None
    if target.compute_capability < 70:  # wmma needs Volta or newer
        return None
    m, n, kk = spec.gemm_shape
    fn = 2 if n >= 64 else 1
    wn = 2 if n >= 32 * fn else 1
    # 128 x 64 block tiles where they still make two waves, else smaller ones
    big = m * n >= 2 * target.sm_count * 128 * 64
    fm, wm = (4, 2) if big else ((2, 2) if m >= 64 * 32 else (1, 2))
    kf = 2 if kk >= 32 else 1
    vec = 8
    preferred = (
        TensorCoreKnobs(wm, wn, fm, fn, kf, vec, 2),
        TensorCoreKnobs(wm, wn, fm, fn, kf, 4, 2),
        TensorCoreKnobs(wm, wn, fm, fn, kf, 1, 2),
        TensorCoreKnobs(2, 2, 2, 2, 2, 1, 2),
    )
    knobs = first_valid(preferred, lambda k: _tc_valid(k, target))
    if knobs is None:
        return None
    return dataclasses.replace(knobs, split_k=_tc_split_k(spec, target, knobs))


def _tc_steps(spec: ConvSpec, knobs: TensorCoreKnobs) -> int:
    """The shared-memory steps of cuda_igemm_f16_tc's reduction (bk deep each)."""
    return -(-spec.gemm_shape[2] // _tc_tiles(knobs)[2])


def _tc_split_k(spec: ConvSpec, target: TargetInfo, knobs: TensorCoreKnobs) -> int:
    bm, bn, _ = _tc_tiles(knobs)
    return _split_k_parts(spec, target, bm, bn, _tc_steps(spec, knobs))


def _tc_grid(spec: ConvSpec, target: TargetInfo) -> Iterator[TensorCoreKnobs]:
    if _tc_knobs(spec, target) is None:
        return
    for (wm, wn, fm, fn), kf, stages in itertools.product(
        [
            (2, 2, 2, 2),
            (2, 2, 4, 2),
            (2, 2, 2, 4),
            (4, 2, 2, 2),
            (2, 4, 2, 2),
            (2, 2, 4, 4),
            (4, 2, 2, 4),
            (2, 1, 2, 2),
            (1, 2, 2, 2),
            (2, 2, 1, 1),
        ],
        (1, 2, 4),
        (2, 1),
    ):
        if stages == 1 and (wm, wn, fm, fn) != (2, 2, 2, 2):
            continue
        for vec in (8, 4, 1):
            k = TensorCoreKnobs(wm, wn, fm, fn, kf, vec, stages)
            if _tc_valid(k, target):
                yield k
                parts = _tc_split_k(spec, target, k)
                if parts > 1:  # an under-filled GPU: the same tile with split-K too
                    yield dataclasses.replace(k, split_k=parts)
                break


def _tensorize_wmma(sch: Schedule, a_frag: Any, b_frag: Any, init: Any, store: Any,
                    compute: Any) -> bool:
    """Replace the 16x16 fragment loads, the accumulator's init and store and the
    16x16x16 multiply-add with wmma intrinsics (float16 in, float32 accumulators).
    False where a block does not match the wmma patterns."""
    from tvm.s_tir.tensor_intrin.cuda import get_wmma_intrin_group

    intrin = get_wmma_intrin_group(load_scope="shared", store_scope="shared",
                                   in_dtype="float16", out_dtype="float32", trans_b=True)
    try:
        for frag, name in ((a_frag, "load_a"), (b_frag, "load_b")):
            i, j = sch.get_loops(frag)[-2:]
            i0, i1 = sch.split(i, [None, 16])
            j0, j1 = sch.split(j, [None, 16])
            sch.reorder(i0, j0, i1, j1)
            sch.unroll(i0)
            sch.unroll(j0)
            sch.tensorize(i1, intrin[name])
        sch.tensorize(sch.get_loops(init)[-2], intrin["init"])
        sch.tensorize(sch.get_loops(store)[-2], intrin["store"])
        sch.tensorize(sch.get_loops(compute)[-3], intrin["compute"])
    except Exception:  # TVM raises a plain error when a pattern does not match
        return False
    return True


def _tc_load_vectors(spec: ConvSpec, vec: int) -> tuple[int, int]:
    """Elements per global load of the input and weight tiles: `vec` where the operand
    is contiguous along the reduction (channels-last input and weights; channels-first
    weights of a 1x1 conv), else 1."""
    cl, c = spec.channels_last, spec.channels_per_group
    a_vec = vec if cl and c % vec == 0 else 1
    k = spec.gemm_shape[2]
    b_vec = vec if (cl and c % vec == 0) or (
        not cl and k % vec == 0 and math.prod(spec.kernel_size) == 1) else 1
    return a_vec, b_vec


def _tc_stage(sch: Schedule, outer: Any, k0: Any, index: int, warps: int, vec: int,
              pipeline: bool) -> Any:
    """An operand's tile for reduction step k0 in shared memory, loaded by every warp of
    the block in vectors; rows padded by 8 halves against bank conflicts of the
    fragment loads."""
    blk = sch.cache_read(outer, index, "shared")
    sch.compute_at(blk, k0)
    fused = sch.fuse(*sch.get_loops(blk)[-2:])
    _, f1, f2, f3 = sch.split(fused, [None, warps, 32, vec])
    sch.bind(f2, "threadIdx.x")
    sch.bind(f1, "threadIdx.y")
    if vec > 1:
        sch.vectorize(f3)
    sch.storage_align(blk, 0, axis=-2, factor=16, offset=8)
    if pipeline:
        sch.annotate(blk, "tirx.manifest_shared_memory_local_stage", 1)
    return blk


def _igemm_f16_tc(
    func: PrimFunc, spec: ConvSpec, target: TargetInfo, knobs: TensorCoreKnobs
) -> Schedule | None:
    if not _tc_applies(spec) or _one_output_pixel(spec) or not _tc_valid(knobs, target):
        return None
    M, N, K = spec.gemm_shape
    bm, bn, bk = _tc_tiles(knobs)
    steps = _tc_steps(spec, knobs)
    if steps % knobs.split_k:
        return None
    pipeline = knobs.stages > 1 and steps // knobs.split_k >= 2
    warps = knobs.wm * knobs.wn
    sch = new_schedule(func)
    conv = _normalize_gemm(sch, spec, split_taps=False)
    _pad_to(sch, conv, (M, N, K), (bm, bn, bk))
    total = None
    if knobs.split_k > 1:
        # the partial sums [slice, M, N] as the fragments are stored: n contiguous
        conv, total, partials, ks, *_ = _split_k(sch, conv, knobs.split_k, m_inner=False)
        sch.bind(ks, "blockIdx.z")
    m, n, k = sch.get_loops(conv)[-3:]
    m, mi = sch.split(m, [None, 16])
    n, ni = sch.split(n, [None, 16])
    k, kii = sch.split(k, [None, 16])
    sch.reorder(m, n, k, mi, ni, kii)
    inner = conv
    outer = sch.blockize(mi)
    m0, m1, m2 = sch.split(m, [None, knobs.wm, knobs.fm])
    n0, n1, n2 = sch.split(n, [None, knobs.wn, knobs.fn])
    k0, k1 = sch.split(k, [None, knobs.kf])
    sch.reorder(m0, n0, m1, n1, k0, k1, m2, n2)
    sch.bind(m0, "blockIdx.x")
    sch.bind(n0, "blockIdx.y")
    warp = sch.fuse(m1, n1)
    sch.bind(warp, "threadIdx.y")

    a_vec, b_vec = _tc_load_vectors(spec, knobs.vec)
    a_sh = _tc_stage(sch, outer, k0, 0, warps, a_vec, pipeline)
    b_sh = _tc_stage(sch, outer, k0, 1, warps, b_vec, pipeline)
    _inline_producers(sch, a_sh)
    _inline_producers(sch, b_sh)

    a_frag = sch.cache_read(outer, 0, "wmma.matrix_a")
    b_frag = sch.cache_read(outer, 1, "wmma.matrix_b")
    sch.compute_at(a_frag, k1)
    sch.compute_at(b_frag, k1)
    acc_sh = sch.cache_write(outer, 0, "shared")
    sch.storage_align(acc_sh, 0, -2, 16, 4)
    store = sch.cache_write(outer, 0, "wmma.accumulator")
    sch.reverse_compute_at(store, warp)
    sch.reverse_compute_at(acc_sh, warp)
    i, j = sch.get_loops(store)[-2:]
    i0, i1 = sch.split(i, [None, 16])
    j0, j1 = sch.split(j, [None, 16])
    sch.reorder(i0, j0, i1, j1)
    init = sch.decompose_reduction(outer, k0)
    init_inner = sch.get_child_blocks(init)[0]

    if not _tensorize_wmma(sch, a_frag, b_frag, init_inner, store, inner):
        return None
    if total is None:
        _inline_consumer_chain(sch, acc_sh)  # the epilogue in the write-back
    fused = sch.fuse(*sch.get_loops(acc_sh)[-2:])
    _, f1, f2 = sch.split(fused, [None, 32, 4])
    sch.bind(f1, "threadIdx.x")
    sch.vectorize(f2)
    if pipeline:
        sch.annotate(k0, "software_pipeline_stage", [0, 0, 0, 0, 1])
        sch.annotate(k0, "software_pipeline_order", [0, 3, 1, 4, 2])
    if total is not None:
        _sum_partials(sch, total, m_inner=False)
        return new_schedule(workspace_as_argument(sch.mod[ENTRY], partials))
    return sch


# ---------------------------------------------------------------------------------------
# cuda_depthwise
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DepthwiseKnobs:
    """Each thread computes vc consecutive output channels x vw consecutive outputs
    along the innermost spatial axis, the float32 sums in registers; per tap row the
    input window ((vw-1)*stride + (S-1)*dilation + 1 values per channel) and the
    row's filter taps are loaded into registers once. threads: threads per block."""

    vw: int = 4
    vc: int = 1
    threads: int = 128


def _depthwise_ok(spec: ConvSpec) -> bool:
    return spec.is_depthwise and spec.channels_per_group == 1


def _depthwise_valid(spec: ConvSpec, k: DepthwiseKnobs, target: TargetInfo) -> bool:
    warp = target.warp_size
    if k.vw < 1 or k.vc < 1 or k.threads % warp or not warp <= k.threads <= 1024:
        return False
    if spec.out_channels % k.vc:
        return False
    mult = spec.out_channels_per_group
    if k.vc > 1 and mult > 1 and k.vc % mult:  # a thread's channels must cover whole groups
        return False
    # registers: accumulators + one row's input window and taps per channel
    s, d, sk = spec.stride[-1], spec.dilation[-1], spec.kernel_size[-1]
    window = (k.vw - 1) * s + (sk - 1) * d + 1
    return k.vc * (k.vw + window + sk) <= 96


def _depthwise_knobs(spec: ConvSpec, target: TargetInfo) -> DepthwiseKnobs | None:
    if not _depthwise_ok(spec):
        return None
    ow = spec.out_size[-1]
    if spec.channels_last:
        mult = spec.out_channels_per_group
        vc = 4 if spec.out_channels % 4 == 0 and mult == 1 else 1
        vw = 2 if ow % 2 == 0 else 1
    else:
        vc = 1
        vw = next((v for v in (4, 2) if ow % v == 0), 4 if ow >= 16 else 2)
    # keep every SM busy: shrink the block when there are few threads in all
    total = spec.batch * spec.out_channels * math.prod(spec.out_size) // (vw * vc)
    sms = target.sm_count
    threads = 256 if total >= 256 * sms * 2 else (128 if total >= 128 * sms else 64)
    preferred = (
        DepthwiseKnobs(vw, vc, threads),
        DepthwiseKnobs(vw, 1, threads),
        DepthwiseKnobs(1, 1, threads),
    )
    return first_valid(preferred, lambda k: _depthwise_valid(spec, k, target))


def _depthwise_grid(spec: ConvSpec, target: TargetInfo) -> Iterator[DepthwiseKnobs]:
    if _depthwise_knobs(spec, target) is None:
        return
    vcs = (1, 2, 4) if spec.channels_last else (1, 2)
    for vw, vc, t in itertools.product((1, 2, 4, 7, 8), vcs, (64, 128, 256)):
        k = DepthwiseKnobs(vw, vc, t)
        if _depthwise_valid(spec, k, target):
            yield k


def _depthwise(
    func: PrimFunc, spec: ConvSpec, target: TargetInfo, knobs: DepthwiseKnobs
) -> Schedule | None:
    if not _depthwise_ok(spec) or not _depthwise_valid(spec, knobs, target):
        return None
    nd = spec.ndim
    sch = new_schedule(func)
    conv = sch.get_sblock("conv")
    loops = sch.get_loops(conv)
    data_par, red = loops[: 2 + nd], loops[2 + nd :]
    if spec.channels_last:
        n, *sp, k = data_par
    else:
        n, k, *sp = data_par
    ko, ki = sch.split(k, [None, knobs.vc])
    wo, wi = sch.split(sp[-1], [None, knobs.vw])
    if spec.channels_last:  # channels fastest across threads: coalesced along C
        outer, inner = [n, *sp[:-1], wo, ko], [wi, ki]
    else:  # width fastest across threads
        outer, inner = [n, ko, *sp[:-1], wo], [ki, wi]
    sch.reorder(*outer, *red, *inner)
    bx, tx = sch.split(sch.fuse(*outer), [None, knobs.threads])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    acc = sch.cache_write(conv, 0, "local")
    sch.reverse_compute_at(acc, tx, preserve_unit_loops=True)
    if has_block(sch, "out"):
        sch.reverse_compute_inline(sch.get_sblock("out"))  # bias/cast in the write-back
    # one tap row's input window and filter taps in registers (loaded once, reused by
    # the vw x vc outputs); the padding becomes a guarded load into the window
    row = red[-2]
    win = sch.cache_read(conv, 0, "local")
    sch.compute_at(win, row, preserve_unit_loops=True)
    if has_block(sch, "pad"):
        sch.compute_inline(sch.get_sblock("pad"))
    wts = sch.cache_read(conv, 1, "local")
    sch.compute_at(wts, row, preserve_unit_loops=True)
    vectorize = spec.channels_last and knobs.vc in (2, 4) and spec.out_channels_per_group == 1
    for blk in (win, wts):
        for lp in loops_below(sch, blk, row):
            sch.unroll(lp)
    if vectorize:
        sch.vectorize(sch.get_loops(win)[-1])
    sch.unroll(red[-1])
    for lp in inner:
        sch.unroll(lp)
    sch.decompose_reduction(conv, red[0])
    return sch


# ---------------------------------------------------------------------------------------
# fallback
# ---------------------------------------------------------------------------------------


def fallback(func: PrimFunc, spec: ConvSpec, target: TargetInfo) -> Schedule:
    """One thread per output element, the float32 sum in a register. Correct for every spec."""
    from tvm import tirx

    sch = new_schedule(func)
    if has_block(sch, "pad"):
        sch.compute_inline(sch.get_sblock("pad"))
    conv = sch.get_sblock("conv")
    wb = sch.cache_write(conv, 0, "local")
    if has_block(sch, "out"):
        sch.reverse_compute_inline(sch.get_sblock("out"))
    loops = sch.get_loops(conv)
    n_spatial = sum(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(conv).iter_vars)
    bx, tx = sch.split(sch.fuse(*loops[:n_spatial]), [None, FALLBACK_THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.reverse_compute_at(wb, tx)
    sch.decompose_reduction(conv, sch.get_loops(conv)[2])
    return sch


def _dlight(func: PrimFunc, target: TargetInfo, rule: Any) -> Schedule | None:
    """`func` scheduled by one of TVM dlight's GPU rules (None: the rule declines)."""
    import tvm
    from tvm.s_tir import dlight as dl

    with target.tvm_target():
        mod = dl.ApplyDefaultSchedule(rule)(tvm.IRModule({ENTRY: func}))
    scheduled = mod[ENTRY]
    if not scheduled.attrs.get("tirx.is_scheduled", False):
        return None
    return new_schedule(scheduled)


@dataclass(frozen=True)
class DlightKnobs:
    """dlight's Matmul rule picks its own tiles from the target; nothing to set."""

    rule: str = "dlight.gpu.Matmul"


def _dlight_knobs(spec: ConvSpec, target: TargetInfo) -> DlightKnobs | None:
    # With groups the channel index is (k // Kg) * Cg + rc: not a GEMM operand.
    return DlightKnobs() if spec.groups == 1 else None


def _dlight_gemm(
    func: PrimFunc, spec: ConvSpec, target: TargetInfo, knobs: DlightKnobs
) -> Schedule | None:
    from tvm.s_tir import dlight as dl

    return _dlight(func, target, dl.gpu.Matmul())


@dataclass(frozen=True)
class GemvKnobs:
    """dlight's GEMV rule picks its own split of the rows from the target; nothing to
    set."""

    rule: str = "dlight.gpu.GEMV"


def _gemv_knobs(spec: ConvSpec, target: TargetInfo) -> GemvKnobs | None:
    return GemvKnobs() if spec.groups == 1 and _one_output_pixel(spec) else None


def _dlight_gemv(
    func: PrimFunc, spec: ConvSpec, target: TargetInfo, knobs: GemvKnobs
) -> Schedule | None:
    from tvm.s_tir import dlight as dl

    return _dlight(func, target, dl.gpu.GEMV())


def _no_grid(spec: ConvSpec, target: TargetInfo) -> Iterator[Any]:
    return iter(())  # nothing to vary: the heuristic's one point is the grid


GRID_CAP = 40  # candidates per template: the grids are sized for an offline GPU run

TEMPLATES: tuple[Template[Any], ...] = (
    Template("cuda_igemm_f16_tc", TensorCoreKnobs, _tc_knobs, _tc_grid, _igemm_f16_tc,
             max_candidates=GRID_CAP),
    Template("cuda_depthwise", DepthwiseKnobs, _depthwise_knobs, _depthwise_grid, _depthwise,
             max_candidates=GRID_CAP),
    Template("cuda_igemm_f32", IgemmKnobs, _igemm_f32_knobs, _igemm_f32_grid, _igemm_f32,
             packing=_igemm_packing, max_candidates=GRID_CAP),
    Template("cuda_dlight_gemv", GemvKnobs, _gemv_knobs, _no_grid, _dlight_gemv),
    Template("cuda_dlight_gemm", DlightKnobs, _dlight_knobs, _no_grid, _dlight_gemm),
)
FAMILY = Family("cuda", TEMPLATES, FALLBACK_NAME, fallback, packs_weights=True)
