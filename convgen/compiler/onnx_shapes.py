"""An ONNX model's shape arithmetic, folded into constants before `deploy` imports it.

Exporters write a reshape whose target is computed from the tensor's own shape:
torch's `x.view(n, groups, c // groups, h, w)` (ShuffleNet's channel shuffle)
becomes Shape -> Gather -> Div -> Unsqueeze -> Concat -> Reshape. A deployment's
input shapes are fixed, so these are constants; TVM's ONNX frontend imports them
as tensor arithmetic run at every call instead, and the reshape's result then has
no static shape, which Relax's later passes (layout conversion, legalization)
need. Here every node whose outputs are integer tensors and whose inputs are
constants, or that is the Shape of a tensor whose shape inference knows, is
evaluated (onnx's reference evaluator) and replaced by an initializer. Float
tensors are never computed here: weights stay as the model gives them."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

SHAPE_DTYPES = (TensorProto.INT64, TensorProto.INT32)


def fold_shape_arithmetic(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its integer shape arithmetic replaced by initializers (the model
    itself where there is none). A folded constant can make a later tensor's shape
    known (a Slice's bounds), so shape inference runs again until nothing folds."""
    if not any(node.op_type == "Shape" for node in model.graph.node):
        return model  # (nothing computed from its own shapes: imported as exported)
    while True:
        folded = _fold_once(model)
        if folded is model:
            return model
        model = folded


def _fold_once(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        graph = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # (onnx's own errors; the import then reports the model's)
        return model
    elem: dict[str, int] = {}
    static: dict[str, tuple[int, ...]] = {}
    for info in (*graph.input, *graph.value_info, *graph.output):
        t = info.type.tensor_type
        elem[info.name] = t.elem_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            static[info.name] = tuple(d.dim_value for d in t.shape.dim)
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    opset = {o.domain or "": o.version for o in model.opset_import}
    folded: dict[str, np.ndarray] = {}
    kept = []
    for node in model.graph.node:
        outputs = _evaluate(node, values, static, opset) if all(
            elem.get(o) in SHAPE_DTYPES for o in node.output) else None
        if outputs is None:
            kept.append(node)
            continue
        for name, value in zip(node.output, outputs):
            values[name] = folded[name] = np.asarray(value)
    if not folded:
        return model
    read = {i for node in kept for i in node.input} | {o.name for o in model.graph.output}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(kept)
    out.graph.initializer.extend(numpy_helper.from_array(v, name)
                                 for name, v in folded.items() if name in read)
    return out


def _evaluate(node: onnx.NodeProto, values: dict[str, np.ndarray],
              static: dict[str, tuple[int, ...]], opset: dict[str, int]
              ) -> list[np.ndarray] | None:
    """The node's outputs where they are constants (None where not), computed as the
    model's opset defines its operator."""
    if node.op_type == "Shape" and node.input[0] in static:
        attrs = {a.name: a.i for a in node.attribute}
        shape = static[node.input[0]]
        start, end = attrs.get("start", 0), attrs.get("end", len(shape))
        return [np.array(shape[start:end], np.int64)]
    if node.domain not in ("", "ai.onnx") or not all(not i or i in values for i in node.input):
        return None
    from onnx.reference import ReferenceEvaluator

    feeds = {i: values[i] for i in node.input if i}
    try:
        return list(ReferenceEvaluator(node, opsets={"": opset.get("", 1)}).run(None, feeds))
    except Exception:  # an operator the reference evaluator lacks: left to the import
        return None
