"""A whole ONNX model -> one deployable module whose convolutions are convgen's kernels.

The pipeline (TVM Relax):

  1. `from_onnx`, the initializers as constants; BatchNorm and friends decomposed.
  2. The activations' layout for the whole graph: channels-last converts every
     convolution to NHWC (NWC, NDHWC) with OHWI weights, and Relax's ConvertLayout
     carries the layout through the element-wise and pooling operators between
     them, so the only transposes left are at the model's edges (the weights'
     are folded into the constants).
  3. `_ConvFuser`: every convolution with constant weights, with the operators
     that follow it and only read it (+, -, *, / by per-channel constants: a
     bias, an unfolded BatchNorm; + a residual tensor; then ReLU, ReLU6, SiLU or
     HardSwish),
     becomes one call of a convgen kernel for that spec, with
     its epilogue fused (`ConvSpec.residual`, `.activation`): the run-packed
     entry, scheduled by the chooser (a tuned record where the library has one),
     on weights packed at build time (`conv`'s flip included), so a deployment
     never packs at all. A matmul by constant weights (ONNX Gemm, MatMul: the
     classifier) runs the same way, as the 1 x 1 convolution it is.
  4. The other operators: legalized to TIR, fused (FuseOps/FuseTIR), and given
     a generic CPU schedule (`schedule/model_ops.py`; TVM's GPU rules for CUDA
     models); Relax's default CPU pipeline would leave them unscheduled.
  5. `tvm.compile` to a Relax VM executable, exported as one shared library that
     needs TVM's runtime library (and its CUDA part, for CUDA models), not its
     compiler (`runtime/model.py`).

ONNX's Conv is cross-correlation; `mode="conv"` compiles every convolution as a
true convolution of the model's weights (weights trained where convolution
flips, as DSP code and the seed documents' porting mistake have it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from convgen.compiler.build import lower, workspace_of
from convgen.compiler.compute import (
    WeightPacking,
    align_arguments,
    pack_prim_func,
    writing_into_residual,
)
from convgen.compiler.onnx_shapes import fold_shape_arithmetic
from convgen.compiler.records import find_record
from convgen.compiler.schedule import cpu, separable
from convgen.compiler.targets import TargetInfo, resolve_target
from convgen.errors import ArgumentError, ConvgenError, SpecError, UnsupportedError, tvm_reason
from convgen.runtime.manifest import (
    PACK_ENTRY,
    RUN_PACKED_ENTRY,
    SUFFIX,
    ModelLayer,
    ModelManifest,
    ScheduleChoice,
    TensorInfo,
)
from convgen.spec import (
    CHANNELS_FIRST,
    CHANNELS_LAST,
    MODES,
    ConvSpec,
    TapRegion,
    make_spec,
    pin_input_shapes,
)

if TYPE_CHECKING:
    import onnx
    from tvm import IRModule, relax

LAYOUTS = ("channels-last", "channels-first")
# Relax's convolution operators and their spatial rank
CONV_OPS = {"relax.nn.conv1d": 1, "relax.nn.conv2d": 2, "relax.nn.conv3d": 3}
# the weight layout that goes with each activation layout (convgen's: spec.py)
WEIGHT_LAYOUTS = {"NCW": "OIW", "NCHW": "OIHW", "NCDHW": "OIDHW",
                  "NWC": "OWI", "NHWC": "OHWI", "NDHWC": "ODHWI"}
TRANSPOSED_CONV_LAYOUTS = {"relax.nn.conv1d_transpose": ["NCW", "IOW"],
                           "relax.nn.conv2d_transpose": ["NCHW", "IOHW"],
                           "relax.nn.conv3d_transpose": ["NCDHW", "IODHW"]}
CONV_OPS_KEY = "conv"
DENSE_OP = "relax.matmul"  # by constant weights: a 1 x 1 convolution (`_Chain.dense`)
OPAQUE = 8  # Relax's OpPatternKind kOpaque: FuseOps fuses nothing into a convgen kernel
# A layer runs split into its tap regions where that saves this share of its
# multiply-adds at least (`_ConvFuser._regions`); each box is a kernel call of its own,
# rereading its taps' weights.
REGIONS_SAVE = 0.25


@dataclass(frozen=True)
class DeployOptions:
    mode: str = "corr"  # how to read the model's Conv nodes: "corr" (ONNX) or "conv"
    layout: str = "channels-last"  # the activations' layout between layers (LAYOUTS)
    algorithm: str = "auto"  # the chooser's algorithm for every convolution
    library: Path | None = None  # the record library (None: the shipped one)
    separable: bool = True  # a depthwise layer and the 1 x 1 reading it: one kernel

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SpecError(f"mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if self.layout not in LAYOUTS:
            raise SpecError(f"layout: {self.layout!r} is not one of {', '.join(LAYOUTS)}")


@dataclass
class CompiledModel:
    name: str
    lib: Any  # the Relax VM executable
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    layers: list[ModelLayer]
    other_ops: list[str]
    seconds: dict[str, float] = field(default_factory=dict)


def read_model(path: str | Path, shapes: Mapping[str, tuple[int, ...]] | None = None
               ) -> onnx.ModelProto:
    """The ONNX model, its dynamic input dimensions fixed by `shapes` (input name ->
    dims, `spec.pin_input_shapes`), with every shape inferred; bad files, and inputs or
    outputs left without a static shape, are one clear error."""
    import onnx
    from onnx import shape_inference

    try:
        model = onnx.load(str(path))
    except Exception as err:  # onnx raises several unrelated types
        raise SpecError(f"model: cannot read ONNX model {path}: {err}") from None
    if not model.graph.node and not model.graph.output:
        # (protobuf reads an empty file, and some others, as an empty message)
        raise SpecError(f"model: {path} holds no ONNX graph (empty, or not an ONNX file)")
    model = pin_input_shapes(model, shapes or {})
    try:
        # (data_prop: shapes computed from shapes, an exporter's x.view(x.size(0), -1)
        # as Shape -> Gather -> Concat -> Reshape, are followed to their values)
        model = shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as err:
        raise SpecError(f"model: cannot read ONNX model {path}: {err}") from None
    model_io(model)  # (static shapes, checked before anything is imported)
    return model


def model_io(model: onnx.ModelProto) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """The model's inputs (initializers excluded) and outputs, with static shapes."""
    import onnx

    inits = {t.name for t in model.graph.initializer}

    def info(vi: Any, what: str) -> TensorInfo:
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if any(d <= 0 for d in dims):
            # (inputs are read first: an output without one has static inputs)
            fix = (f"fix it with --shape {vi.name}=DIMS" if what == "input" else
                   "with every input's shape fixed, ONNX's shape inference cannot tell "
                   "it: it depends on the data, or passes an operator inference does "
                   "not see through (Compress, sequences); deploy needs static shapes")
            raise UnsupportedError(f"model: {what} {vi.name!r} has no static shape "
                                   f"({dims}); {fix}")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        return TensorInfo(vi.name, tuple(dims), dtype)

    inputs = [info(vi, "input") for vi in model.graph.input if vi.name not in inits]
    return inputs, [info(vi, "output") for vi in model.graph.output]


def _where_shapes_end(model: onnx.ModelProto) -> str:
    """For a failure's message: the first node, in graph order, that reads tensors of
    static shapes and makes one that ONNX's shape inference leaves without (Compress,
    a sequence operator), where TVM's passes fail on what follows it with reasons of
    their own ("" where every tensor has a static shape). Not a refusal by itself:
    TVM folds some shape arithmetic that inference does not follow."""
    graph = model.graph
    static = {t.name for t in graph.initializer}
    for vi in (*graph.input, *graph.value_info, *graph.output):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape") and all(
                d.HasField("dim_value") and d.dim_value > 0 for d in dims):
            static.add(vi.name)
    for node in graph.node:
        if all(not i or i in static for i in node.input):
            for out in node.output:
                if out and out not in static:
                    return (f" (the first tensor without a static shape is {out!r}, from "
                            f"{node.op_type} node {node.name or out!r}: ONNX's shape "
                            "inference cannot tell it, and deploy needs static shapes)")
    return ""


def compile_model(model: onnx.ModelProto, name: str, target: TargetInfo,
                  options: DeployOptions) -> CompiledModel:
    import tvm
    from tvm import relax

    from convgen.compiler.schedule.model_ops import schedule_model_ops, schedule_model_ops_gpu

    inputs, outputs = model_io(model)
    t0 = time.perf_counter()
    mod = _relax_module(model, name, options)
    t1 = time.perf_counter()
    mod, layers = _ConvFuser.run(mod, target, options, _node_names(model))
    if options.mode == "conv":
        mod = _flip_other_convolutions(mod)
    mod = _batch_norms_as_scale_and_shift(mod)
    t2 = time.perf_counter()
    with target.tvm_target():
        mod = tvm.transform.Sequential([
            relax.transform.LegalizeOps(None if target.is_cuda else _vector_math()),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
        ])(mod)
        mod = _outputs_in_their_own_memory(mod)  # (after FoldConstant, which folds copies)
        mod = tvm.transform.Sequential([
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            relax.transform.DeadCodeElimination(),
            schedule_model_ops_gpu() if target.is_cuda else schedule_model_ops(),
        ])(mod)
    kernels = {layer.kernel for layer in layers}
    if not target.is_cuda:
        mod = _inputs_at_element_alignment(mod, kernels)
    other_ops = sorted(gv.name_hint for gv, f in mod.functions.items()
                       if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint not in kernels)
    t3 = time.perf_counter()
    try:
        with _device_code_by_nvcc(target):
            lib = tvm.compile(mod, target=target.tvm_target(model=True))
    except Exception as err:
        raise UnsupportedError(f"model: TVM could not compile {name}: "
                               f"{tvm_reason(err)}{_where_shapes_end(model)}") from None
    t4 = time.perf_counter()
    return CompiledModel(name, lib, inputs, outputs, layers, other_ops, seconds={
        "import": t1 - t0, "kernels": t2 - t1, "other_ops": t3 - t2, "tvm_compile": t4 - t3})


