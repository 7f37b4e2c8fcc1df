"""A whole ONNX model -> one deployable module whose convolutions are convgen's kernels.

The pipeline (TVM Relax):

  1. `from_onnx`, the initializers as constants; BatchNorm and friends decomposed.
  2. The activations' layout for the whole graph: channels-last converts every
     convolution to NHWC (NWC, NDHWC) with OHWI weights, and Relax's ConvertLayout
     carries the layout through the element-wise and pooling operators between
     them, so the only transposes left are at the model's edges (the weights'
     are folded into the constants).
  3. `_ConvFuser`: every convolution with constant weights, with the operators
     that follow it and only read it (+ bias, + a residual tensor, then ReLU,
     ReLU6 or SiLU), becomes one call of a convgen kernel for that spec, with
     its epilogue fused (`ConvSpec.residual`, `.activation`): the run-packed
     entry, scheduled by the chooser (a tuned record where the library has one),
     on weights packed at build time (`conv`'s flip included), so a deployment
     never packs at all.
  4. The other operators: legalized to TIR, fused (FuseOps/FuseTIR), and given
     a generic CPU schedule (`schedule/model_ops.py`); Relax's default CPU
     pipeline would leave them unscheduled.
  5. `tvm.compile` to a Relax VM executable, exported as one shared library that
     needs TVM's runtime library, not its compiler (`runtime/model.py`).

ONNX's Conv is cross-correlation; `mode="conv"` compiles every convolution as a
true convolution of the model's weights (weights trained where convolution
flips, as DSP code and the seed documents' porting mistake have it).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from convgen.compiler.build import lower
from convgen.compiler.compute import WeightPacking, pack_prim_func
from convgen.compiler.targets import TargetInfo
from convgen.errors import ConvgenError, SpecError, UnsupportedError
from convgen.runtime.manifest import (
    PACK_ENTRY,
    RUN_PACKED_ENTRY,
    SUFFIX,
    ModelLayer,
    ModelManifest,
    ScheduleChoice,
    TensorInfo,
)
from convgen.spec import CHANNELS_FIRST, CHANNELS_LAST, MODES, ConvSpec, make_spec

if TYPE_CHECKING:
    import onnx
    from tvm import IRModule, relax

LAYOUTS = ("channels-last", "channels-first")
# Relax's convolution operators and their spatial rank
CONV_OPS = {"relax.nn.conv1d": 1, "relax.nn.conv2d": 2, "relax.nn.conv3d": 3}
# the weight layout that goes with each activation layout (convgen's: spec.py)
WEIGHT_LAYOUTS = {"NCW": "OIW", "NCHW": "OIHW", "NCDHW": "OIDHW",
                  "NWC": "OWI", "NHWC": "OHWI", "NDHWC": "ODHWI"}
OPAQUE = 8  # Relax's OpPatternKind kOpaque: FuseOps fuses nothing into a convgen kernel


@dataclass(frozen=True)
class DeployOptions:
    mode: str = "corr"  # how to read the model's Conv nodes: "corr" (ONNX) or "conv"
    layout: str = "channels-last"  # the activations' layout between layers (LAYOUTS)
    algorithm: str = "auto"  # the chooser's algorithm for every convolution
    library: Path | None = None  # the record library (None: the shipped one)

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


def read_model(path: str | Path) -> onnx.ModelProto:
    """The ONNX model with every shape inferred; bad files are one clear error."""
    import onnx
    from onnx import shape_inference

    try:
        model = shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    except Exception as err:  # onnx raises several unrelated types
        raise SpecError(f"model: cannot read ONNX model {path}: {err}") from None
    return model


def model_io(model: onnx.ModelProto) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """The model's inputs (initializers excluded) and outputs, with static shapes."""
    import onnx

    inits = {t.name for t in model.graph.initializer}

    def info(vi: Any, what: str) -> TensorInfo:
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        if any(d <= 0 for d in dims):
            raise UnsupportedError(f"model: {what} {vi.name!r} has no static shape "
                                   f"({dims}); export the model with fixed shapes")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        return TensorInfo(vi.name, tuple(dims), dtype)

    inputs = [info(vi, "input") for vi in model.graph.input if vi.name not in inits]
    return inputs, [info(vi, "output") for vi in model.graph.output]


