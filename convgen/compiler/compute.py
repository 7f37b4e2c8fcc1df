"""ConvSpec -> unscheduled TVM PrimFunc (the algorithm; no schedule code here).

The PrimFunc has these blocks, which every schedule template relies on:

  "pad"   zero padding of `data` in its own layout (absent when all pads are 0)
  "conv"  the reduction over (rc, r0, r1, ...) in float32
  "out"   elementwise epilogue: + bias and/or cast to the output dtype, and the
          crop of a widened row (absent for float32 without bias or widening,
          when "conv" writes the output)

Arguments, in order: data, weight[, bias], out (destination passing).

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
from convgen.runtime.manifest import ENTRY  # the artifact contract names the entry function
from convgen.spec import ConvSpec

if TYPE_CHECKING:
    from tvm.tirx import PrimFunc


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
    (The measurements are in benchmarks/NOTES.md.)
    """

    flip_weight: bool = False
    row_extra: int = 0


def conv_tensors(spec: ConvSpec, variant: Variant = Variant()) -> list[Any]:
    """The TE tensors [data, weight, (bias,) out] of the operator."""
    from tvm import te, tirx

    wide = spec.widened(variant.row_extra)  # the spec the "pad" and "conv" blocks compute
    cl = spec.channels_last
    dt, acc = spec.dtype, spec.accum_dtype
    data = te.placeholder(spec.data_shape, dt, name="data")
    weight = te.placeholder(spec.weight_shape, dt, name="weight")
    bias = te.placeholder(spec.bias_shape, dt, name="bias") if spec.bias else None

    def split(idx: tuple[Any, ...]) -> tuple[Any, Any, tuple[Any, ...]]:
        """layout index -> (n, c, spatial)."""
        if cl:
            return idx[0], idx[-1], tuple(idx[1:-1])
        return idx[0], idx[1], tuple(idx[2:])

    def join(n: Any, c: Any, sp: tuple[Any, ...]) -> tuple[Any, ...]:
        return (n, *sp, c) if cl else (n, c, *sp)

    if any(wide.pads):
        pb = spec.pads_begin

        def pad_body(*idx: Any) -> Any:
            n, c, sp = split(idx)
            inside = [tirx.all(x >= b, x < b + size) for x, b, size in zip(sp, pb, spec.in_size)]
            src = data[join(n, c, tuple(x - b for x, b in zip(sp, pb)))]
            return tirx.if_then_else(tirx.all(*inside), src, tirx.const(0, dt))

        padded = te.compute(
            join(spec.batch, spec.in_channels, wide.padded_size), pad_body, name="pad"
        )
    else:
        padded = data

    cg, kg = spec.channels_per_group, spec.out_channels_per_group
    rc = te.reduce_axis((0, cg), name="rc")
    rs = [te.reduce_axis((0, r), name=f"r{i}") for i, r in enumerate(spec.kernel_size)]
    flipped = tuple(r_ext - 1 - r for r, r_ext in zip(rs, spec.kernel_size))
    if spec.mode == "corr":
        in_taps, w_taps = rs, rs
    else:
        in_taps, w_taps = (rs, flipped) if variant.flip_weight else (flipped, rs)

    def conv_body(*idx: Any) -> Any:
        n, k, sp = split(idx)
        c = rc if spec.groups == 1 else (k // kg) * cg + rc
        taps = tuple(
            x * s + r * d for x, r, s, d in zip(sp, in_taps, spec.stride, spec.dilation)
        )
        a = padded[join(n, c, taps)]
        w = weight[(k, *w_taps, rc) if cl else (k, rc, *w_taps)]
        if dt != acc:
            a, w = a.astype(acc), w.astype(acc)
        return te.sum(a * w, axis=[rc, *rs])

    conv = te.compute(wide.out_shape, conv_body, name="conv")
    if bias is None and dt == acc and not variant.row_extra:
        return [data, weight, conv]

    def epilogue(*idx: Any) -> Any:
        _, k, _ = split(idx)
        v = conv[idx]
        if bias is not None:
            b = bias[k]
            v = v + (b.astype(acc) if dt != acc else b)
        return v.astype(dt) if dt != acc else v

    out = te.compute(spec.out_shape, epilogue, name="out")
    return [t for t in (data, weight, bias, out) if t is not None]


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
    """The unscheduled PrimFunc, named `ENTRY`, marked as the module's global symbol,
    its arguments declared `argument_alignment`-aligned."""
    from tvm import te

    func = te.create_prim_func(conv_tensors(spec, variant))
    align = argument_alignment(spec, target)
    if align != 64:  # TVM's default
        func = _align_arguments(func, align)
    return func.with_attr("global_symbol", ENTRY)


def _align_arguments(func: PrimFunc, align: int) -> PrimFunc:
    """The same PrimFunc with its argument buffers declared `align`-byte aligned.
    TVM 0.27's PrimFunc.specialize refuses to change a buffer's alignment, so the
    function goes through its TVMScript form, where arguments are
    `T.Buffer(shape, dtype)` annotations in the signature."""
    import re

    import tvm

    head, sep, body = func.script().partition("):\n")
    head = re.sub(r'(T\.Buffer\(\([0-9, ]*\), "float(?:32|16)")\)', rf"\1, align={align})", head)
    aligned: PrimFunc = tvm.script.from_source(head + sep + body)
    if any(param.ty.data_alignment != align for param in aligned.params):
        raise RuntimeError(f"TVMScript signature not understood: {head!r}")  # a TVM change
    return aligned
