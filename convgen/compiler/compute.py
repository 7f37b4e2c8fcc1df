"""ConvSpec -> unscheduled TVM PrimFunc (the algorithm; no schedule code here).

The PrimFunc has these blocks, which every schedule template relies on:

  "pad"   zero padding of `data` in its own layout (absent when all pads are 0)
  "conv"  the reduction over (rc, r0, r1, ...) in float32
  "out"   elementwise epilogue (`epilogue`): + bias, + residual, the activation,
          the cast to the output dtype, and the crop of a widened row (absent for
          float32 without any of them, when "conv" writes the output)

Arguments, in order: data, weight[, bias][, residual], out (destination passing);
`writing_into_residual` gives a scheduled kernel the form that writes its output
over the residual argument instead (`deploy`, where the residual has no later reader).
A depthwise-separable pair (`separable_tensors`, for `deploy`) is two such stages
in one PrimFunc, the first stage's blocks, weight and bias prefixed `dw_`.

Constant weights can be packed once (`convgen_pack`) into the layout a schedule
reads best, and run from there (`convgen_run_packed`): `pack_prim_func` and the
`Variant.packing` form of the conv, described by one `WeightPacking`.

This is the only place where the two modes differ. True convolution reads the
kernel flipped, conv(I, K)[x] = sum_r I[x*s + r*d - p] * K[R-1-r]. Substituting
r -> R-1-r moves the flip to the input tap instead:

    conv(I, K)[x] = sum_r I[x*s + (R-1-r)*d - p] * K[r]

Both are index arithmetic, never a copy of the weights. By default we flip the
input tap: the weight is then read in storage order, so packing and vectorising
it over output channels is identical in both modes, and the input offset is a
loop-invariant affine shift that the schedules' tiling absorbs. A schedule may
ask for another `Variant` of the same operator (see there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from convgen.compiler.targets import TargetInfo
from convgen.runtime.manifest import (  # the artifact contract names the entries
    ENTRY,
    PACK_ENTRY,
    PACKED_WEIGHT,
    RUN_PACKED_ENTRY,
)
from convgen.spec import ConvSpec

if TYPE_CHECKING:
    from tvm.tirx import PrimFunc

RESIDUAL = "residual"  # the residual argument's name (the pointwise stage's in a pair)
PACK_THREADS = 256  # threads per block of the GPU packing entry


@dataclass(frozen=True)
class WeightPacking:
    """The layout `convgen_pack` writes and `convgen_run_packed` reads.

    lanes > 1: output channels blocked innermost, [ceil(K/lanes), <the weight's
    other axes in storage order>, lanes], so a vector of `lanes` output channels is
    one contiguous load (what cpu_kvec otherwise repacks inside every call); where
    lanes do not divide K, the last block's extra channels are zeros
    (`Variant.channel_extra`). lanes 1: storage order. Either way `conv`'s flip is
    applied while packing, so the packed run computes cross-correlation: both modes
    run the same code.
    """

    lanes: int = 1
    winograd_tile: int = 0  # m > 0: Winograd's transformed weights U (`winograd.py`)

    @property
    def algorithm(self) -> str:
        """The algorithm that reads this form: "direct", or "winograd_f<m>" for
        F(m x m, 3 x 3) (the manifest's name, which verification's tolerance keys on)."""
        return f"winograd_f{self.winograd_tile}" if self.winograd_tile else "direct"


    def packed_shape(self, spec: ConvSpec) -> tuple[int, ...]:
        if self.winograd_tile:
            from convgen.compiler.winograd import packed_shape

            return packed_shape(spec, self.winograd_tile, self.lanes)
        k, *rest = spec.weight_shape
        if self.lanes == 1:
            return spec.weight_shape
        return (-(-k // self.lanes), *rest, self.lanes)

    def packed_index(self, spec: ConvSpec, k: Any, rest: tuple[Any, ...]) -> tuple[Any, ...]:
        """Where weight[k, *rest] (flip already applied) lives in the packed tensor."""
        if self.lanes == 1:
            return (k, *rest)
        return (k // self.lanes, *rest, k % self.lanes)


def algorithm_of(packing: WeightPacking | None) -> str:
    """A compiled module's algorithm: its packed form's (direct where it has none)."""
    return packing.algorithm if packing is not None else "direct"


@dataclass(frozen=True)
class Variant:
    """Equivalent ways to write the operator down, for schedules that need them (the
    default is what ONNX export, MetaSchedule and most templates see).

    flip_weight: `conv` reads the kernel reversed instead of the input tap. With the
        weight broadcast from memory (cpu_wvec) the input loads then come in the
        same order as in `corr`, and so does LLVM's register allocation.
    row_extra: compute the last spatial axis this many outputs wider (the input
        padded with zeros to match, `ConvSpec.widened`) and crop in "out", so a
        7-wide row fills one 8-lane vector: full-width loads instead of 7-lane
        ones that LLVM assembles piecewise.
    clamp_row: where the operator has no padding of its own, the widened outputs
        read the row's last input pixel again (the tap's index clamped) instead of
        zeros in a padded copy of the input: the crop drops them either way, and
        the copy is a pass over the whole input. For templates that broadcast the
        input (cpu_kvec), where a tap's clamped index is computed once per tile
        outside the reduction; a row vector (cpu_wvec) would become a gather.
    channel_extra: compute this many output channels more, on zero weights, and
        crop in "out" (ungrouped layers; depthwise ones on as many zero input
        channels, in "pad"), so vectors of output channels cover K where they do not
        divide it (ShuffleNet's 58 and 116 channels).
    packing: read the weight packed (the `convgen_run_packed` entry), flip included.
    flat_pixels: channels-last, compute each image's last two spatial axes as one
        flat axis of output pixels (H x W, then `row_extra` more, which repeat the
        last pixel) and unflatten in "out", so a tile of pixels runs across row
        ends where a window makes merging the rows themselves impossible
        (`ConvSpec.rows_merged` is for pointwise layers): a 7-wide row's 49 pixels
        as 2 x 5 on 50 rather than 2 x 4 on 8.
    (The measurements are in benchmarks/NOTES.md.)
    """

    flip_weight: bool = False
    row_extra: int = 0
    clamp_row: bool = False
    channel_extra: int = 0
    packing: WeightPacking | None = None
    flat_pixels: bool = False


def conv_tensors(spec: ConvSpec, variant: Variant = Variant()) -> list[Any]:
    """The TE tensors [data, weight, (bias,) (residual,) out] of the operator."""
    from tvm import te

    data = te.placeholder(spec.data_shape, spec.dtype, name="data")
    inputs, out = _conv_stage(spec, data, variant)
    return [data, *inputs, out]


def separable_tensors(depthwise: ConvSpec, pointwise: ConvSpec, depthwise_packing: WeightPacking,
                      pointwise_packing: WeightPacking, channel_extra: int = 0) -> list[Any]:
    """A depthwise layer and the 1 x 1 layer that reads it, as one operator (`deploy`'s
    depthwise-separable pairs): [data, dw weight, (dw bias,) weight, (bias,) (residual,)
    out], both weights packed. The depthwise stage's blocks are "dw_pad", "dw_conv" and
    "dw_out" (its epilogue), the pointwise stage's "conv" and "out", as in a single
    convolution: a schedule may place the first inside the second's loops."""
    from tvm import te

    data = te.placeholder(depthwise.data_shape, depthwise.dtype, name="data")
    first, mid = _conv_stage(depthwise, data, Variant(packing=depthwise_packing), prefix="dw_")
    # `channel_extra`: the 1 x 1 stage's output channels past K (zero weights, cropped
    # in "out"), where its vectors do not divide K
    second, out = _conv_stage(pointwise, mid, Variant(packing=pointwise_packing,
                                                      channel_extra=channel_extra))
    return [data, *first, *second, out]


def _conv_stage(spec: ConvSpec, data: Any, variant: Variant,
                prefix: str = "") -> tuple[list[Any], Any]:
    """The operator on the tensor `data`: (its other inputs [weight, (bias,) (residual)],
    its output tensor), blocks named "pad", "conv", "out" after `prefix`."""
    from tvm import te, tirx

    flat = variant.flat_pixels
    if flat and (not spec.channels_last or spec.ndim < 2):
        raise ValueError(f"{spec.name()}: flat pixels need a channels-last layer with two "
                         "or more spatial axes")
    # the spec the "pad" and "conv" blocks compute (flat pixels repeat the last one)
    wide = spec if flat else spec.widened(variant.row_extra)
    cl = spec.channels_last
    dt, acc = spec.dtype, spec.accum_dtype
    packing = variant.packing
    weight = (te.placeholder(spec.weight_shape, dt, name=f"{prefix}weight") if packing is None
              else te.placeholder(packing.packed_shape(spec), dt, name=f"{prefix}{PACKED_WEIGHT}"))
    bias = te.placeholder(spec.bias_shape, dt, name=f"{prefix}bias") if spec.bias else None
    residual = (te.placeholder(spec.out_shape, dt, name=prefix + RESIDUAL) if spec.residual
                else None)
    inputs = [t for t in (weight, bias, residual) if t is not None]

    def split(idx: tuple[Any, ...]) -> tuple[Any, Any, tuple[Any, ...]]:
        """layout index -> (n, c, spatial)."""
        if cl:
            return idx[0], idx[-1], tuple(idx[1:-1])
        return idx[0], idx[1], tuple(idx[2:])

    def join(n: Any, c: Any, sp: tuple[Any, ...]) -> tuple[Any, ...]:
        return (n, *sp, c) if cl else (n, c, *sp)

    extra = variant.channel_extra
    if extra and spec.groups != 1 and not spec.depthwise_like:
        raise ValueError(f"{spec.name()}: extra output channels need an ungrouped or a "
                         "depthwise layer")
    # (a depthwise layer's extra output channels read as many extra input channels)
    in_extra = extra if spec.depthwise_like else 0
    clamp = variant.clamp_row and bool(variant.row_extra) and not any(spec.pads) and not flat
    if (any(wide.pads) and not clamp) or in_extra:
        pb = spec.pads_begin

        def pad_body(*idx: Any) -> Any:
            n, c, sp = split(idx)
            inside = [tirx.all(x >= b, x < b + size) for x, b, size in zip(sp, pb, spec.in_size)]
            if in_extra:
                inside.append(c < spec.in_channels)
            src = data[join(n, c, tuple(x - b for x, b in zip(sp, pb)))]
            return tirx.if_then_else(tirx.all(*inside), src, tirx.const(0, dt))

        padded = te.compute(join(spec.batch, spec.in_channels + in_extra, wide.padded_size),
                            pad_body, name=f"{prefix}pad")
    else:
        padded = data

    if extra and packing is None:  # (packed weights hold the zeros already)
        k_all = spec.out_channels

        def zero_padded(k: Any, *rest: Any) -> Any:
            return tirx.if_then_else(k < k_all, weight[(k, *rest)], tirx.const(0, dt))

        weight_read = te.compute((k_all + extra, *spec.weight_shape[1:]), zero_padded,
                                 name=f"{prefix}weight_pad")
    else:
        weight_read = weight

    cg, kg = spec.channels_per_group, spec.out_channels_per_group
    rc = te.reduce_axis((0, cg), name="rc")
    rs = [te.reduce_axis((0, r), name=f"r{i}") for i, r in enumerate(spec.kernel_size)]
    flipped = spec.flipped_taps(tuple(rs))
    if spec.mode == "corr" or packing is not None:  # packed weights are flipped already
        in_taps, w_taps = rs, rs
    else:
        in_taps, w_taps = (rs, flipped) if variant.flip_weight else (flipped, rs)

    rows, cols = spec.out_size[-2:] if flat else (1, 1)

    def conv_body(*idx: Any) -> Any:
        n, k, sp = split(idx)
        if flat:
            p = tirx.min(sp[-1], rows * cols - 1)
            sp = (*sp[:-1], p // cols, p % cols)
        c = rc if spec.groups == 1 else (k // kg) * cg + rc
        taps = tuple(
            x * s + r * d for x, r, s, d in zip(sp, in_taps, spec.stride, spec.dilation)
        )
        if clamp:
            taps = (*taps[:-1], tirx.min(taps[-1], spec.in_size[-1] - 1))
        a = padded[join(n, c, taps)]
        rest = (*w_taps, rc) if cl else (rc, *w_taps)
        w = weight_read[(k, *rest) if packing is None else packing.packed_index(spec, k, rest)]
        if dt != acc:
            a, w = a.astype(acc), w.astype(acc)
        return te.sum(a * w, axis=[rc, *rs])

    n_out, _, sp_out = split(wide.out_shape)
    if flat:
        sp_out = (*sp_out[:-2], rows * cols + variant.row_extra)
    conv = te.compute(join(n_out, spec.out_channels + extra, sp_out), conv_body,
                      name=f"{prefix}conv")
    if (dt == acc and not variant.row_extra and not extra and not spec.has_epilogue
            and not flat):
        return inputs, conv  # (bias included in has_epilogue)

    def out_body(*idx: Any) -> Any:
        n, k, sp = split(idx)
        acc_idx = join(n, k, (*sp[:-2], sp[-2] * cols + sp[-1])) if flat else idx
        return epilogue(spec, conv[acc_idx], bias, residual, k, idx)

    return inputs, te.compute(spec.out_shape, out_body, name=f"{prefix}out")


def epilogue(spec: ConvSpec, acc: Any, bias: Any, residual: Any, k: Any,
             idx: tuple[Any, ...]) -> Any:
    """The output element from its accumulator (float32) at output index `idx`, output
    channel `k`: activation(acc + bias[k] + residual[idx]), cast to the output dtype.
    Every algorithm's "out" block computes this, so the fused epilogue is written once
    (`reference.py` and `onnx_export.py` hold the same order for numpy and ONNX)."""
    from tvm import tirx

    f32 = spec.accum_dtype

    def wide(t: Any) -> Any:
        return t if t.dtype == f32 else t.astype(f32)

    v = acc
    if bias is not None:
        v = v + wide(bias[k])
    if residual is not None:
        v = v + wide(residual[idx])

    def c(x: float) -> Any:
        return tirx.const(x, f32)

    if spec.activation == "relu":
        v = tirx.max(v, c(0.0))
    elif spec.activation == "relu6":
        v = tirx.min(tirx.max(v, c(0.0)), c(6.0))
    elif spec.activation == "silu":
        v = v * sigmoid(v)
    elif spec.activation == "hardswish":
        v = v * tirx.min(tirx.max(v + c(3.0), c(0.0)), c(6.0)) * c(1.0 / 6.0)
    return v if spec.dtype == f32 else v.astype(spec.dtype)


# Cephes' expf: exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 (ln 2 split in
# two constants, so r stays exact), exp(r) by a degree-7 polynomial on |r| <= ln2 / 2
# (relative error about 1e-7); x clamped to where 2^n is a normal float32.
_EXP_RANGE = (-87.3, 88.3)
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
             1.6666665459e-1, 5.0000001201e-1)


def exp(x: Any) -> Any:
    """exp of a float32 expression in vector arithmetic. LLVM has no vector exp on the
    CPU without a vector math library, so TIR's exp (and sigmoid) becomes a call to
    expf for every lane: a 1x1 C16 112x112 K96 layer with the SiLU epilogue ran 3.15
    ms in EfficientNet-B0, the same layer with ReLU6 0.36 in MobileNetV2 (Zen 4,
    benchmarks/NOTES.md)."""
    from tvm import tirx

    def c(v: float) -> Any:
        return tirx.const(v, "float32")

    clamped = tirx.min(tirx.max(x, c(_EXP_RANGE[0])), c(_EXP_RANGE[1]))
    n = tirx.floor(clamped * c(1.4426950408889634) + c(0.5))
    r = clamped - n * c(_LN2_HI) - n * c(_LN2_LO)
    p = c(_EXP_POLY[0])
    for coef in _EXP_POLY[1:]:
        p = p * r + c(coef)
    two_n = tirx.reinterpret("float32", (n.astype("int32") + 127) << 23)
    # NaN in, NaN out, as expf (the clamp would make it a number); a select, which
    # vectorizes (if_then_else with a per-lane condition is scalarized)
    return tirx.Select(tirx.isnan(x), x, (p * r * r + r + c(1.0)) * two_n)


def sigmoid(x: Any) -> Any:
    """1 / (1 + exp(-x)) of a float32 expression, in vector arithmetic (`exp`)."""
    from tvm import tirx

    one = tirx.const(1.0, "float32")
    return one / (one + exp(-x))


def argument_alignment(spec: ConvSpec, target: TargetInfo) -> int:
    """The byte alignment the entry declares (and checks) for its arguments' data.

    CPU: the element only (4 bytes for float32), not TVM's default 64: numpy gives
    16-byte aligned arrays, and a kernel that assumed 64 would make every call copy
    them. LLVM then emits unaligned vector loads and stores, which cost the same as
    aligned ones when the data happens to be aligned (x86-64 since Nehalem,
    AArch64); scratch buffers inside the kernel keep 64. CUDA: 64, as device
    allocations are 256-byte aligned and the CUDA templates' vector loads rely on it.
    """
    return 64 if target.is_cuda else spec.element_bytes


def conv_prim_func(spec: ConvSpec, target: TargetInfo, variant: Variant = Variant()) -> PrimFunc:
    """The unscheduled PrimFunc, marked as the module's `ENTRY` (`RUN_PACKED_ENTRY`
    for the packed variant), its arguments declared `argument_alignment`-aligned."""
    from tvm import te

    name = ENTRY if variant.packing is None else RUN_PACKED_ENTRY
    return _entry(te.create_prim_func(conv_tensors(spec, variant)), spec, target, name)


def winograd_prim_func(spec: ConvSpec, target: TargetInfo, tile: int, lanes: int,
                       packed: bool) -> PrimFunc:
    """Winograd F(tile x tile, 3 x 3) (`winograd.py`): the plain entry, or with `packed`
    the run-packed one, on U as `WeightPacking(lanes, tile)` lays it out."""
    from tvm import te

    from convgen.compiler.winograd import winograd_tensors

    name = RUN_PACKED_ENTRY if packed else ENTRY
    return _entry(te.create_prim_func(winograd_tensors(spec, tile, lanes, packed)), spec,
                  target, name)


def separable_prim_func(depthwise: ConvSpec, pointwise: ConvSpec, target: TargetInfo,
                        depthwise_packing: WeightPacking, pointwise_packing: WeightPacking,
                        channel_extra: int = 0) -> PrimFunc:
    """The depthwise-separable pair (`separable_tensors`) as a run-packed entry."""
    from tvm import te

    tensors = separable_tensors(depthwise, pointwise, depthwise_packing, pointwise_packing,
                                channel_extra)
    return _entry(te.create_prim_func(tensors), pointwise, target, RUN_PACKED_ENTRY)


def writing_into_residual(func: PrimFunc) -> PrimFunc:
    """A kernel (scheduled or not) with `out` dropped from its arguments and declared
    a view of the residual's memory: the same code, its output written over the
    residual (Relax's call_tir_inplace). Sound for every schedule: "out" is the
    element-wise epilogue, so each output element is computed from the residual
    element at its own index alone, read in the same statement that writes it."""
    from tvm import tirx

    *rest, residual, out = func.params
    if residual.name != RESIDUAL or out.name != "out":
        raise ValueError(f"not a kernel with a residual: {[p.name for p in func.params]}")
    body = tirx.SeqStmt([tirx.DeclBuffer(out, data=residual.data), func.body])
    return tirx.PrimFunc([*rest, residual], body, func.ret_type, func.attrs)


def workspace_as_argument(func: PrimFunc, buffer: str) -> PrimFunc:
    """A scheduled kernel with its intermediate buffer `buffer` (global memory) made its
    last argument, after `out`: the workspace the manifest declares and the caller
    allocates, since a CUDA artifact's host code cannot allocate device memory. The
    kernel reads only what it wrote into it in the same call, so its contents between
    calls do not matter and one allocation serves every call of a kernel."""
    from tvm import s_tir, tirx

    realize = func.body
    root = realize.block
    found = [b for b in root.alloc_buffers if b.name == buffer]
    if len(found) != 1:
        raise ValueError(f"no intermediate buffer {buffer!r} in {func.attrs['global_symbol']}")
    kept = [b for b in root.alloc_buffers if b.name != buffer]
    block = s_tir.SBlock(root.iter_vars, root.reads, root.writes, root.name_hint, root.body,
                         root.init, kept, root.match_buffers, root.annotations)
    body = s_tir.SBlockRealize(realize.iter_values, realize.predicate, block)
    return tirx.PrimFunc([*func.params, found[0]], body, func.ret_type, func.attrs)


def reads_packed_weight(func: PrimFunc) -> bool:
    """Whether a conv PrimFunc is the packed variant (its schedule must not repack)."""
    return any(param.name == PACKED_WEIGHT for param in func.params)


def pack_tensors(spec: ConvSpec, packing: WeightPacking) -> list[Any]:
    """[weight, packed]: the weights in `packing`'s layout, flipped for `conv`."""
    from tvm import te, tirx

    weight = te.placeholder(spec.weight_shape, spec.dtype, name="weight")
    axes = spec.weight_window_axes

    def source(idx: tuple[Any, ...]) -> tuple[Any, ...]:
        """packed index (storage order, unblocked) -> weight index, flipped for conv."""
        if spec.mode == "corr":
            return idx
        taps = spec.flipped_taps(idx[axes[0] : axes[-1] + 1])
        return (*idx[: axes[0]], *taps, *idx[axes[-1] + 1 :])

    def body(*idx: Any) -> Any:
        if packing.lanes == 1:
            return weight[source(idx)]
        kb, *rest, lane = idx
        k = kb * packing.lanes + lane
        value = weight[source((k, *rest))]
        if spec.out_channels % packing.lanes:  # the last block's extra channels: zeros
            return tirx.if_then_else(k < spec.out_channels, value, tirx.const(0, spec.dtype))
        return value

    packed = te.compute(packing.packed_shape(spec), body, name="pack")
    return [weight, packed]


def pack_prim_func(spec: ConvSpec, target: TargetInfo, packing: WeightPacking) -> PrimFunc:
    """`PACK_ENTRY`(weight, packed). It runs once per set of weights, so its schedule
    only has to be reasonable: on the CPU the outermost axis in parallel and the
    lanes vectorized; on the GPU one thread per packed element, consecutive threads
    writing consecutive elements."""
    import tvm
    from tvm import s_tir, te

    if packing.winograd_tile:
        from convgen.compiler import winograd

        tensors = winograd.pack_tensors(spec, packing.winograd_tile, packing.lanes)
    else:
        tensors = pack_tensors(spec, packing)
    func = _entry(te.create_prim_func(tensors), spec, target, PACK_ENTRY)
    sch = s_tir.Schedule(tvm.IRModule({PACK_ENTRY: func}))
    sch.work_on(PACK_ENTRY)
    block = sch.get_sblock("wino_u" if packing.winograd_tile else "pack")
    if packing.winograd_tile:  # U's rows: recomputed per value of U, from 3 taps each
        sch.compute_inline(sch.get_sblock("wino_gg"))
    loops = sch.get_loops(block)
    if target.is_cuda:
        if packing.winograd_tile:
            raise ValueError("Winograd's packed weights are a CPU form")
        bx, tx = sch.split(sch.fuse(*loops), [None, PACK_THREADS])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        return sch.mod[PACK_ENTRY]
    sch.parallel(loops[0])
    if packing.lanes > 1 and not packing.winograd_tile:
        # by the vector (a CUDA kernel's layout, packed here for a deployed model, may
        # put all its output channels innermost: a loop of 1280 LLVM would unroll whole)
        width = target.fp32_lanes
        if packing.lanes <= width:
            sch.vectorize(loops[-1])
        elif packing.lanes % width == 0:
            sch.vectorize(sch.split(loops[-1], [None, width])[1])
    return sch.mod[PACK_ENTRY]


def _entry(func: PrimFunc, spec: ConvSpec, target: TargetInfo, name: str) -> PrimFunc:
    align = argument_alignment(spec, target)
    if align != 64:  # TVM's default
        func = align_arguments(func, align)
    return func.with_attr("global_symbol", name)


def align_arguments(func: PrimFunc, align: int) -> PrimFunc:
    """The same PrimFunc with its argument buffers declared `align`-byte aligned.
    TVM 0.27's PrimFunc.specialize refuses to change a buffer's alignment, so the
    function goes through its TVMScript form, where arguments are
    `T.Buffer(shape, dtype, **fields)` annotations in the signature (fields such as
    `elem_offset=n`, which TOPI's scatter operators declare)."""
    import re

    import tvm

    head, sep, body = func.script().partition("):\n")
    # a shape's dimensions are ints, or T.int64(n) in functions Relax legalized
    shape = r"\((?:[^()]|\([^()]*\))*\)"
    fields = rf"(?:, \w+=(?:[^(),]|{shape})+)*"  # (strides=(T.int64(5), 1), ...)

    def aligned_buffer(m: re.Match[str]) -> str:
        return f"{m[1]}{re.sub(r', align=[0-9]+', '', m[2])}, align={align})"

    head = re.sub(rf'(T\.Buffer\({shape}, "[a-z]+[0-9]*")({fields})\)', aligned_buffer, head)
    aligned: PrimFunc = tvm.script.from_source(head + sep + body)
    buffers = [p.ty for p in aligned.params if hasattr(p.ty, "data_alignment")]
    if not buffers or any(b.data_alignment != align for b in buffers):
        raise RuntimeError(f"TVMScript signature not understood: {head!r}")  # a TVM change
    return aligned