def compile_model(model: onnx.ModelProto, name: str, target: TargetInfo,
                  options: DeployOptions) -> CompiledModel:
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from convgen.compiler.schedule.model_ops import schedule_model_ops

    if target.is_cuda:
        raise UnsupportedError("target: deploy builds CPU (llvm) models for now; CUDA "
                               "models are not supported yet")
    inputs, outputs = model_io(model)
    t0 = time.perf_counter()
    try:
        mod = from_onnx(model, keep_params_in_input=False)
    except Exception as err:  # the frontend's errors name the operator
        raise UnsupportedError(f"model: TVM cannot import {name}: "
                               f"{str(err).strip().splitlines()[-1]}") from None
    mod = relax.transform.DecomposeOpsForInference()(mod)
    if options.layout == "channels-last":
        desired = {op: [CHANNELS_LAST[nd], WEIGHT_LAYOUTS[CHANNELS_LAST[nd]]]
                   for op, nd in CONV_OPS.items()}
        mod = relax.transform.ConvertLayout(desired)(mod)
    mod = relax.transform.FoldConstant()(mod)  # bias reshapes, weight transposes
    t1 = time.perf_counter()
    mod, layers = _ConvFuser.run(mod, target, options, _node_names(model))
    t2 = time.perf_counter()
    with target.tvm_target():
        mod = tvm.transform.Sequential([
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            relax.transform.DeadCodeElimination(),
            schedule_model_ops(),
        ])(mod)
    kernels = {layer.kernel for layer in layers}
    other_ops = sorted(gv.name_hint for gv, f in mod.functions.items()
                       if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint not in kernels)
    t3 = time.perf_counter()
    try:
        lib = tvm.compile(mod, target=target.tvm_target())
    except Exception as err:
        raise UnsupportedError(f"model: TVM could not compile {name}: "
                               f"{str(err).strip().splitlines()[-1]}") from None
    t4 = time.perf_counter()
    return CompiledModel(name, lib, inputs, outputs, layers, other_ops, seconds={
        "import": t1 - t0, "kernels": t2 - t1, "other_ops": t3 - t2, "tvm_compile": t4 - t3})


def _node_names(model: onnx.ModelProto) -> list[str]:
    """The model's Conv nodes' names, in graph order (the frontend keeps that order)."""
    return [n.name or f"Conv_{i}" for i, n in enumerate(model.graph.node) if n.op_type == "Conv"]


# ---- the convolutions and their epilogues ---------------------------------------------


@dataclass
class _Kernel:
    """One spec's kernel: the run-packed entry, as the chooser scheduled it."""

    func: Any  # the PrimFunc, marked opaque and scheduled
    choice: ScheduleChoice
    packing: WeightPacking
    gvar: Any = None  # its GlobalVar, once added to the model's module


