"""ConvSpec -> unscheduled TVM PrimFunc (the algorithm; no schedule code here).

The PrimFunc has these blocks, which every schedule template relies on:

  "pad"   zero padding of `data` in its own layout (absent when all pads are 0)
  "conv"  the reduction over (rc, r0, r1, ...) in float32
  "out"   elementwise epilogue: + bias and/or cast to the output dtype
          (absent for float32 without bias, when "conv" writes the output)

Arguments, in order: data, weight[, bias], out (destination passing).

This is the only place where the two modes differ. True convolution reads the
kernel flipped, conv(I, K)[x] = sum_r I[x*s + r*d - p] * K[R-1-r]. Substituting
r -> R-1-r moves the flip to the input tap instead:

    conv(I, K)[x] = sum_r I[x*s + (R-1-r)*d - p] * K[r]

Both are index arithmetic, never a copy of the weights. We flip the input tap:
the weight is then read in storage order, so packing and vectorising it over
output channels is identical in both modes, and the input offset is a
loop-invariant affine shift that the schedules' tiling absorbs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from convgen.spec import ConvSpec

if TYPE_CHECKING:
    from tvm.tirx import PrimFunc

ENTRY = "convgen_main"


def conv_tensors(spec: ConvSpec) -> list[Any]:
    """The TE tensors [data, weight, (bias,) out] of the operator."""
    from tvm import te, tirx

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

    if any(spec.pads):
        pb = spec.pads_begin

        def pad_body(*idx: Any) -> Any:
            n, c, sp = split(idx)
            inside = [tirx.all(x >= b, x < b + size) for x, b, size in zip(sp, pb, spec.in_size)]
            src = data[join(n, c, tuple(x - b for x, b in zip(sp, pb)))]
            return tirx.if_then_else(tirx.all(*inside), src, tirx.const(0, dt))

        padded = te.compute(
            join(spec.batch, spec.in_channels, spec.padded_size), pad_body, name="pad"
        )
    else:
        padded = data

    cg, kg = spec.channels_per_group, spec.out_channels_per_group
    rc = te.reduce_axis((0, cg), name="rc")
    rs = [te.reduce_axis((0, r), name=f"r{i}") for i, r in enumerate(spec.kernel_size)]
    flip = spec.mode == "conv"

    def conv_body(*idx: Any) -> Any:
        n, k, sp = split(idx)
        c = rc if spec.groups == 1 else (k // kg) * cg + rc
        taps = tuple(
            x * s + ((r_ext - 1 - r) if flip else r) * d
            for x, r, r_ext, s, d in zip(sp, rs, spec.kernel_size, spec.stride, spec.dilation)
        )
        a = padded[join(n, c, taps)]
        w = weight[(k, *rs, rc) if cl else (k, rc, *rs)]
        if dt != acc:
            a, w = a.astype(acc), w.astype(acc)
        return te.sum(a * w, axis=[rc, *rs])

    out_shape = spec.out_shape
    conv = te.compute(out_shape, conv_body, name="conv")
    if bias is None and dt == acc:
        return [data, weight, conv]

    def epilogue(*idx: Any) -> Any:
        _, k, _ = split(idx)
        v = conv[idx]
        if bias is not None:
            b = bias[k]
            v = v + (b.astype(acc) if dt != acc else b)
        return v.astype(dt) if dt != acc else v

    out = te.compute(out_shape, epilogue, name="out")
    return [t for t in (data, weight, bias, out) if t is not None]


def conv_prim_func(spec: ConvSpec) -> PrimFunc:
    """The unscheduled PrimFunc, named `ENTRY`, marked as the module's global symbol."""
    from tvm import te

    return te.create_prim_func(conv_tensors(spec)).with_attr("global_symbol", ENTRY)