def _aliases(main: relax.Function) -> tuple[dict[Any, Any], list[Any]]:
    """main's bindings (var -> value), and the variables that hold a model input or a
    view of one (the inputs themselves, their copies by name, a builtin's result on
    them: a reshape's view; a tuple's field that is one)."""
    import tvm
    from tvm import relax

    call_tir = tvm.ir.Op.get("relax.call_tir")
    bound: dict[Any, Any] = {}
    held: list[relax.Var] = list(main.params)

    def reads_input(args: Any) -> bool:
        return any(isinstance(a, relax.Var) and any(a.same_as(h) for h in held) for a in args)

    def field(value: Any) -> Any:
        """A tuple's field, read by index, where the tuple is a literal one."""
        tup = value.tuple_value
        while isinstance(tup, relax.Var) and isinstance(bound.get(tup), relax.Var | relax.Tuple):
            tup = bound[tup]
        return tup.fields[value.index] if isinstance(tup, relax.Tuple) else None

    for block in main.body.blocks:
        for binding in block.bindings:
            value = bound[binding.var] = binding.value
            if (isinstance(value, relax.Var) and reads_input([value])) or (
                    isinstance(value, relax.Call) and not value.op.same_as(call_tir)
                    and reads_input(value.args)) or (
                    isinstance(value, relax.TupleGetItem) and reads_input([field(value)])):
                held.append(binding.var)
    return bound, held


def _outputs_in_their_own_memory(mod: IRModule) -> IRModule:
    """Every output in memory of its own: an output the model computes nothing for (a
    constant, as detection models return their anchors; a model input, or a view of
    one) would come back as the VM's constant tensor or the caller's own array, so a
    caller writing into its result would change the model's constant for every later
    call, or its input. Those outputs are copied (a generic element-wise function,
    scheduled with the other operators); onnxruntime also returns fresh arrays."""
    import tvm
    from tvm import relax, te

    main = mod["main"]
    bound, held = _aliases(main)

    constant = tvm.ir.expr.Constant

    def borrowed(e: Any) -> bool:
        while isinstance(e, relax.Var) and isinstance(bound.get(e), relax.Var | constant):
            e = bound[e]
        return isinstance(e, constant) or any(e.same_as(h) for h in held)

    ret = main.body.body
    while isinstance(ret, relax.Var) and isinstance(bound.get(ret), relax.Var | relax.Tuple):
        ret = bound[ret]
    fields = list(ret.fields) if isinstance(ret, relax.Tuple) else [ret]
    if not any(borrowed(f) for f in fields):
        return mod
    # the copies after the dataflow blocks: inside one, Relax rewrites a call of a
    # function that only moves data into a view (RewriteDataflowReshape), which is
    # what they are; the fields the dataflow block returns are read back by index
    returned = main.body.body
    bindings, results = [], []
    builder = relax.BlockBuilder(mod)
    for i, f in enumerate(fields):
        value = returned
        if isinstance(ret, relax.Tuple):
            value = relax.Var(f"output{i}", f.ty)
            bindings.append(relax.VarBinding(value, relax.TupleGetItem(returned, i)))
        if borrowed(f):
            source = te.placeholder([int(d) for d in f.ty.shape.values], str(f.ty.dtype))
            copy = te.compute(source.shape, lambda *idx: source(*idx), "copy")  # noqa: B023
            name = f"output_copy{i}"
            func = builder.add_func(te.create_prim_func([source, copy]).with_attr(
                "global_symbol", name), name)
            copied = relax.Var(f"own_output{i}", f.ty)
            bindings.append(relax.VarBinding(copied, relax.call_tir(func, [value], f.ty)))
            value = copied
        results.append(value)
    mod = builder.get()
    body = relax.SeqExpr([*main.body.blocks, relax.BindingBlock(bindings)],
                         relax.Tuple(results) if isinstance(ret, relax.Tuple) else results[0])
    mod.update_func(mod.get_global_var("main"),
                    relax.Function(main.params, body, main.ret_ty, main.is_pure, main.attrs))
    return mod


def _inputs_at_element_alignment(mod: IRModule, kernels: set[str]) -> IRModule:
    """Every operator function that reads a model input, as the caller's array (or a
    view of it, a reshape), declared to take its arguments at the element's alignment
    (`compute.align_arguments`), as convgen's kernels are. TVM declares 64 bytes, and
    LLVM then loads vectors with instructions that fault off a 64-byte boundary;
    `Model` passes numpy's arrays in place, which start 16 bytes past one or 48 (an
    input feeding an element-wise operator rather than a transpose: a segfault in
    three calls out of four). The other functions read buffers the VM allocates,
    64-byte aligned."""
    import tvm
    from tvm import relax

    main = mod["main"]
    call_tir = tvm.ir.Op.get("relax.call_tir")
    bound, held = _aliases(main)
    readers: dict[str, Any] = {}
    for value in bound.values():
        if isinstance(value, relax.Call) and value.op.same_as(call_tir):
            func, args = value.args[0], value.args[1].fields
            if func.name_hint not in kernels and any(
                    isinstance(a, relax.Var) and any(a.same_as(h) for h in held) for a in args):
                readers[func.name_hint] = func
    for gv in readers.values():
        mod[gv] = align_arguments(mod[gv], min(
            np.dtype(str(p.ty.dtype)).itemsize for p in main.params))
    return mod