@dataclass
class _Chain:
    """A convolution and the bindings after it that fold into its write-back."""

    conv: relax.Call
    end: relax.Call  # the value of the last folded binding (replaced by the kernel)
    bias: np.ndarray | None = None
    residual: relax.Expr | None = None
    activation: str = "none"
    fused: list[str] = field(default_factory=list)  # the folded operators, for the manifest


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
        self.users: dict[Any, list[Any]] = {}  # var -> the binding vars whose value reads it
        self.kernels: dict[ConvSpec, _Kernel] = {}

    @classmethod
    def run(cls, mod: IRModule, target: TargetInfo, options: DeployOptions,
            node_names: list[str]) -> tuple[IRModule, list[ModelLayer]]:
        from tvm import relax

        self = cls(mod, target, options)
        self._scan(mod["main"])
        chains = [c for c in (self._chain(value) for value in self.bindings.values()
                              if _op(value) in CONV_OPS) if c is not None]
        specs = [self._spec(c) for c in chains]
        self._build_kernels(sorted(set(specs), key=lambda s: s.name()))
        packed = self._pack(chains, specs)
        ends = {c.end: (c, s, w) for c, s, w in zip(chains, specs, packed)}
        fuser = self

        @relax.expr_functor.mutator
        class Rewriter(relax.PyExprMutator):  # type: ignore[misc]
            def visit_call_(self, call: Any) -> Any:
                if call in ends:
                    chain, spec, weight = ends[call]
                    gvar = fuser.kernels[spec].gvar
                    args = [self.visit_expr(chain.conv.args[0]), relax.const(weight)]
                    if chain.bias is not None:
                        args.append(relax.const(chain.bias))
                    if chain.residual is not None:
                        args.append(self.visit_expr(chain.residual))
                    return relax.call_tir(gvar, args, chain.end.ty)
                return super().visit_call_(call)

        rewriter = Rewriter(mod)
        for spec, kernel in self.kernels.items():
            kernel.gvar = rewriter.builder_.add_func(kernel.func, self._kernel_name(spec))
        main = rewriter.visit_expr(mod["main"])
        rewriter.builder_.update_func(mod.get_global_var("main"), main)
        out = relax.transform.DeadCodeElimination(["main"])(rewriter.builder_.get())
        layers = [
            ModelLayer(node_names[i] if i < len(node_names) else f"conv_{i}",
                       tuple(c.fused), self._kernel_name(s), s, self.kernels[s].choice,
                       self.kernels[s].packing.algorithm)
            for i, (c, s) in enumerate(zip(chains, specs))
        ]
        return out, layers

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
                self.current = binding.var
                self.visit_expr(binding.value)

            def visit_var_(self, var: Any) -> None:
                fuser.users.setdefault(var, []).append(getattr(self, "current", None))

            def visit_dataflow_var_(self, var: Any) -> None:
                self.visit_var_(var)

        Scan().visit_expr(func)

    def _only_user(self, var: Any) -> Any | None:
        users = self.users.get(var, [])
        return users[0] if len(users) == 1 and users[0] is not None else None

    def _chain(self, conv: Any) -> _Chain | None:
        """The convolution and what folds into it, or None where convgen cannot take it
        (weights not constant, a layout without a convgen kernel, ...)."""
        nd = CONV_OPS[_op(conv) or ""]
        a = conv.attrs
        layout = str(a.data_layout)
        if (_const(conv.args[1]) is None or layout not in (CHANNELS_FIRST[nd], CHANNELS_LAST[nd])
                or str(a.kernel_layout) != WEIGHT_LAYOUTS[layout]
                or str(a.out_layout) != layout or str(conv.ty.dtype) not in ("float32",)):
            return None
        var = next(v for v, value in self.bindings.items() if value.same_as(conv))
        chain = _Chain(conv, conv)
        channel_axis = layout.index("C")
        out_shape = _shape(conv)
        while True:
            user = self._only_user(var)
            if user is None:
                silu = self._silu(var)
                if silu is None or chain.activation != "none":
                    break
                var, chain.activation = silu, "silu"
                chain.end = self.bindings[var]
                chain.fused += ["Sigmoid", "Mul"]
                break
            value, op = self.bindings[user], _op(self.bindings[user])
            if op == "relax.add" and chain.activation == "none":
                other = value.args[1] if value.args[0].same_as(var) else value.args[0]
                bias = _const(other)
                if (bias is not None and chain.bias is None and chain.residual is None
                        and _per_channel(bias, out_shape, channel_axis)):
                    chain.bias = np.ascontiguousarray(bias.reshape(-1), dtype=np.float32)
                elif (bias is None and chain.residual is None and _shape(other) == out_shape
                      and str(other.ty.dtype) == str(conv.ty.dtype)):
                    chain.residual = other
                else:
                    break
                chain.fused.append("Add")
            elif op == "relax.nn.relu" and chain.activation == "none":
                chain.activation = "relu"
                chain.fused.append("Relu")
            elif (op == "relax.minimum" and chain.activation == "relu"
                  and _is_scalar(_const(value.args[1]), 6.0)):
                chain.activation = "relu6"  # ONNX Clip(0, 6), as `normalize_model` wrote it
                chain.fused[-1] = "Clip"
            else:
                break
            var, chain.end = user, value
        return chain

    def _silu(self, var: Any) -> Any | None:
        """x * sigmoid(x) on `var` (its two users): the multiply's var, else None."""
        users = self.users.get(var, [])
        if len(users) != 2 or None in users:
            return None
        by_op = {_op(self.bindings[u]): u for u in users}
        sig, mul = by_op.get("relax.sigmoid"), by_op.get("relax.multiply")
        if sig is None or mul is None or self._only_user(sig) != mul:
            return None
        return mul

    def _spec(self, chain: _Chain) -> ConvSpec:
        conv, a = chain.conv, chain.conv.attrs
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
            bias=chain.bias is not None,
            residual=chain.residual is not None,
            activation=chain.activation,
        )

    def _build_kernels(self, specs: list[ConvSpec]) -> None:
        """Each spec's run-packed entry, scheduled by the chooser (records first)."""
        for spec in specs:
            mod, choice, packing = lower(spec, self.target, library=self.options.library,
                                         algorithm=self.options.algorithm)
            if packing is None:
                raise UnsupportedError(f"model: {spec.name()} has no packed entry on "
                                       f"{self.target.key()}")
            func = (mod[RUN_PACKED_ENTRY].without_attr("global_symbol")
                    .with_attr("op_pattern", OPAQUE).with_attr("tirx.is_scheduled", True))
            self.kernels[spec] = _Kernel(func, choice, packing)

    def _pack(self, chains: list[_Chain], specs: list[ConvSpec]) -> list[np.ndarray]:
        """Every chain's weights in its kernel's packed layout, flip included: the
        kernels' packing entries, compiled together once and run here."""
        import tvm

        if not chains:
            return []
        # each kernel's packing entry under its own name: one module holds them all
        names = {spec: f"{PACK_ENTRY}_{i}" for i, spec in enumerate(self.kernels)}
        funcs = {names[s]: pack_prim_func(s, self.target, k.packing)
                 .with_attr("global_symbol", names[s]) for s, k in self.kernels.items()}
        lib = tvm.compile(tvm.IRModule(funcs), target=self.target.tvm_target())
        packed = []
        for chain, spec in zip(chains, specs):
            weight = tvm.runtime.tensor(np.ascontiguousarray(_const(chain.conv.args[1])))
            out = tvm.runtime.empty(self.kernels[spec].packing.packed_shape(spec), spec.dtype)
            lib[names[spec]](weight, out)
            packed.append(out.numpy())
        return packed


