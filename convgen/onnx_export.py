"""ConvSpec -> an ONNX model of standard ops that computes exactly what the kernel computes.

Same inputs (`data`, `weight`[, `bias`][, `residual`]), same output (`out`), same
shapes and dtypes as the compiled kernel:

  * `corr` is one Conv node (ONNX Conv is cross-correlation).
  * `conv` flips the weight input inside the graph (Slice with step -1 on every
    spatial axis), so both modes take the same unflipped weights.
  * channels-last layouts go through Transpose nodes to and from ONNX's NCHW.
  * float16 is cast to float32 around the Conv: the kernel multiplies and
    accumulates in float32 and rounds once at the end, and so does this graph.
  * the fused epilogue follows as Add (residual) and the activation's nodes, in
    float32, as the kernel's write-back computes it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from convgen.spec import ConvSpec

if TYPE_CHECKING:
    import onnx

# onnxruntime 1.31/1.32 rejects the IR version onnx 1.23 writes by default (14);
# opset 21 with IR 10 is the newest pair both accept.
OPSET = 21
IR_VERSION = 10
# the nodes whose weights `conv` mode reads flipped
CONVOLUTIONS = ("Conv", "ConvTranspose")


def export_onnx(spec: ConvSpec, constants: Mapping[str, np.ndarray] | None = None
                ) -> onnx.ModelProto:
    """The model. `constants` (`weight`, `bias`) are stored as initializers instead of
    taken as inputs, as a deployed model carries its weights (which lets onnxruntime
    prepack them)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nd = spec.ndim
    elem = TensorProto.FLOAT16 if spec.dtype == "float16" else TensorProto.FLOAT
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def node(op: str, inputs: list[str], output: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    # channels-last -> channels-first: N x S... x C -> N x C x S...; same move for
    # the K x R... x C/g weight.
    to_first = [0, nd + 1, *range(1, nd + 1)]
    data = node("Transpose", ["data"], "data_nc", perm=to_first) if spec.channels_last else "data"
    weight = (
        node("Transpose", ["weight"], "weight_kc", perm=to_first)
        if spec.channels_last
        else "weight"
    )
    bias = "bias" if spec.bias else ""
    if spec.dtype != "float32":
        data = node("Cast", [data], "data_f32", to=TensorProto.FLOAT)
        weight = node("Cast", [weight], "weight_f32", to=TensorProto.FLOAT)
        if bias:
            bias = node("Cast", [bias], "bias_f32", to=TensorProto.FLOAT)
    if spec.mode == "conv":
        weight = node(*_reversed_window(weight, nd, "flip", inits), "weight_flipped")
    y = node(
        "Conv",
        [data, weight, *([bias] if bias else [])],
        "conv_nc",
        kernel_shape=list(spec.kernel_size),
        pads=list(spec.pads),
        strides=list(spec.stride),
        dilations=list(spec.dilation),
        group=spec.groups,
    )
    if spec.channels_last:
        y = node("Transpose", [y], "conv_nl", perm=[0, *range(2, nd + 2), 1])
    # the fused epilogue, in float32 and in the spec's layout, as the kernel's write-back
    if spec.residual:
        residual = "residual"
        if spec.dtype != "float32":
            residual = node("Cast", [residual], "residual_f32", to=TensorProto.FLOAT)
        y = node("Add", [y, residual], "plus_residual")
    y = _activation(spec.activation, y, node, inits)
    if spec.dtype != "float32":
        y = node("Cast", [y], "out_cast", to=elem)
    nodes[-1].output[0] = nodes[-1].name = "out"  # the last node writes the output

    constants = dict(constants or {})
    for name, value in constants.items():
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=spec.dtype), name))
    inputs = [helper.make_tensor_value_info(n, elem, s) for n, s in spec.input_shapes().items()
              if n not in constants]
    outputs = [helper.make_tensor_value_info("out", elem, spec.out_shape)]
    graph = helper.make_graph(nodes, spec.name(), inputs, outputs, initializer=inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="convgen",
        doc_string=spec.describe(),
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def _activation(activation: str, x: str, node: Callable[..., str],
                inits: list[onnx.TensorProto]) -> str:
    """The spec's activation (`spec.ACTIVATIONS`) as standard ONNX nodes; returns the
    result's name."""
    from onnx import numpy_helper

    if activation == "relu":
        return node("Relu", [x], "relu")
    if activation == "relu6":
        for name, v in (("clip_min", 0.0), ("clip_max", 6.0)):
            inits.append(numpy_helper.from_array(np.array(v, dtype=np.float32), name))
        return node("Clip", [x, "clip_min", "clip_max"], "relu6")
    if activation == "silu":
        return node("Mul", [x, node("Sigmoid", [x], "sigmoid")], "silu")
    if activation == "hardswish":
        return node("HardSwish", [x], "hardswish")
    return x


def _reversed_window(weight: str, nd: int, prefix: str, inits: list[onnx.TensorProto]
                     ) -> tuple[str, list[str]]:
    """(op, inputs) of the node that reverses a K x C x R... weight on its `nd` window
    axes (a Slice of step -1, opset 10 on), its constants added to `inits` named
    `prefix`_starts ... ."""
    from onnx import numpy_helper

    names = []
    for name, values in (
        ("starts", [-1] * nd),
        ("ends", [np.iinfo(np.int64).min] * nd),
        ("axes", list(range(2, 2 + nd))),
        ("steps", [-1] * nd),
    ):
        names.append(f"{prefix}_{name}")
        inits.append(numpy_helper.from_array(np.array(values, dtype=np.int64), names[-1]))
    return "Slice", [weight, *names]


def flip_conv_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every Conv's and ConvTranspose's weights flipped on each spatial
    axis: what onnxruntime must run to compute a `conv`-mode deployment (conv(I, W) ==
    Conv(I, flip(W)); a ConvTranspose is that Conv's adjoint). Initializers that only
    those nodes read are flipped in place; any other weight (a Constant's, a
    DequantizeLinear's, a graph input) is reversed by the Slice single kernels' ONNX
    export flips with, inserted before its node."""
    import onnx
    from onnx import helper, numpy_helper, shape_inference

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    convs = [n for n in graph.node if n.op_type in CONVOLUTIONS]
    weights = {n.input[1] for n in convs}
    read_elsewhere = {name for n in graph.node for k, name in enumerate(n.input)
                      if n.op_type not in CONVOLUTIONS or k != 1}
    initializers = {t.name for t in graph.initializer} - {i.name for i in graph.input}
    in_place = (weights & initializers) - read_elsewhere
    for i, t in enumerate(graph.initializer):
        if t.name in in_place:
            w = numpy_helper.to_array(t)
            flipped = np.ascontiguousarray(np.flip(w, axis=tuple(range(2, w.ndim))))
            graph.initializer[i].CopyFrom(numpy_helper.from_array(flipped, t.name))
    if all(n.input[1] in in_place for n in convs):
        return model
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in (
        *shape_inference.infer_shapes(model).graph.value_info, *graph.input)}
    ranks.update({t.name: len(t.dims) for t in graph.initializer})  # (shared ones)
    nodes = []
    for k, node in enumerate(graph.node):
        if node.op_type in CONVOLUTIONS and node.input[1] not in in_place:
            w, prefix = node.input[1], f"{node.input[1]}_flip_{k}"
            inits: list[onnx.TensorProto] = []
            op, inputs = _reversed_window(w, ranks[w] - 2, prefix, inits)
            graph.initializer.extend(inits)
            nodes.append(helper.make_node(op, inputs, [f"{prefix}_out"]))
            node.input[1] = f"{prefix}_out"
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model