@contextmanager
def _element_wise_imports() -> Iterator[None]:
    """While importing: ONNX Clip with constant bounds (ReLU6), and the clips inside
    HardSwish and HardSigmoid, as Relax's element-wise `minimum(maximum(x, lo), hi)`. The frontend
    lowers every Clip to two anonymous
    TE functions (to honour NaN bounds, which constant bounds are not), which
    ConvertLayout cannot carry a layout through (nor its `clip` operator) and
    `_ConvFuser` cannot read. Max, Min and Sum as their element-wise pairs,
    maximum(a, b) ..., which broadcast: the frontend broadcasts every input to the
    result's shape, stacks them on a new axis and reduces it, a 5-D tensor ConvertLayout
    failed on (a Conv's output against per-channel bounds: "Invalid SLayout"), and
    copies besides. Dropout as the identity it is at inference. Gather and the other
    indexing operators with their indices clamped into range. Upsample and Resize-10
    as ONNX defines them. Its converter table is
    looked up per import (`_get_convert_map`); the original is put back afterwards."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend as frontend

    def clamp(bb: Any, x: Any, lo: Any, hi: Any) -> Any:
        return bb.emit(relax.op.minimum(bb.emit(relax.op.maximum(x, lo)), hi))

    def like(x: Any, v: float) -> Any:  # a scalar constant of x's dtype
        return relax.const(v, x.ty.dtype)

    class Clip(frontend.Clip):  # type: ignore[misc,name-defined]
        @classmethod
        def _impl_v13(cls, bb: Any, inputs: Any, attr: Any, params: Any) -> Any:
            bounds = [_const(b) if b is not None else None for b in inputs[1:3]]
            if (all(b is not None and b.size == 1 and not np.isnan(b).any() for b in bounds)
                    and isinstance(inputs[0].ty, relax.TensorType)):
                dtype = inputs[0].ty.dtype
                lo, hi = (relax.const(b.reshape(()), dtype) for b in bounds)  # type: ignore[union-attr]
                return clamp(bb, inputs[0], lo, hi)
            return super()._impl_v13(bb, inputs, attr, params)

        _impl_v11 = _impl_v13

    class HardSwish(frontend.HardSwish):  # type: ignore[misc,name-defined]
        """x * min(max(x + 3, 0), 6) / 6, its clip as element-wise ops too."""

        @classmethod
        def _impl_v14(cls, bb: Any, inputs: Any, attr: Any, params: Any) -> Any:
            x = inputs[0]
            clipped = clamp(bb, bb.emit(relax.op.add(x, like(x, 3.0))), like(x, 0.0),
                            like(x, 6.0))
            return bb.emit(relax.op.multiply(x, bb.emit(relax.op.divide(clipped, like(x, 6.0)))))

    class HardSigmoid(frontend.HardSigmoid):  # type: ignore[misc,name-defined]
        """min(max(alpha * x + beta, 0), 1) (MobileNetV3's squeeze-excitation gates):
        through Relax's `clip`, which ConvertLayout has no rule for, each gate was
        wrapped in transposes to channels-first and back."""

        @classmethod
        def _impl_v1(cls, bb: Any, inputs: Any, attr: Any, params: Any) -> Any:
            x = inputs[0]
            affine = bb.emit(relax.op.add(
                bb.emit(relax.op.multiply(x, like(x, float(attr.get("alpha", 0.2))))),
                like(x, float(attr.get("beta", 0.5)))))
            return clamp(bb, affine, like(x, 0.0), like(x, 1.0))

    class Dropout(frontend.Dropout):  # type: ignore[misc,name-defined]
        """The identity at inference, and its mask all true: Relax's `dropout` stays
        in the graph as a tuple-valued operator that ConvertLayout fails on
        ("Expected nested to match tuple")."""

        @classmethod
        def _impl_v1(cls, bb: Any, inputs: Any, attr: Any, params: Any) -> Any:
            x = inputs[0]
            return relax.Tuple([x, bb.emit(relax.op.ones_like(x, "bool"))])

        _impl_v12 = _impl_v1

    class Gather(frontend.Gather):  # type: ignore[misc,name-defined]
        """Indices clamped into range (`take` in mode "clip"): the frontend's "fast"
        mode reads wherever an index points, and an index past the axis (a caller's
        bad token id) read garbage or ended the caller's process with a segfault;
        onnxruntime raises there. Negative indices, which ONNX allows, the frontend
        has already made positive."""

        @classmethod
        def _impl_v13(cls, bb: Any, inputs: Any, attr: Any, params: Any) -> Any:
            out = super()._impl_v13(bb, inputs, attr, params)
            if isinstance(out, relax.Call) and out.op.same_as(tvm.ir.Op.get("relax.take")):
                return relax.op.take(*out.args, axis=out.attrs.axis, mode="clip")
            return out

    def in_range(base: Any, extent: Callable[[Any, Any, Any, Any], Any]) -> Any:
        """`base` with its indices (input 1) made positive and clamped into [0,
        extent - 1] first, for operators TVM lowers with unchecked loads and stores
        (GatherElements, GatherND, ScatterElements, ScatterND): an index past its axis
        read garbage, or wrote past the tensor, or a large one ended the caller's
        process with a segfault, as Gather's did. `extent(bb, data, indices, attr)`:
        the axis extent each index is for, broadcastable against the indices."""

        def clamped(impl: Any) -> Any:
            def convert(cls: Any, bb: Any, inputs: Any, attr: Any, params: Any) -> Any:
                data, indices, *rest = inputs
                dtype = indices.ty.dtype.dtype
                bound = extent(bb, data, indices, attr)
                positive = frontend._normalize_negative_indices(bb, indices, bound)
                last = bb.emit(relax.op.subtract(bound, relax.const(1, dtype)))
                indices = clamp(bb, positive, relax.const(0, dtype), last)
                return impl(bb, [data, indices, *rest], attr, params)

            return classmethod(convert)

        impls = {name: clamped(getattr(base, name)) for name in dir(base)
                 if name.startswith("_impl_v")}
        return type(base.__name__, (base,), impls)

    def along_axis(bb: Any, data: Any, indices: Any, attr: Any) -> Any:
        return frontend._axis_extent(bb, data, attr.get("axis", 0), indices.ty.dtype.dtype)

    def per_coordinate(bb: Any, data: Any, indices: Any, attr: Any) -> Any:
        return frontend._coord_axis_extents(bb, data, indices, attr.get("batch_dims", 0))

    def upsampled(bb: Any, x: Any, scales: Any, attr: Any, op: str) -> Any:
        """Upsample (opsets 7 and 9) and Resize-10, one operator: output pixel i reads
        input i / scale ("asymmetric"), the nearest by floor. The frontend read opset
        9's scales from an attribute opset 9 no longer has, rounded the nearest pixel
        half up (another than onnxruntime's, where i / scale is past .5), and read
        Resize-10's scales as Resize-11's roi."""
        if isinstance(scales, tvm.ir.GenericConst):
            scales = scales.value.numpy()
        elif scales is None or isinstance(scales, relax.Expr):
            raise UnsupportedError(f"{op}: scales computed at run time")
        scales = [float(v) for v in scales]
        shape = [int(d) for d in x.ty.shape]
        mode = attr.get("mode", b"nearest").decode("ascii")
        if len(shape) != 4 or scales[:2] != [1.0, 1.0] or mode not in ("nearest", "linear"):
            raise UnsupportedError(f"{op}: only nearest or linear over the last two axes "
                                   f"of N x C x H x W (scales {scales}, mode {mode})")
        size = [int(d * s) for d, s in zip(shape[2:], scales[2:])]  # floor, as ONNX's
        return relax.op.image.resize2d(
            x, relax.ShapeExpr(size), layout="NCHW",
            method="nearest_neighbor" if mode == "nearest" else "linear",
            coordinate_transformation_mode="asymmetric", rounding_method="floor")

    class Upsample(frontend.Upsample):  # type: ignore[misc,name-defined]
        @classmethod
        def _impl_v7(cls, bb: Any, inputs: Any, attr: Any, params: Any) -> Any:
            return upsampled(bb, inputs[0], attr.get("scales"), attr, "Upsample")

        @classmethod
        def _impl_v9(cls, bb: Any, inputs: Any, attr: Any, params: Any) -> Any:
            return upsampled(bb, inputs[0], inputs[1], attr, "Upsample")

    class Resize(frontend.Resize):  # type: ignore[misc,name-defined]
        """Resize-10 as the Upsample it is; from opset 11, roi, scales and sizes given
        as empty constants (exporters write scales so beside sizes) as absent: the
        frontend refused both scales and sizes."""

        @classmethod
        def _impl_v10(cls, bb: Any, inputs: Any, attr: Any, params: Any) -> Any:
            return upsampled(bb, inputs[0], inputs[1], attr, "Resize")

        @classmethod
        def _impl_v11(cls, bb: Any, inputs: Any, attr: Any, params: Any) -> Any:
            def given(v: Any) -> Any:
                empty = isinstance(v, tvm.ir.GenericConst) and v.value.numpy().size == 0
                return None if empty else v

            return super()._impl_v18(bb, [inputs[0], *map(given, inputs[1:])], attr, params)

        _impl_v18 = _impl_v11

    def pairwise(base: Any) -> Any:
        class Pairwise(base):  # type: ignore[misc,valid-type]
            @classmethod
            def _impl_v1(cls, bb: Any, inputs: Any, attr: Any, params: Any) -> Any:
                if all(isinstance(i, tvm.ir.GenericConst) for i in inputs):
                    return super()._impl_v1(bb, inputs, attr, params)  # (folded at import)
                return cls._impl_dynamic(bb, inputs)

        return Pairwise

    original = frontend._get_convert_map

    def convert_map() -> dict[str, Any]:
        return {**original(), "Clip": Clip, "HardSwish": HardSwish,
                "HardSigmoid": HardSigmoid, "Dropout": Dropout, "Gather": Gather,
                "Upsample": Upsample, "Resize": Resize,
                **{op: in_range(getattr(frontend, op), along_axis)
                   for op in ("GatherElements", "ScatterElements")},
                **{op: in_range(getattr(frontend, op), per_coordinate)
                   for op in ("GatherND", "ScatterND")},
                **{op: pairwise(getattr(frontend, op)) for op in ("Max", "Min", "Sum")}}

    frontend._get_convert_map = convert_map
    try:
        yield
    finally:
        frontend._get_convert_map = original


def _vector_math() -> dict[str, Any]:
    """Legalizations of the transcendental operators on float32 as vector arithmetic
    (`compute.exp`, `compute.sigmoid`; TVM's fast_erf, fast_tanh and fast_softmax,
    within 4e-7 of the exact functions): TVM's own call expf, erff or tanhf for every
    lane on the CPU. EfficientNet-B0's squeeze-excitation gates and unfused SiLUs,
    left so, took 9.0 ms inside the model, its kernels 21.9 (Zen 4,
    benchmarks/NOTES.md). Other dtypes: TVM's own."""
    from tvm import te, topi

    from convgen.compiler.compute import exp, sigmoid

    def on_float32(make: Any) -> Any:
        def legalize(bb: Any, call: Any) -> Any:
            if call.args[0].ty.dtype != "float32":
                return call.op.get_attr("FLegalize")(bb, call)
            return make(bb, call)
        return legalize

    def elementwise(fn: Any) -> Any:
        def compute(x: Any) -> Any:
            return te.compute(x.shape, lambda *i: fn(x(*i)), name=fn.__name__)

        compute.__name__ = fn.__name__  # (the legalized function's name)
        return on_float32(lambda bb, call: bb.call_te(compute, call.args[0]))

    return {
        "relax.exp": elementwise(exp),
        "relax.sigmoid": elementwise(sigmoid),
        "relax.erf": on_float32(lambda bb, call: bb.call_te(topi.fast_erf, call.args[0])),
        "relax.tanh": on_float32(lambda bb, call: bb.call_te(topi.fast_tanh, call.args[0])),
        "relax.nn.softmax": on_float32(lambda bb, call: bb.call_te(
            topi.nn.fast_softmax, call.args[0], call.attrs.axis)),
    }


def _relax_module(model: onnx.ModelProto, name: str, options: DeployOptions) -> IRModule:
    """The model in Relax, its initializers constants, in the activations' layout
    `options` asks for (converted at the edges), constants folded."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    try:
        with _element_wise_imports(), warnings.catch_warnings():
            # (the frontend runs onnx's checker and warns of what it finds, such as an
            # output declared without a shape: valid ONNX, and read_model inferred it)
            warnings.filterwarnings("ignore", category=UserWarning,
                                    module="tvm.relax.frontend.onnx")
            mod = from_onnx(fold_shape_arithmetic(model), keep_params_in_input=False)
    except Exception as err:  # the frontend's errors name the operator
        raise UnsupportedError(f"model: TVM cannot import {name}: "
                               f"{tvm_reason(err)}{_where_shapes_end(model)}") from None
    try:
        mod = relax.transform.DecomposeOpsForInference()(mod)
        if options.layout == "channels-last":
            desired = {op: [CHANNELS_LAST[nd], WEIGHT_LAYOUTS[CHANNELS_LAST[nd]]]
                       for op, nd in CONV_OPS.items()}
            # (TVM lowers transposed convolutions channels-first only: they keep it,
            # between transposes, where ConvertLayout would carry channels-last in)
            desired.update(TRANSPOSED_CONV_LAYOUTS)
            mod = relax.transform.ConvertLayout(desired)(mod)
            mod = _layer_norm_axes_in_order(mod)
        mod = relax.transform.FoldConstant()(mod)  # bias reshapes, weight transposes
    except Exception as err:  # (a construct Relax's passes do not handle)
        raise UnsupportedError(f"model: TVM cannot compile {name}: "
                               f"{tvm_reason(err)}{_where_shapes_end(model)}") from None
    # (a decomposed BatchNorm returns a tuple whose first item is read: read directly)
    return relax.transform.DeadCodeElimination()(relax.transform.CanonicalizeBindings()(mod))


def model_specs(model: onnx.ModelProto, target: TargetInfo, options: DeployOptions
                ) -> list[tuple[str, ConvSpec]]:
    """(ONNX node, spec) of every layer `deploy` runs on a convgen kernel, as it will
    build them (layout, epilogue), without building anything: what
    `convgen tune --model` tunes, its taps that read only padding left out, a layer
    split into tap regions once per box. (A layer without a record may run on its
    rows merged, `_ConvFuser._kernel_spec`; once tuned, its record runs it as it is.)"""
    fuser = _ConvFuser(_relax_module(model, "model", options), target, options)
    chains, names = fuser.find(_node_names(model))
    specs = []
    for name, chain in zip(names, chains):
        spec = fuser._spec(chain).without_dead_taps()
        specs += [(name, box.spec) for box in fuser._regions(spec)] or [(name, spec)]
    return specs


def _node_names(model: onnx.ModelProto) -> dict[str, list[str]]:
    """The names of the model's Conv nodes, and of its Gemm and MatMul nodes (each one
    Relax matmul), in graph order: the order the frontend emits their operators in."""
    names: dict[str, list[str]] = {CONV_OPS_KEY: [], DENSE_OP: []}
    for i, n in enumerate(model.graph.node):
        kind = {"Conv": CONV_OPS_KEY, "Gemm": DENSE_OP, "MatMul": DENSE_OP}.get(n.op_type)
        if kind:
            names[kind].append(n.name or f"{n.op_type}_{i}")
    return names


# ---- the convolutions and their epilogues ---------------------------------------------


@dataclass
class _Kernel:
    """One kernel of the model: the run-packed entry of a spec, as the chooser scheduled
    it, or of a depthwise-separable pair (`schedule/separable.py`)."""

    name: str  # its function in the module
    func: Any  # the PrimFunc, marked opaque and scheduled
    weights: tuple[tuple[ConvSpec, WeightPacking], ...]  # each weight argument's layer
    choice: ScheduleChoice  # and the layout it is packed in, in argument order
    algorithm: str
    workspace: TensorInfo | None = None  # scratch it takes after `out` (CUDA split-K)
    in_place_gvar: Any = None  # its form writing over the residual, where a call uses it
    gvar: Any = None  # its GlobalVar, once added to the model's module


@dataclass
class _Chain:
    """A convolution and the bindings after it that fold into its write-back."""

    conv: relax.Call  # the convolution, or a matmul by constant weights (`dense`)
    end: relax.Call  # the value of the last folded binding (replaced by the kernel)
    var: Any = None  # the variable the convolution is bound to
    bias: np.ndarray | None = None  # per output channel, float64 while folding
    scale: np.ndarray | None = None  # per output channel, folded into the weights
    residual: relax.Expr | None = None
    activation: str = "none"
    fused: list[str] = field(default_factory=list)  # the folded operators, for the manifest
    taken: list[Any] = field(default_factory=list)  # the variables of the folded bindings

    @property
    def end_var(self) -> Any:
        """The variable the chain's result is bound to, where its kernel call goes."""
        return self.taken[-1] if self.taken else self.var

    @property
    def dense(self) -> bool:
        """A matmul x[..., K] @ W[K, N] (ONNX Gemm, MatMul; a Linear layer on tokens or
        on channels-last pixels): it runs as the 1 x 1 convolution it is,
        channels-last, x viewed as [1, H, W, K] (`_dense_input`) by [N, 1, 1, K]."""
        return _op(self.conv) == DENSE_OP


def _dense_input(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """A matmul's x[..., K] as the channels-last image its 1 x 1 convolution reads:
    the last two leading axes as rows and columns (x[M, K]: one row of M), the rest
    folded into the rows, so the kernel's rows run in parallel ([1, 56, 56, 96] stays
    56 rows of 56 pixels)."""
    *lead, k = shape
    cols = lead[-1]
    return (1, math.prod(lead[:-1]), cols, k)


def _flip_other_convolutions(mod: IRModule) -> IRModule:
    """In `conv` mode, the convolutions left to TVM (weights computed at run time, a
    float16 model) with their weights flipped on every spatial axis, so that every
    Conv of the model is a true convolution, not only those on convgen's kernels
    (conv(I, W) == Conv(I, flip(W))). So are the transposed convolutions: a
    ConvTranspose is the adjoint of the Conv of its weights, and the adjoint of
    conv(., W) == Conv(., flip(W)) is ConvTranspose(., flip(W)). Constant weights are
    flipped once, by FoldConstant."""
    from tvm import relax

    @relax.expr_functor.mutator
    class Flipper(relax.PyExprMutator):  # type: ignore[misc]
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if _op(call) not in CONV_OPS and _op(call) not in TRANSPOSED_CONV_LAYOUTS:
                return call
            weight = call.args[1]
            for axis, letter in enumerate(str(call.attrs.kernel_layout)):
                if letter not in "OI":  # a spatial axis
                    weight = self.builder_.emit(relax.op.flip(weight, axis))
            return relax.Call(call.op, [call.args[0], weight], call.attrs, call.ty_args)

    flipper = Flipper(mod)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            flipper.builder_.update_func(gv, flipper.visit_expr(func))
    return flipper.builder_.get()


def _layer_norm_axes_in_order(mod: IRModule) -> IRModule:
    """LayerNorms whose axes ConvertLayout left out of order, with sorted axes and
    their scale and bias permuted to match. A LayerNorm over C, H and W (ONNX axis 1)
    becomes axes [3, 1, 2] on channels-last activations, its scale and bias still (C,
    H, W) as Relax defines them; TVM's lowering indexes them as if the axes were
    sorted, (H, W, C), and read past them: garbage in every row past the C-th, or a
    different garbage each call. The permutations of constants fold away."""
    from tvm import relax

    @relax.expr_functor.mutator
    class Sorter(relax.PyExprMutator):  # type: ignore[misc]
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if _op(call) != "relax.nn.layer_norm":
                return call
            rank = len(call.args[0].ty.shape)
            axes = [int(a) % rank for a in call.attrs.axes]
            order = sorted(range(len(axes)), key=axes.__getitem__)
            if order == list(range(len(axes))):
                return call
            scale, bias = (self.builder_.emit(relax.op.permute_dims(a, order))
                           for a in call.args[1:3])
            return relax.op.nn.layer_norm(call.args[0], scale, bias, sorted(axes),
                                          call.attrs.epsilon, call.attrs.center,
                                          call.attrs.scale)

    sorter = Sorter(mod)
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            sorter.builder_.update_func(gv, sorter.visit_expr(func))
    return sorter.builder_.get()


def _batch_norms_as_scale_and_shift(mod: IRModule) -> IRModule:
    """The BatchNorms no convolution took, as DecomposeOpsForInference leaves them,
    ((x - mean) / std) * gamma + beta on constants, rewritten x * scale + shift: one
    FMA per element instead of a division among four operations. DenseNet has one
    before each convolution, after a concatenation and followed by ReLU, which keep
    it out of the kernels (a 28 x 28 x 224 one, fused with its concatenation and
    ReLU: 0.020 -> 0.018 ms, Zen 4).
    onnxruntime computes its BatchNormalization the same way."""
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

    x, mean, std, gamma, beta = wildcard(), is_const(), is_const(), is_const(), is_const()
    pattern = is_op("relax.add")(is_op("relax.multiply")(is_op("relax.divide")(
        is_op("relax.subtract")(x, mean), std), gamma), beta)

    def rewrite(call: Any, found: dict[Any, Any]) -> Any:
        m, s, g, b = (_const(found[c]) for c in (mean, std, gamma, beta))
        if any(str(c.dtype) != "float32" for c in (m, s, g, b)):
            return call
        scale = g.astype(np.float64) / s
        shift = b - m.astype(np.float64) * scale
        return relax.op.add(relax.op.multiply(found[x], relax.const(scale.astype(np.float32))),
                            relax.const(shift.astype(np.float32)))

    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gv] = rewrite_call(pattern, rewrite, func)
    return mod


def _const(e: Any) -> np.ndarray | None:
    import tvm

    return e.value.numpy() if isinstance(e, tvm.ir.Constant) else None


def _op(e: Any) -> str | None:
    """The Relax operator a call applies (None for anything else)."""
    import tvm
    from tvm import relax

    if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
        return str(e.op.name)
    return None


def _shape(e: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in e.ty.shape)


class _ConvFuser:
    """Finds the chains (`_Chain`) in the model's main function and rewrites each into
    a call_tir of its kernel."""

    def __init__(self, mod: IRModule, target: TargetInfo, options: DeployOptions) -> None:
        self.mod, self.target, self.options = mod, target, options
        self.bindings: dict[Any, Any] = {}  # var -> value
        self.order: dict[Any, int] = {}  # var -> its binding's position in the function
        self.users: dict[Any, list[Any]] = {}  # var -> the binding vars whose value reads it
        self.taken: set[Any] = set()  # bindings folded into a chain already
        self.kernels: dict[tuple[ConvSpec, ...], _Kernel] = {}  # by the layers they run

    def find(self, node_names: dict[str, list[str]]) -> tuple[list[_Chain], list[str]]:
        """Every chain, in graph order, with the name of the ONNX node it starts at.
        Where a residual Add follows two convolutions (a ResNet block's branch and
        its projection shortcut), the first to reach it takes it."""
        self._scan(self.mod["main"])
        chains, names, seen = [], [], {CONV_OPS_KEY: 0, DENSE_OP: 0}
        for var, value in self.bindings.items():
            kind = DENSE_OP if _op(value) == DENSE_OP else CONV_OPS_KEY
            if _op(value) not in (*CONV_OPS, DENSE_OP):
                continue
            i, seen[kind] = seen[kind], seen[kind] + 1
            chain = self._chain(var, value)
            if chain is not None:
                chains.append(chain)
                known = node_names.get(kind, [])
                names.append(known[i] if i < len(known) else f"{kind}_{i}")
        return chains, names

    @classmethod
    def run(cls, mod: IRModule, target: TargetInfo, options: DeployOptions,
            node_names: dict[str, list[str]]) -> tuple[IRModule, list[ModelLayer]]:
        from tvm import relax

        self = cls(mod, target, options)
        chains, names = self.find(node_names)
        # each node's operator, and what its kernel computes: without the taps that
        # read only padding (DeepLab's widest dilations), their weights cut in `_pack`
        nodes = [self._spec(c) for c in chains]
        specs = [spec.without_dead_taps() for spec in nodes]
        regions = {i: boxes for i, spec in enumerate(specs) if (boxes := self._regions(spec))}
        pairs = self._separable_pairs(chains, specs) if options.separable else {}
        pairs = {i: j for i, j in pairs.items() if i not in regions and j not in regions}
        paired = {*pairs, *pairs.values()}
        specs = [spec if i in paired or chains[i].dense or i in regions
                 else self._kernel_spec(spec) for i, spec in enumerate(specs)]
        # the chains each kernel call computes, by the index of the last one's chain (a
        # layer split into tap regions: a kernel call per box)
        calls = {j: (i, j) for i, j in pairs.items()}
        for i in range(len(chains)):
            if i not in pairs and i not in calls:
                calls[i] = (i,)
        layers_of = {i: call for call in calls.values() for i in call}
        kernel_layers = {tuple(specs[i] for i in call) for j, call in calls.items()
                         if j not in regions}
        kernel_layers |= {(box.spec,) for boxes in regions.values() for box in boxes}
        self._build_kernels(sorted(kernel_layers, key=lambda layers: [s.name() for s in layers]))
        packed = self._pack(chains, nodes, specs, layers_of, regions)
        ends = {chains[j].end: call for j, call in calls.items()}
        in_place = self._in_place_calls(chains, specs, calls)
        fuser = self

        @relax.expr_functor.mutator
        class Rewriter(relax.PyExprMutator):  # type: ignore[misc]
            def visit_call_(self, call: Any) -> Any:
                if call not in ends:
                    return super().visit_call_(call)
                indices = ends[call]
                if indices[-1] in regions:
                    return fuser._call_regions(self, chains[indices[-1]], regions[indices[-1]],
                                               packed[indices[-1]])
                first, last = chains[indices[0]], chains[indices[-1]]
                kernel = fuser.kernels[tuple(specs[i] for i in indices)]

                def fed(e: Any, shape: tuple[int, ...]) -> Any:
                    """An operand as the kernel's spec views it (a dense layer's as the
                    convolution's, merged rows): a reshape, which Relax runs as a view."""
                    viewed = _shape(e) != shape
                    e = self.visit_expr(e)
                    return self.builder_.emit(relax.op.reshape(e, shape)) if viewed else e

                args = [fed(first.conv.args[0], specs[indices[0]].data_shape)]
                for i in indices:  # the kernel's arguments: `compute.separable_tensors`
                    chain = chains[i]
                    args.append(relax.const(packed[i][0]))
                    if chain.bias is not None:
                        args.append(relax.const(chain.bias.astype(np.float32)))
                    if chain.residual is not None:
                        args.append(fed(chain.residual, specs[i].out_shape))
                out_shape = specs[indices[-1]].out_shape
                out_ty = relax.TensorType(out_shape, last.conv.ty.dtype)
                if indices[-1] in in_place:  # the residual is the last argument
                    out = relax.call_tir_inplace(kernel.in_place_gvar, args, len(args) - 1,
                                                 out_ty)
                elif kernel.workspace is not None:  # a second output, which Relax allocates
                    ws = relax.TensorType(kernel.workspace.shape, kernel.workspace.dtype)
                    both = self.builder_.emit(relax.call_tir(kernel.gvar, args, [out_ty, ws]))
                    out = relax.TupleGetItem(both, 0)
                else:
                    out = relax.call_tir(kernel.gvar, args, out_ty)
                if _shape(last.end) == out_shape:
                    return out
                return relax.op.reshape(self.builder_.emit(out), _shape(last.end))

        rewriter = Rewriter(mod)
        for kernel in self.kernels.values():
            kernel.gvar = rewriter.builder_.add_func(kernel.func, kernel.name)
        for j in sorted(in_place):
            kernel = self.kernels[tuple(specs[i] for i in calls[j])]
            if kernel.in_place_gvar is None:
                kernel.in_place_gvar = rewriter.builder_.add_func(
                    writing_into_residual(kernel.func), f"{kernel.name}{IN_PLACE_SUFFIX}")
        main = rewriter.visit_expr(mod["main"])
        rewriter.builder_.update_func(mod.get_global_var("main"), main)
        # (a depthwise layer run inside its 1 x 1 layer's kernel is left unread: removed)
        out = relax.transform.DeadCodeElimination(["main"])(rewriter.builder_.get())
        layers = []
        for i, (name, chain, spec) in enumerate(zip(names, chains, specs)):
            for box in regions.get(i, []):
                kernel = self.kernels[(box.spec,)]
                layers.append(ModelLayer(name, tuple(chain.fused), kernel.name, box.spec,
                                         kernel.choice, kernel.algorithm, region=box.outputs))
            if i in regions:
                continue
            call = layers_of[i]
            kernel = self.kernels[tuple(specs[k] for k in call)]
            pair = next((names[k] for k in call if k != i), "")
            suffix = IN_PLACE_SUFFIX if call[-1] in in_place else ""
            layers.append(ModelLayer(name, tuple(chain.fused), kernel.name + suffix, spec,
                                     kernel.choice, kernel.algorithm, pair,
                                     suffix != "" and spec.residual))
        return out, layers

    def _in_place_calls(self, chains: list[_Chain], specs: list[ConvSpec],
                        calls: dict[int, tuple[int, ...]]) -> set[int]:
        """The kernel calls (by their last chain) that write their output over their
        residual (`compute.writing_into_residual`): it then costs one pass over memory
        less, since the output's cache lines are the residual's, already read, rather
        than lines the write must fetch first (ResNet-50's C64 56x56 K256 1 x 1: 0.87 ms
        against 0.97, C256 14x14 K1024: 0.56 against 0.64, Zen 4, benchmarks/NOTES.md).
        Allowed where the residual is a tensor of its own (`_computed`), which nothing
        reads after the call, nor the call itself but for the Add folded into its
        epilogue (not a conv(x) + x), nor any view of it later; and where the kernel
        takes no workspace (CUDA split-K: its last argument is then not `out`)."""
        # where each binding reads its operands once chains are kernel calls: a chain's
        # bindings at the end of the call that computes it
        at = dict(self.order)
        ends = set()
        for call in calls.values():
            ends.add(chains[call[-1]].end_var)
            for i in call:
                for var in (chains[i].var, *chains[i].taken):
                    at[var] = self.order[chains[call[-1]].end_var]

        def dies(var: Any, last: _Chain) -> bool:
            for user in self.users.get(var, []):
                if user in last.taken:  # the folded Add
                    continue
                if user is None or at[user] >= at[last.end_var]:
                    return False
                if not self._computed(user, ends) and not dies(user, last):
                    return False  # (a view of the residual, read after the call)
            return True

        def has_workspace(call: tuple[int, ...]) -> bool:  # (its last argument: not `out`)
            kernel = self.kernels.get(tuple(specs[i] for i in call))
            return kernel is not None and kernel.workspace is not None

        return {j for j, call in calls.items()
                if not chains[j].dense and chains[j].residual is not None
                and not has_workspace(call)
                and self._computed(chains[j].residual, ends) and dies(chains[j].residual,
                                                                      chains[j])}

    def _computed(self, var: Any, ends: set[Any]) -> bool:
        """Whether `var` is a tensor of its own memory: a kernel's output, or an operator
        that computes values (`COMPUTING_OPS`). Relax runs operators that only move
        data (reshape, squeeze, a transpose of unit axes, ...) as views of their
        operand's memory where it can, and the model's inputs are the caller's arrays."""
        return var in ends or _op(self.bindings.get(var)) in COMPUTING_OPS

    def _separable_pairs(self, chains: list[_Chain], specs: list[ConvSpec]) -> dict[int, int]:
        """Depthwise chains whose output only a 1 x 1 chain reads, where the two run as
        one kernel (`separable.declines`) and that pays (`separable.pays`): the
        depthwise chain's index -> the 1 x 1's."""
        by_end = {chain.end: i for i, chain in enumerate(chains)}
        pairs = {}
        for j, chain in enumerate(chains):
            x = chain.conv.args[0]
            i = by_end.get(self.bindings.get(x))
            reader = self._only_user(x)
            if (i is not None and not chain.dense and reader is not None
                    and reader.same_as(chain.var)
                    and separable.declines(specs[i], specs[j], self.target) is None
                    and separable.pays(specs[i], self.target, self._separable_knobs(
                        specs[i], specs[j]))):
                pairs[i] = j
        return pairs

    @staticmethod
    def _kernel_name(spec: ConvSpec) -> str:
        return f"convgen_{spec.name()}"

    def _scan(self, func: Any) -> None:
        from tvm import relax

        fuser = self

        @relax.expr_functor.visitor
        class Scan(relax.PyExprVisitor):  # type: ignore[misc]
            def visit_var_binding_(self, binding: Any) -> None:
                fuser.bindings[binding.var] = binding.value
                fuser.order[binding.var] = len(fuser.order)
                self.current = binding.var
                self.visit_expr(binding.value)
                self.current = None  # a read outside any binding: the function's result

            def visit_var_(self, var: Any) -> None:
                fuser.users.setdefault(var, []).append(getattr(self, "current", None))

            def visit_dataflow_var_(self, var: Any) -> None:
                self.visit_var_(var)

        Scan().visit_expr(func)

    def _only_user(self, var: Any) -> Any | None:
        users = self.users.get(var, [])
        return users[0] if len(users) == 1 and users[0] is not None else None

    def _chain(self, var: Any, conv: Any) -> _Chain | None:
        """The convolution bound to `var` and what folds into it (bindings no earlier
        chain took), or None where convgen cannot take it (weights not constant, a
        layout without a convgen kernel, ...)."""
        chain = _Chain(conv, conv, var)
        if str(conv.ty.dtype) != "float32" or _const(conv.args[1]) is None:
            return None
        if chain.dense:
            if len(_shape(conv.args[0])) < 2 or len(_shape(conv.args[1])) != 2:
                return None
            channel_axis = len(_shape(conv)) - 1
        else:
            nd, a = CONV_OPS[_op(conv) or ""], conv.attrs
            layout = str(a.data_layout)
            if (layout not in (CHANNELS_FIRST[nd], CHANNELS_LAST[nd])
                    or str(a.kernel_layout) != WEIGHT_LAYOUTS[layout]
                    or str(a.out_layout) != layout):
                return None
            channel_axis = layout.index("C")
        out_shape = _shape(conv)
        taken = []
        while True:
            user = self._only_user(var)
            if user is None:  # x read twice: x * sigmoid(x), or HardSwish
                if chain.activation != "none":
                    break
                for activation, match in (("silu", self._silu), ("hardswish", self._hardswish)):
                    found = match(var)
                    if found is not None:
                        end, nodes = found
                        taken += nodes
                        var, chain.activation, chain.end = end, activation, self.bindings[end]
                        chain.fused += ["Sigmoid", "Mul"] if activation == "silu" else [
                            "HardSwish"]
                        break
                break
            if user in self.taken:
                break
            value, op = self.bindings[user], _op(self.bindings[user])
            affine = op in AFFINE_OPS and chain.activation == "none" and chain.residual is None
            other = None
            if affine:
                other = value.args[1] if value.args[0].same_as(var) else value.args[0]
            per_channel = _const(other) if other is not None else None
            if per_channel is not None and not _per_channel(per_channel, out_shape,
                                                            channel_axis):
                per_channel = None
            if per_channel is not None and (op in ("relax.add", "relax.multiply")
                                            or value.args[0].same_as(var)):
                # + b, - b, * s, / s by a constant per output channel (a bias, an
                # unfolded BatchNorm): folded into the bias and the weights' scale
                _fold_affine(chain, op, per_channel.reshape(-1).astype(np.float64))
                chain.fused.append(AFFINE_OPS[op])
            elif (op == "relax.add" and chain.activation == "none" and chain.residual is None
                  and _const(other) is None and _shape(other) == out_shape
                  and str(other.ty.dtype) == str(conv.ty.dtype)):
                chain.residual = other
                chain.fused.append("Add")
            elif op == "relax.nn.relu" and chain.activation == "none":
                chain.activation = "relu"
                chain.fused.append("Relu")
            elif (op == "relax.maximum" and chain.activation == "none"
                  and _scalar(value.args[1]) == 0.0):
                chain.activation = "relu"  # the first half of ONNX Clip(0, hi)
                chain.fused.append("Clip")
            elif (op == "relax.minimum" and chain.activation == "relu"
                  and chain.fused[-1] == "Clip" and _scalar(value.args[1]) == 6.0):
                chain.activation = "relu6"  # Clip(0, 6) (`_element_wise_imports`)
            else:
                break
            var, chain.end = user, value
            taken.append(user)
        self.taken.update(taken)
        chain.taken = taken
        return chain

    def _silu(self, var: Any) -> tuple[Any, list[Any]] | None:
        """x * sigmoid(x) on `var` (its two users): the multiply's var and the bindings
        it takes, else None."""
        users = self.users.get(var, [])
        if len(users) != 2 or None in users:
            return None
        by_op = {_op(self.bindings[u]): u for u in users}
        sig, mul = by_op.get("relax.sigmoid"), by_op.get("relax.multiply")
        if (sig is None or mul is None or self._only_user(sig) != mul
                or {sig, mul} & self.taken):
            return None
        return mul, [sig, mul]

    def _hardswish(self, var: Any) -> tuple[Any, list[Any]] | None:
        """x * (min(max(x + 3, 0), 6) / 6) on `var`, as HardSwish imports (its two
        users: the add and the final multiply): the multiply's var and the bindings it
        takes, else None."""
        users = self.users.get(var, [])
        if len(users) != 2 or None in users:
            return None
        by_op = {_op(self.bindings[u]): u for u in users}
        step, mul = by_op.get("relax.add"), by_op.get("relax.multiply")
        if step is None or mul is None or _scalar(self.bindings[step].args[1]) != 3.0:
            return None
        chain = [step]
        for op, constant in (("relax.maximum", 0.0), ("relax.minimum", 6.0),
                             ("relax.divide", 6.0)):
            nxt = self._only_user(chain[-1])
            if (nxt is None or _op(self.bindings[nxt]) != op
                    or _scalar(self.bindings[nxt].args[1]) != constant):
                return None
            chain.append(nxt)
        if self._only_user(chain[-1]) != mul or {*chain, mul} & self.taken:
            return None
        return mul, [*chain, mul]

    def _spec(self, chain: _Chain) -> ConvSpec:
        conv, a = chain.conv, chain.conv.attrs
        epilogue = {"bias": chain.bias is not None, "residual": chain.residual is not None,
                    "activation": chain.activation}
        if chain.dense:  # no Conv node: no flip to apply (nor would a 1 x 1 show one)
            x, n = _dense_input(_shape(conv.args[0])), _shape(conv)[-1]
            return make_spec(mode="corr", input=x, kernel=(n, 1, 1, x[-1]), layout="NHWC",
                             **epilogue)
        layout = str(a.data_layout)
        return make_spec(
            mode=self.options.mode,
            input=_shape(conv.args[0]),
            kernel=_shape(conv.args[1]),
            padding=[int(p) for p in a.padding],  # Relax: all begins, then all ends
            stride=[int(s) for s in a.strides],
            dilation=[int(d) for d in a.dilation],
            groups=int(a.groups),
            layout=layout,
            dtype=str(conv.ty.dtype),
            **epilogue,
        )

    def _kernel_spec(self, spec: ConvSpec) -> ConvSpec:
        """The operator a layer's kernel computes: its own, or on a CPU, where the
        heuristic tiles it, a pointwise layer's with rows merged (`cpu.rows_to_merge`:
        the same memory, viewed by reshapes). A record tiles the layer as it is."""
        if self.target.is_cuda or find_record(spec, self.target, self.options.library):
            return spec
        return spec.rows_merged(cpu.rows_to_merge(spec, self.target))

    def _build_kernels(self, calls: list[tuple[ConvSpec, ...]]) -> None:
        """Each spec's run-packed entry, scheduled by the chooser (records first); each
        depthwise-separable pair's, each stage tiled as its layer's record (or
        heuristic) tiles it alone."""
        for layers in calls:
            if len(layers) == 2:
                dw, pw = layers
                knobs = self._separable_knobs(dw, pw)
                func, dw_packing, pw_packing = separable.prim_func(dw, pw, self.target, knobs)
                name = f"{self._kernel_name(dw)}_then_{pw.name()}"
                choice = ScheduleChoice("heuristic", separable.TEMPLATE, dataclasses.asdict(knobs))
                weights = ((dw, dw_packing), (pw, pw_packing))
                algorithm, workspace = dw_packing.algorithm, None
            else:
                (spec,) = layers
                mod, choice, packing = lower(spec, self.target, library=self.options.library,
                                             algorithm=self.options.algorithm)
                if packing is None:
                    raise UnsupportedError(f"model: {spec.name()} has no packed entry on "
                                           f"{self.target.key()}")
                func, name = mod[RUN_PACKED_ENTRY], self._kernel_name(spec)
                weights, algorithm = ((spec, packing),), packing.algorithm
                workspace = workspace_of(mod, spec)
            func = (func.without_attr("global_symbol").with_attr("op_pattern", OPAQUE)
                    .with_attr("tirx.is_scheduled", True))
            self.kernels[layers] = _Kernel(name, func, weights, choice, algorithm, workspace)

    def _separable_knobs(self, dw: ConvSpec, pw: ConvSpec) -> separable.SeparableKnobs:
        """A depthwise-separable pair's tiles: each stage's record, or heuristic."""
        return separable.knobs(dw, pw, self.target, self._kvec_record(dw), self._kvec_record(pw))

    def _kvec_record(self, spec: ConvSpec) -> dict[str, Any] | None:
        """The knobs of this layer's record, where it is a `cpu_kvec` one."""
        record = find_record(spec, self.target, self.options.library)
        if record is None or record.schedule.template != separable.STAGE_TEMPLATE:
            return None
        return dict(record.schedule.knobs)

    def _regions(self, spec: ConvSpec) -> list[TapRegion]:
        """The boxes of outputs a layer runs in, each on its own kernel with only the
        taps that read its input there (`ConvSpec.tap_regions`), where they save at
        least REGIONS_SAVE of the multiply-adds; else none (the layer runs whole).
        DeepLab's ASPP branches on 28x28, dilated by 12 and 24: 9 boxes each, 0.51 and
        0.18 of the multiply-adds. Dilated layers only: an undilated 3x3 layer on a
        small image saves as much at its borders (a 4x4 one: 0.69), but runs in 9
        kernels of a few pixels each, unmeasured (a dense layer's 1 x 1 convolution is
        undilated). Nor a layer with a residual (each box would read its piece of
        it), nor on CUDA (unmeasured)."""
        if (spec.residual or self.target.is_cuda
                or all(d == 1 for d in spec.dilation)):
            return []
        boxes = spec.tap_regions()
        if len(boxes) < 2 or sum(b.spec.flops for b in boxes) > (1 - REGIONS_SAVE) * spec.flops:
            return []
        return boxes

    def _call_regions(self, rewriter: Any, chain: _Chain, boxes: list[TapRegion],
                      packed: list[np.ndarray]) -> Any:
        """A layer split into tap regions: each box's kernel on its input box (a strided
        slice), the outputs concatenated back along each spatial axis, the last first
        (the boxes are row-major)."""
        from tvm import relax

        bb = rewriter.builder_
        x = rewriter.visit_expr(chain.conv.args[0])
        spec = boxes[0].spec
        first = 1 if spec.channels_last else 2
        axes = list(range(first, first + spec.ndim))
        outs = []
        for box, weights in zip(boxes, packed, strict=True):
            piece = bb.emit(relax.op.strided_slice(x, axes, [a for a, _ in box.inputs],
                                                   [b for _, b in box.inputs]))
            args = [piece, relax.const(weights)]
            if chain.bias is not None:
                args.append(relax.const(chain.bias.astype(np.float32)))
            out_ty = relax.TensorType(box.spec.out_shape, chain.conv.ty.dtype)
            outs.append(bb.emit(relax.call_tir(self.kernels[(box.spec,)].gvar, args, out_ty)))
        for n, axis in reversed(list(enumerate(axes))):
            runs = len({box.outputs[n] for box in boxes})
            if runs > 1:
                outs = [bb.emit(relax.op.concat(outs[j:j + runs], axis))
                        for j in range(0, len(outs), runs)]
        (out,) = outs
        return out

    def _weights(self, chain: _Chain, node: ConvSpec, spec: ConvSpec) -> np.ndarray:
        """A chain's weights in its kernel spec's layout, its scale folded in: a dense
        layer's [K, N] as the 1 x 1 convolution's [N, 1, 1, K]; a convolution's taps
        that its kernel computes (`ConvSpec.without_dead_taps`)."""
        w = _const(chain.conv.args[1])
        w = w.T.reshape(spec.weight_shape) if chain.dense else w[node.kept_weight_index()]
        if chain.scale is not None:  # per output channel: the weights' first axis
            w = (w * chain.scale.reshape(-1, *[1] * (w.ndim - 1))).astype(w.dtype)
        return w

    def _pack(self, chains: list[_Chain], nodes: list[ConvSpec], specs: list[ConvSpec],
              layers_of: dict[int, tuple[int, ...]], regions: dict[int, list[TapRegion]]
              ) -> list[list[np.ndarray]]:
        """Every chain's weights in the packed layout of the kernel that runs it, flip
        included (one array, or one per tap region's kernel): the packing entries,
        compiled together once and run here. `nodes`: each chain's operator as the
        model has it, `specs` as its kernel computes it."""
        import tvm

        if not chains:
            return []
        # (chain, the kernel's weight spec and packing, the weights)
        jobs: list[tuple[int, ConvSpec, WeightPacking, np.ndarray]] = []
        for i, chain in enumerate(chains):
            w = self._weights(chain, nodes[i], specs[i])
            if i in regions:
                for box in regions[i]:
                    _, packing = self.kernels[(box.spec,)].weights[0]
                    jobs.append((i, box.spec, packing, w[box.weights]))
                continue
            call = layers_of[i]
            spec, packing = self.kernels[tuple(specs[k] for k in call)].weights[call.index(i)]
            jobs.append((i, spec, packing, w))
        # each (spec, packing) under its own name: one module holds them all
        names = {key: f"{PACK_ENTRY}_{n}"
                 for n, key in enumerate(dict.fromkeys((s, p) for _, s, p, _ in jobs))}
        # run here, on this machine's CPU, whatever the model's target: the packed layout
        # is the same wherever it is computed
        host = resolve_target("llvm") if self.target.is_cuda else self.target
        funcs = {name: pack_prim_func(spec, host, packing).with_attr("global_symbol", name)
                 for (spec, packing), name in names.items()}
        lib = tvm.compile(tvm.IRModule(funcs), target=host.tvm_target())
        packed: list[list[np.ndarray]] = [[] for _ in chains]
        for i, spec, packing, w in jobs:
            out = tvm.runtime.empty(packing.packed_shape(spec), spec.dtype)
            lib[names[(spec, packing)]](tvm.runtime.tensor(np.ascontiguousarray(w)), out)
            packed[i].append(out.numpy())
        return packed


# operators whose result is computed, never a view of an operand's memory
COMPUTING_OPS = frozenset({
    *CONV_OPS, DENSE_OP, "relax.add", "relax.subtract", "relax.multiply", "relax.divide",
    "relax.maximum", "relax.minimum", "relax.clip", "relax.sigmoid", "relax.tanh",
    "relax.nn.relu", "relax.nn.silu", "relax.nn.max_pool1d", "relax.nn.max_pool2d",
    "relax.nn.max_pool3d", "relax.nn.avg_pool1d", "relax.nn.avg_pool2d",
    "relax.nn.avg_pool3d", "relax.nn.adaptive_avg_pool2d"})
IN_PLACE_SUFFIX = "_in_place"  # a kernel's form that writes over its residual

AFFINE_OPS = {"relax.add": "Add", "relax.subtract": "Sub", "relax.multiply": "Mul",
              "relax.divide": "Div"}


def _fold_affine(chain: _Chain, op: str, c: np.ndarray) -> None:
    """The chain's output y = scale * conv + bias, followed by `op` with the per-channel
    constant c: y + c, y - c, y * c or y / c, kept in that form."""
    bias = chain.bias if chain.bias is not None else np.zeros_like(c)
    scale = chain.scale if chain.scale is not None else np.ones_like(c)
    if op == "relax.add":
        chain.bias = bias + c
        return
    if op == "relax.subtract":
        chain.bias = bias - c
        return
    factor = c if op == "relax.multiply" else 1.0 / c
    chain.scale = scale * factor
    chain.bias = bias * factor if chain.bias is not None else None


def _scalar(e: Any) -> float | None:
    """The value of a one-element constant (None for anything else)."""
    values = _const(e)
    return float(values.reshape(-1)[0]) if values is not None and values.size == 1 else None


def _per_channel(values: np.ndarray, out_shape: tuple[int, ...], channel_axis: int) -> bool:
    """Whether a constant combined with the output is one value per output channel."""
    channels = out_shape[channel_axis]
    if values.ndim == len(out_shape):
        return all(d == (channels if i == channel_axis else 1) for i, d in enumerate(values.shape))
    return values.ndim == 1 and values.shape[0] == channels and channel_axis == len(out_shape) - 1


def layer_summary(layers: list[ModelLayer]) -> list[str]:
    """One line per distinct kernel: how many times the model calls it, the layers it
    runs (a depthwise-separable pair: both), its algorithm and schedule, and whether it
    writes over its residual."""
    counts: dict[str, list[ModelLayer]] = {}
    for layer in layers:
        counts.setdefault(layer.kernel, []).append(layer)
    lines = []
    for group in counts.values():
        specs = list(dict.fromkeys(layer.spec for layer in group))
        first, calls = group[0], len(group) // len(specs)
        fused = " / ".join("+".join(layer.fused) or "-" for layer in group[:len(specs)])
        in_place = ", over its residual" if any(layer.in_place for layer in group) else ""
        lines.append(f"{calls} x {' then '.join(s.name() for s in specs)} [{first.algorithm}, "
                     f"{first.schedule.brief()}, fused {fused}{in_place}]")
    return lines


def deploy_artifact(
    model_path: str | Path,
    target: TargetInfo,
    out_dir: str | Path,
    options: DeployOptions,
    *,
    target_name: str = "",
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    verify: bool = True,
    seed: int = 0,
    sample: str | Path | None = None,
) -> tuple[Path, ModelManifest]:
    """Compile the model (its dynamic input dimensions fixed by `shapes`) and write
    DIR/<model>.{so,onnx,json}, atomically (the manifest last), verified against
    onnxruntime on the model as given unless `verify` is off (on the `sample` inputs
    where given, `verify.sample_inputs`: checked before the compile, as is an integer
    input that needs them)."""
    import shutil
    import tempfile

    import tvm
    import tvm_ffi

    from convgen import __version__
    from convgen.compiler.build import move_into_place
    from convgen.runtime.manifest import ArtifactFile, TargetRecord, not_run
    from convgen.runtime.model import Model
    from convgen.runtime.verify import sample_inputs, verify_model

    source = Path(model_path)
    name = source.stem
    model = read_model(source, shapes)
    if sample is not None and not verify:
        raise ArgumentError("inputs: sample inputs are for the verification, which "
                            "--no-verify turns off")
    if verify:
        sample_inputs(model_io(model)[0], name, seed, sample)
    compiled = compile_model(model, name, target, options)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConvgenError(f"out: cannot create {out}: {err.strerror}") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
    try:
        t0 = time.perf_counter()
        device = _write_device_code(compiled.lib, target, tmp / name) if target.is_cuda else {}
        t1 = time.perf_counter()
        compiled.lib.export_library(str(tmp / f"{name}.so"))
        references = _write_reference(source, tmp / f"{name}.onnx")
        seconds = {**compiled.seconds, **({"nvcc": t1 - t0} if device else {}),
                   "export": time.perf_counter() - t1}
        manifest = ModelManifest(
            name=name,
            target=TargetRecord(target_name or target.key(), target.kind, target.key(),
                                target.config_dict),
            files={"module": ArtifactFile.of(tmp / f"{name}.so"),
                   **{role: ArtifactFile.of(path)
                      for role, path in {**device, **references}.items()}},
            mode=options.mode,
            layout=options.layout,
            inputs=compiled.inputs,
            outputs=compiled.outputs,
            layers=compiled.layers,
            other_ops=compiled.other_ops,
            versions={"convgen": __version__, "tvm": tvm.__version__,
                      "tvm_ffi": tvm_ffi.__version__},
            verification=not_run("skipped (--no-verify)"),
            build_seconds=seconds,
        )
        path = tmp / f"{name}{SUFFIX}"
        if verify:
            report = verify_model(Model(path, manifest), seed=seed, sample=sample)
            manifest = dataclasses.replace(manifest, verification=report)
        manifest.write(path)
        move_into_place(tmp, out, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / f"{name}{SUFFIX}", manifest


@contextmanager
def _device_code_by_nvcc(target: TargetInfo) -> Iterator[None]:
    """Where TVM's CUDA runtime is loaded in this process (a machine with a GPU), TVM
    compiles the kernels as it generates them, through `tvm_callback_cuda_compile`
    (TVM's own defaults to NVRTC, which needs the cuda-python bindings): within this
    context convgen's nvcc answers, for the target's arch (`_device_binary`, whose
    cubin `_write_device_code` then ships without compiling again)."""
    import tvm_ffi

    if not target.is_cuda:
        yield
        return
    name = "tvm_callback_cuda_compile"
    previous = tvm_ffi.get_global_func(name, allow_missing=True)
    tvm_ffi.register_global_func(name, lambda code, *_: _device_binary(code, target.arch),
                                 override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(name, previous, override=True)


@functools.lru_cache(maxsize=4)
def _device_binary(code: str, arch: str) -> bytes:
    """nvcc's cubin of a model's device code, once: where TVM compiled it at build
    time (`_device_code_by_nvcc`), `_write_device_code` ships that same cubin."""
    from convgen.runtime.nvcc import device_binary

    return device_binary(code, arch)


def _write_device_code(lib: Any, target: TargetInfo, stem: Path) -> dict[str, Path]:
    """A CUDA model's kernels compiled here, beside its library. TVM's CUDA code
    generator hands the kernels' source to TVM's CUDA runtime, which compiles it when
    the module is created; where that runtime cannot load (no NVIDIA driver, as on a
    build machine) the module keeps the source, and whoever loads the library is asked
    to compile it (`tvm_callback_cuda_compile`). So nvcc compiles that source here for
    the target's arch, and both travel with the artifact: STEM.cu (the source, as the
    library holds it) and STEM.cubin; the loader answers TVM's request with the cubin
    (`runtime.model`), with no compiler on the deployment machine. Returns the files
    by manifest role."""
    from convgen.runtime.model import DEVICE_BINARY, DEVICE_SOURCE

    def cuda_modules(module: Any) -> list[Any]:
        found = [module] if module.kind == "cuda" else []
        return found + [m for sub in module.imports for m in cuda_modules(sub)]

    modules = cuda_modules(lib.mod)
    if len(modules) != 1:
        raise UnsupportedError(f"model: {len(modules)} CUDA modules in the library, "
                               "deploy ships one")
    code = modules[0].inspect_source("cuda")
    paths = {DEVICE_SOURCE: stem.with_suffix(".cu"), DEVICE_BINARY: stem.with_suffix(".cubin")}
    paths[DEVICE_SOURCE].write_text(code)
    paths[DEVICE_BINARY].write_bytes(_device_binary(code, target.arch))
    return paths


def _write_reference(source: Path, dest: Path) -> dict[str, Path]:
    """The model as given, into the artifact (the reference `verify` and `bench` run
    onnxruntime on): a copy of the file, or, for a model that keeps its weights in
    external data files beside it (as exporters write models past protobuf's 2 GB),
    the model with all of its data gathered into one file beside it, DEST.data.
    Returns the files by manifest role: "onnx", and "onnx_data" where there is one."""
    import shutil

    import onnx
    from onnx.external_data_helper import uses_external_data

    header = onnx.load(str(source), load_external_data=False)
    if not any(uses_external_data(t) for t in header.graph.initializer):
        shutil.copyfile(source, dest)
        return {"onnx": dest}
    data = dest.with_name(f"{dest.name}.data")
    onnx.save(onnx.load(str(source)), str(dest), save_as_external_data=True,
              all_tensors_to_one_file=True, location=data.name)
    data.chmod(dest.stat().st_mode)  # (onnx creates it owner-only)
    return {"onnx": dest, "onnx_data": data}