def _per_channel(values: np.ndarray, out_shape: tuple[int, ...], channel_axis: int) -> bool:
    """Whether a constant added to the output is one value per output channel."""
    channels = out_shape[channel_axis]
    if values.ndim == len(out_shape):
        return all(d == (channels if i == channel_axis else 1) for i, d in enumerate(values.shape))
    return values.ndim == 1 and values.shape[0] == channels and channel_axis == len(out_shape) - 1


def _is_scalar(values: np.ndarray | None, want: float) -> bool:
    return values is not None and values.size == 1 and float(values.reshape(-1)[0]) == want


# ---- the model as given, made ready ---------------------------------------------------


def normalize_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Clip(x, 0, 6) (ReLU6) as Min(Relu(x), 6), the same function, which the Relax
    frontend imports as two plain operators `_ConvFuser` can read (it lowers Clip to
    anonymous TIR). A copy; the model given is left as it is."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t)
              for n in model.graph.node if n.op_type == "Constant" and n.attribute
              and n.attribute[0].name == "value"}
    inits.update(consts)
    nodes = []
    six = "convgen_relu6_max"
    for node in model.graph.node:
        bounds = [inits.get(name) for name in node.input[1:3]] if len(node.input) == 3 else []
        if (node.op_type == "Clip" and len(bounds) == 2 and _is_scalar(bounds[0], 0.0)
                and _is_scalar(bounds[1], 6.0)):
            relu = f"{node.output[0]}_convgen_relu"
            nodes.append(helper.make_node("Relu", [node.input[0]], [relu],
                                          name=f"{node.name}_relu"))
            nodes.append(helper.make_node("Min", [relu, six], list(node.output),
                                          name=node.name))
            if six not in inits:
                model.graph.initializer.append(numpy_helper.from_array(
                    np.array(6.0, dtype=np.float32), six))
                inits[six] = np.array(6.0)
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def layer_summary(layers: list[ModelLayer]) -> list[str]:
    """One line per distinct kernel: how many layers run it, its algorithm and schedule."""
    counts: dict[str, list[ModelLayer]] = {}
    for layer in layers:
        counts.setdefault(layer.kernel, []).append(layer)
    lines = []
    for group in counts.values():
        first = group[0]
        fused = "+".join(first.fused) or "-"
        lines.append(f"{len(group)} x {first.spec.name()} [{first.algorithm}, "
                     f"{first.schedule.brief()}, fused {fused}]")
    return lines



def deploy_artifact(
    model_path: str | Path,
    target: TargetInfo,
    out_dir: str | Path,
    options: DeployOptions,
    *,
    target_name: str = "",
    verify: bool = True,
    seed: int = 0,
) -> tuple[Path, ModelManifest]:
    """Compile the model and write DIR/<model>.{so,onnx,json}, atomically (the manifest
    last), verified against onnxruntime on the model as given unless `verify` is off."""
    import shutil
    import tempfile

    import tvm
    import tvm_ffi

    from convgen import __version__
    from convgen.compiler.build import _move_into_place
    from convgen.runtime.manifest import ArtifactFile, TargetRecord, not_run
    from convgen.runtime.model import Model
    from convgen.runtime.verify import verify_model

    source = Path(model_path)
    name = source.stem
    model = read_model(source)
    compiled = compile_model(normalize_model(model), name, target, options)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConvgenError(f"out: cannot create {out}: {err.strerror}") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
    try:
        t0 = time.perf_counter()
        compiled.lib.export_library(str(tmp / f"{name}.so"))
        shutil.copyfile(source, tmp / f"{name}.onnx")
        seconds = {**compiled.seconds, "export": time.perf_counter() - t0}
        manifest = ModelManifest(
            name=name,
            target=TargetRecord(target_name or target.key(), target.kind, target.key(),
                                target.config_dict),
            files={role: ArtifactFile.of(tmp / f"{name}{suffix}")
                   for role, suffix in (("module", ".so"), ("onnx", ".onnx"))},
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
            report = verify_model(Model(path, manifest), seed=seed)
            manifest = dataclasses.replace(manifest, verification=report)
        manifest.write(path)
        _move_into_place(tmp, out, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / f"{name}{SUFFIX}", manifest
