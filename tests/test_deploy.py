"""`convgen deploy`: whole ONNX models on convgen's kernels, in both modes and both
activation layouts, against onnxruntime on the model as given (for `conv`, on the
model with its Conv weights flipped). The models are small and generated here."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import convgen
from convgen.cli import main
from convgen.compiler.deploy import IN_PLACE_SUFFIX, DeployOptions, deploy_artifact
from convgen.onnx_export import IR_VERSION, OPSET, flip_conv_weights
from convgen.runtime.verify import (
    MODEL_TOLERANCE,
    MODEL_TOLERANCES,
    model_inputs,
    ort_session,
    verify_model,
)


class Net:
    """A small ONNX graph, built node by node, weights random and asymmetric."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def init_shape(self, name: str, shape: list[int] | int) -> str:
        self.inits.append(numpy_helper.from_array(np.array(shape, np.int64), name))
        return name

    def op(self, op: str, inputs: list[str], out: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, out: str, c_in: int, c_out: int, kernel: tuple[int, ...],
             bias: bool = True, **attrs: object) -> str:
        groups = int(attrs.get("group", 1))
        w = self.rng.standard_normal((c_out, c_in // groups, *kernel))
        w /= np.sqrt(c_in // groups * np.prod(kernel))
        inputs = [x, self.init(f"{out}_w", w)]
        if bias:
            inputs.append(self.init(f"{out}_b", self.rng.standard_normal(c_out) * 0.1))
        return self.op("Conv", inputs, out, kernel_shape=list(kernel), **attrs)

    def model(self, x_shape: tuple[int, ...], y: str, y_shape: tuple[int, ...]
              ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
            [helper.make_tensor_value_info(y, TensorProto.FLOAT, y_shape)],
            initializer=self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION)
        onnx.checker.check_model(m, full_check=True)
        return m


def residual_block() -> tuple[onnx.ModelProto, int]:
    """ResNet's basic block and head: Conv+Relu, Conv+Add+Relu, a projection shortcut,
    MaxPool, GlobalAveragePool, Gemm."""
    n = Net(1)
    a = n.op("Relu", [n.conv("x", "c1", 8, 16, (3, 3), pads=[1, 1, 1, 1])], "r1")
    b = n.conv(a, "c2", 16, 16, (3, 3), pads=[1, 1, 1, 1])
    r = n.op("Relu", [n.op("Add", [b, a], "add1")], "r2")
    c = n.op("Relu", [n.conv(r, "c3", 16, 24, (3, 3), strides=[2, 2], pads=[1, 1, 1, 1])], "r3")
    d = n.conv(c, "c4", 24, 24, (3, 3), pads=[1, 1, 1, 1])
    short = n.conv(r, "c5", 16, 24, (1, 1), strides=[2, 2])
    e = n.op("Relu", [n.op("Add", [d, short], "add2")], "r4")
    p = n.op("MaxPool", [e], "pool", kernel_shape=[2, 2], strides=[2, 2])
    g = n.op("Flatten", [n.op("GlobalAveragePool", [p], "gap")], "flat", axis=1)
    y = n.op("Gemm", [g, n.init("fc_w", n.rng.standard_normal((10, 24)) * 0.2),
                      n.init("fc_b", n.rng.standard_normal(10))], "y", transB=1)
    return n.model((1, 8, 12, 12), y, (1, 10)), 5


def depthwise_block() -> tuple[onnx.ModelProto, int]:
    """MobileNetV2's inverted residual: 1x1 + ReLU6 (Clip), depthwise 3x3 + ReLU6, 1x1
    projection + residual Add; then a strided depthwise layer with asymmetric pads and
    MobileNetV3's HardSwish."""
    n = Net(2)
    lo, hi = n.init("lo", np.array(0.0)), n.init("hi", np.array(6.0))
    a = n.op("Clip", [n.conv("x", "e1", 16, 48, (1, 1)), lo, hi], "a1")
    b = n.op("Clip", [n.conv(a, "d1", 48, 48, (3, 3), group=48, pads=[1, 1, 1, 1]), lo, hi],
             "a2")
    c = n.op("Add", [n.conv(b, "p1", 48, 16, (1, 1)), "x"], "res")
    d = n.conv(c, "d2", 16, 16, (3, 3), group=16, strides=[2, 2], pads=[0, 1, 1, 0])
    return n.model((1, 16, 10, 10), n.op("HardSwish", [d], "hs"), (1, 16, 5, 5)), 4


def conv_1d_3d_grouped() -> tuple[onnx.ModelProto, int]:
    """A Conv1d (dilated, asymmetric pads) into a grouped Conv2d with SiLU, then a
    Conv3d: every rank, groups, the SiLU epilogue (Sigmoid and Mul)."""
    n = Net(3)
    a = n.conv("x", "c1", 4, 6, (3,), dilations=[2], pads=[2, 1])
    a = n.op("Relu", [a], "r1")  # 1 x 6 x 15
    b = n.op("Reshape", [a, n.init_shape("s1", [1, 6, 3, 5])], "to2d")
    c = n.conv(b, "c2", 6, 6, (2, 2), group=3, pads=[1, 0, 0, 1])  # 1 x 6 x 3 x 5
    c = n.op("Mul", [c, n.op("Sigmoid", [c], "sig")], "silu")
    d = n.op("Reshape", [c, n.init_shape("s2", [1, 6, 3, 5, 1])], "to3d")
    e = n.conv(d, "c3", 6, 4, (3, 3, 1), pads=[1, 1, 0, 1, 1, 0], bias=False)
    return n.model((1, 4, 16), e, (1, 4, 3, 5, 1)), 3


def batchnorm_block() -> tuple[onnx.ModelProto, int]:
    """Conv without bias + BatchNormalization + Relu, and Conv with bias + BatchNorm
    + residual Add: a model exported without folding its BatchNorms."""
    n = Net(4)

    def bn(x: str, out: str, c: int) -> str:
        params = [n.init(f"{out}_{p}", v) for p, v in (
            ("g", n.rng.uniform(0.5, 1.5, c)), ("b", n.rng.standard_normal(c) * 0.1),
            ("m", n.rng.standard_normal(c) * 0.1), ("v", n.rng.uniform(0.5, 2.0, c)))]
        return n.op("BatchNormalization", [x, *params], out)

    a = n.op("Relu", [bn(n.conv("x", "c1", 8, 16, (3, 3), bias=False, pads=[1, 1, 1, 1]),
                         "bn1", 16)], "r1")
    b = bn(n.conv(a, "c2", 16, 8, (1, 1)), "bn2", 8)
    y = n.op("Add", [b, "x"], "y")
    return n.model((1, 8, 6, 6), y, (1, 8, 6, 6)), 2


def shared_residuals() -> tuple[onnx.ModelProto, int]:
    """Residual Adds whose tensor is read again later (c3's), is read last (c4's), is
    the convolution's own input (c5's: conv(x) + x), or is the model's input (c6's;
    channels-last reads it transposed, an operator that only moves data, which Relax
    may run as a view)."""
    n = Net(5)
    a = n.op("Relu", [n.conv("x", "c1", 8, 8, (3, 3), pads=[1, 1, 1, 1])], "a")
    b = n.op("Relu", [n.conv(a, "c2", 8, 8, (1, 1))], "b")
    y1 = n.op("Add", [n.conv(b, "c3", 8, 8, (3, 3), pads=[1, 1, 1, 1]), a], "y1")
    y2 = n.op("Relu", [n.op("Add", [n.conv(y1, "c4", 8, 8, (1, 1)), a], "add4")], "y2")
    y3 = n.op("Add", [n.conv(y2, "c5", 8, 8, (3, 3), pads=[1, 1, 1, 1]), y2], "y3")
    y4 = n.op("Add", [n.conv(y3, "c6", 8, 8, (1, 1)), "x"], "y4")
    return n.model((1, 8, 6, 6), y4, (1, 8, 6, 6)), 6


def channel_shuffle() -> tuple[onnx.ModelProto, int]:
    """ShuffleNet's unit as torch exports it: `x.chunk(2, dim=1)` as Slices whose
    bounds are computed from the tensor's own shape (Shape, Gather, Add, Div, Mul),
    one half through a branch, the halves concatenated and shuffled by `view(n, 2,
    c // 2, h, w)` (its shape computed too), a transpose and a reshape back. `deploy`
    folds the shape arithmetic into constants before import."""
    n = Net(6)
    shape = n.op("Shape", ["x"], "shape")
    c = n.op("Gather", [shape, n.init_shape("channel_axis", [1])], "c", axis=0)
    half = n.op("Div", [n.op("Add", [c, n.init_shape("one", [1])], "c_plus_1"),
                        n.init_shape("two", [2])], "half")
    axis = n.init_shape("axis", [1])
    first = n.op("Slice", ["x", n.init_shape("zero", [0]), half, axis], "first")
    second = n.op("Slice", ["x", half, n.op("Mul", [half, "two"], "end"), axis], "second")
    b = n.op("Relu", [n.conv(second, "c1", 4, 4, (3, 3), pads=[1, 1, 1, 1])], "b")
    cat = n.op("Concat", [first, n.conv(b, "c2", 4, 4, (1, 1))], "cat", axis=1)
    cat_shape = n.op("Shape", [cat], "cat_shape")
    dims = [n.op("Gather", [cat_shape, n.init_shape(f"i{i}", [i])], f"d{i}", axis=0)
            for i in range(4)]
    split = n.op("Concat", [dims[0], n.init_shape("groups", [2]), half, dims[2], dims[3]],
                 "split_shape", axis=0)
    moved = n.op("Transpose", [n.op("Reshape", [cat, split], "split")], "moved",
                 perm=[0, 2, 1, 3, 4])
    shuffled = n.op("Reshape", [moved, n.init_shape("back", [1, 8, 6, 6])], "shuffled")
    y = n.conv(shuffled, "c3", 8, 8, (1, 1))
    return n.model((1, 8, 6, 6), y, (1, 8, 6, 6)), 3


def squeeze_excite() -> tuple[onnx.ModelProto, int]:
    """EfficientNet's block: a Conv with SiLU, the squeeze-excitation gate (global
    pooling, two 1x1 Convs, Sigmoid, Mul); then GELU (Erf), Tanh, Exp and Softmax,
    which `deploy` legalizes as vector arithmetic (`deploy._vector_math`), and
    MobileNetV3's HardSigmoid, imported as element-wise ops the layout flows
    through."""
    n = Net(7)
    a = n.conv("x", "c1", 8, 16, (3, 3), pads=[1, 1, 1, 1])
    a = n.op("Mul", [a, n.op("Sigmoid", [a], "a_sig")], "silu")
    s = n.op("Relu", [n.conv(n.op("GlobalAveragePool", [a], "gap"), "s1", 16, 4, (1, 1))],
             "s_relu")
    gate = n.op("Sigmoid", [n.conv(s, "s2", 4, 16, (1, 1))], "gate")
    b = n.conv(n.op("Mul", [a, gate], "excited"), "c2", 16, 8, (1, 1))
    erf = n.op("Erf", [n.op("Mul", [b, n.init("inv_sqrt2", np.array(0.5 ** 0.5))], "scaled")],
               "erf")
    gelu = n.op("Mul", [n.op("Mul", [b, n.init("half", np.array(0.5))], "half_b"),
                        n.op("Add", [erf, n.init("one", np.array(1.0))], "erf1")], "gelu")
    t = n.op("Add", [n.op("Tanh", [gelu], "tanh"),
                     n.op("Exp", [n.op("Mul", [b, n.init("tenth", np.array(0.1))], "b10")],
                          "exp")], "sum")
    t = n.op("Mul", [t, n.op("HardSigmoid", [b], "hsig", alpha=1 / 6, beta=0.5)], "gated")
    return n.model((1, 8, 6, 6), n.op("Softmax", [t], "y", axis=1), (1, 8, 6, 6)), 4


def token_mlp() -> tuple[onnx.ModelProto, int]:
    """ConvNeXt's block: a Conv, then Linear layers on the channels-last pixels (MatMul
    on [1, 36, 8] tokens and on [1, 6, 6, 16]) with a bias, GELU and a per-channel
    layer scale, and the residual: each MatMul runs as a 1 x 1 convolution."""
    n = Net(8)
    a = n.conv("x", "c1", 8, 8, (3, 3), pads=[1, 1, 1, 1], group=8)
    tokens = n.op("Reshape", [n.op("Transpose", [a], "nhwc", perm=[0, 2, 3, 1]),
                              n.init_shape("tokens_shape", [1, 36, 8])], "tokens")
    h = n.op("Add", [n.op("MatMul", [tokens, n.init("w1", n.rng.standard_normal((8, 16)))],
                          "m1"), n.init("b1", n.rng.standard_normal(16) * 0.1)], "h")
    erf = n.op("Erf", [n.op("Mul", [h, n.init("inv_sqrt2", np.array(0.5 ** 0.5))], "hs")],
               "erf")
    g = n.op("Mul", [n.op("Mul", [h, n.init("half", np.array(0.5))], "h2"),
                     n.op("Add", [erf, n.init("one", np.array(1.0))], "erf1")], "gelu")
    pixels = n.op("Reshape", [g, n.init_shape("pixels_shape", [1, 6, 6, 16])], "pixels")
    m2 = n.op("MatMul", [pixels, n.init("w2", n.rng.standard_normal((16, 8)) * 0.25)], "m2")
    scaled = n.op("Mul", [m2, n.init("gamma", n.rng.uniform(0.5, 1.5, 8))], "scaled")
    back = n.op("Transpose", [scaled], "nchw", perm=[0, 3, 1, 2])
    return n.model((1, 8, 6, 6), n.op("Add", [back, "x"], "y"), (1, 8, 6, 6)), 1


def dense_block() -> tuple[onnx.ModelProto, int]:
    """DenseNet's block: each layer reads the concatenation of every earlier layer's
    output through BatchNorm and ReLU (which no kernel takes: the ReLU comes before
    the convolution), then a 1x1 and a 3x3 Conv; a transition layer reads the last
    concatenation. Channels of 12, 8 and 4 put the inputs' boundaries at multiples
    of 4 (vectors per input) and of none wider."""
    n = Net(9)

    def bn(x: str, out: str, c: int) -> str:
        params = [n.init(f"{out}_{p}", v) for p, v in (
            ("g", n.rng.uniform(0.5, 1.5, c)), ("b", n.rng.standard_normal(c) * 0.1),
            ("m", n.rng.standard_normal(c) * 0.1), ("v", n.rng.uniform(0.5, 2.0, c)))]
        return n.op("Relu", [n.op("BatchNormalization", [x, *params], out)], f"{out}_relu")

    features, channels = [n.conv("x", "stem", 8, 12, (3, 3), pads=[1, 1, 1, 1])], 12
    for i, grow in enumerate((8, 4)):
        cat = n.op("Concat", features, f"cat{i}", axis=1) if i else features[0]
        a = n.conv(bn(cat, f"bn{i}a", channels), f"c{i}a", channels, 16, (1, 1), bias=False)
        features.append(n.conv(bn(a, f"bn{i}b", 16), f"c{i}b", 16, grow, (3, 3), bias=False,
                               pads=[1, 1, 1, 1]))
        channels += grow
    cat = n.op("Concat", features, "cat", axis=1)
    y = n.conv(bn(cat, "bn_t", channels), "y", channels, 8, (1, 1))
    return n.model((1, 8, 6, 6), y, (1, 8, 6, 6)), 6


def decoder_block() -> tuple[onnx.ModelProto, int]:
    """A decoder's stage: LayerNormalization over channels and rows (ONNX axis 1,
    which channels-last activations put out of order), a ConvTranspose upsampling by 2
    (which TVM lowers channels-first only), a Conv, and an exporter's flatten,
    x.view(x.size(0), -1): Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""
    n = Net(10)
    a = n.op("Relu", [n.conv("x", "c1", 8, 8, (3, 3), pads=[1, 1, 1, 1])], "r1")
    norm = n.op("LayerNormalization", [a, n.init("ln_g", n.rng.uniform(0.5, 1.5, (8, 6, 6))),
                                       n.init("ln_b", n.rng.standard_normal((8, 6, 6)) * 0.1)],
                "ln", axis=1, epsilon=1e-5)
    up = n.op("ConvTranspose", [norm, n.init("up_w", n.rng.standard_normal((8, 4, 3, 3)) / 6),
                                n.init("up_b", n.rng.standard_normal(4) * 0.1)],
              "up", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
              output_padding=[1, 1])
    b = n.conv(up, "c2", 4, 8, (3, 3), pads=[1, 1, 1, 1])
    batch = n.op("Gather", [n.op("Shape", [b], "shape"), n.init_shape("zero", 0)], "batch",
                 axis=0)
    rows = n.op("Unsqueeze", [batch, n.init_shape("axes0", [0])], "batch1")
    size = n.op("Concat", [rows, n.init_shape("rest", [-1])], "size", axis=0)
    return n.model((1, 8, 6, 6), n.op("Reshape", [b, size], "y"), (1, 8 * 12 * 12)), 2


def dilated_context() -> tuple[onnx.ModelProto, int]:
    """DeepLab's ASPP branches in small: a 3x3 Conv dilated past its 6x6 input, whose
    outer taps read only padding for every output (it runs as the 1x1 Conv it is);
    one dilated by 4, whose outer taps read the input for a third of the outputs each
    (it runs in 3 x 3 boxes, each with its own taps); one whose first row of taps
    reads only padding (dilated 4 down, the padding only above); an ordinary Conv."""
    n = Net(11)
    a = n.op("Relu", [n.conv("x", "aspp", 8, 8, (3, 3), dilations=[6, 6], pads=[6, 6, 6, 6])],
             "r1")
    ring = n.op("Relu", [n.conv(a, "ring", 8, 8, (3, 3), dilations=[4, 4], pads=[4, 4, 4, 4])],
                "r2")
    b = n.conv(ring, "edge", 8, 8, (3, 3), dilations=[4, 1], pads=[4, 1, 0, 1])  # 2 x 6
    y = n.conv(b, "y", 8, 4, (3, 3), pads=[1, 1, 1, 1])
    return n.model((1, 8, 6, 6), y, (1, 4, 2, 6)), 4


MODELS = {"residual_block": residual_block, "depthwise_block": depthwise_block,
          "conv_1d_3d_grouped": conv_1d_3d_grouped, "batchnorm_block": batchnorm_block,
          "shared_residuals": shared_residuals, "channel_shuffle": channel_shuffle,
          "squeeze_excite": squeeze_excite, "token_mlp": token_mlp,
          "dense_block": dense_block, "decoder_block": decoder_block,
          "dilated_context": dilated_context}


def _deploy(tmp_path: Path, name: str, mode: str, layout: str, cpu_target
            ) -> tuple[Path, onnx.ModelProto, int]:
    model, convs = MODELS[name]()
    src = tmp_path / f"{name}.onnx"
    onnx.save(model, src)
    out = tmp_path / f"{name}_{mode}_{layout}"
    deploy_artifact(src, cpu_target, out, DeployOptions(mode=mode, layout=layout))
    return out, model, convs


@pytest.mark.parametrize("layout", ["channels-last", "channels-first"])
@pytest.mark.parametrize("mode", ["corr", "conv"])
@pytest.mark.parametrize("name", list(MODELS))
def test_deployed_model_matches_onnxruntime(name, mode, layout, cpu_target, tmp_path):
    out, model, convs = _deploy(tmp_path, name, mode, layout, cpu_target)
    m = convgen.load(out)
    assert isinstance(m, convgen.Model)
    manifest = m.manifest
    assert manifest.verification.passed, manifest.verification.lines()
    # every Conv is a convgen kernel, in the mode and layout chosen, none is left to
    # TVM, and every Gemm and MatMul runs as the 1 x 1 convolution it is
    conv_nodes = {node.name for node in model.graph.node if node.op_type == "Conv"}
    convs_run = [layer for layer in manifest.layers if layer.node in conv_nodes]
    # (each node once; one split into tap regions once per box, the first at 0, 0)
    run = [layer.node for layer in manifest.layers if not any(a for a, _ in layer.region)]
    assert len(run) == len(set(run)) == convs + len(
        [node for node in model.graph.node if node.op_type in ("Gemm", "MatMul")])
    assert all(layer.spec.mode == mode for layer in convs_run)
    assert all(layer.spec.channels_last == (layout == "channels-last") for layer in convs_run)
    assert not [op for op in manifest.other_ops
                if ("conv" in op and "transpose" not in op) or "matmul" in op]
    if name == "residual_block":
        [gemm] = [layer for layer in manifest.layers if layer.node == "y"]
        assert gemm.spec.kernel_size == (1, 1) and gemm.spec.bias
    if name == "squeeze_excite":  # HardSigmoid's clip is no TE function of its own
        assert not [op for op in manifest.other_ops if "clip" in op]
    if name == "dense_block":  # the BatchNorms the kernels do not take: scale and shift
        assert not [op for op in manifest.other_ops if "divide" in op or "subtract" in op]
    if name == "dilated_context":  # the taps that read only padding are not computed
        kernels = {layer.node: (layer.spec.kernel_size, layer.spec.pads)
                   for layer in manifest.layers if not layer.region}
        assert kernels["aspp"] == ((1, 1), (0, 0, 0, 0))
        assert kernels["edge"] == ((2, 3), (0, 1, 0, 1))
        assert kernels["y"] == ((3, 3), (1, 1, 1, 1))
        # the ring's 6 x 6 outputs in boxes of rows and columns 0-1, 2-3, 4-5, each
        # box its 2 x 2, 2 x 1, 1 x 2 or single tap, unpadded
        boxes = {layer.region: layer.spec for layer in manifest.layers if layer.node == "ring"}
        runs = ((0, 2), (2, 4), (4, 6))
        assert set(boxes) == {(h, w) for h in runs for w in runs}
        assert boxes[(2, 4), (2, 4)].kernel_size == (1, 1)
        assert boxes[(0, 2), (4, 6)].kernel_size == (2, 2)
        assert all(not any(spec.pads) for spec in boxes.values())
    # independently of verify_model, on other inputs: onnxruntime on the model (with
    # the Conv weights flipped for conv) by hand
    x = np.random.default_rng(9).standard_normal(m.inputs[0].shape).astype(np.float32)
    ref = flip_conv_weights(model) if mode == "conv" else model
    want = ort_session(ref.SerializeToString()).run(None, {"x": x})[0]
    got = m(x)
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() <= MODEL_TOLERANCE * np.abs(want).max()
    if mode == "conv":  # the flip happened
        plain = ort_session(model.SerializeToString()).run(None, {"x": x})[0]
        assert np.abs(got - plain).max() > 10 * MODEL_TOLERANCE * np.abs(plain).max()


def test_epilogues_are_folded_into_the_kernels(cpu_target, tmp_path):
    out, _, _ = _deploy(tmp_path, "residual_block", "corr", "channels-last", cpu_target)
    layers = {layer.node: layer for layer in convgen.load(out).manifest.layers}
    assert layers["c1"].fused == ("Add", "Relu") and layers["c1"].spec.activation == "relu"
    # the block's second conv takes the residual Add (the shortcut conv after it does not)
    assert layers["c2"].spec.residual and layers["c2"].fused == ("Add", "Add", "Relu")
    assert layers["c4"].spec.residual and not layers["c5"].spec.residual
    out, _, _ = _deploy(tmp_path, "depthwise_block", "corr", "channels-last", cpu_target)
    layers = {layer.node: layer for layer in convgen.load(out).manifest.layers}
    assert layers["e1"].spec.activation == "relu6" and layers["d1"].spec.is_depthwise
    assert layers["p1"].spec.residual and layers["p1"].spec.activation == "none"
    assert layers["d2"].spec.activation == "hardswish" and layers["d2"].fused[-1] == "HardSwish"
    out, _, _ = _deploy(tmp_path, "conv_1d_3d_grouped", "corr", "channels-last", cpu_target)
    layers = {layer.node: layer for layer in convgen.load(out).manifest.layers}
    assert layers["c2"].spec.activation == "silu" and layers["c2"].spec.groups == 3
    assert [layers[c].spec.ndim for c in ("c1", "c2", "c3")] == [1, 2, 3]


@pytest.mark.parametrize("layout", ["channels-last", "channels-first"])
def test_residual_overwritten_only_where_nothing_reads_it_later(layout, cpu_target, tmp_path):
    """A kernel writes its output over its residual only where that tensor dies with
    the call (`shared_residuals`), never over the caller's array; the outputs are
    checked against onnxruntime by test_deployed_model_matches_onnxruntime. ResNet's
    blocks: in place, as their block input is read last by the Add."""
    out, model, _ = _deploy(tmp_path, "shared_residuals", "corr", layout, cpu_target)
    m = convgen.load(out)
    layers = {layer.node: layer for layer in m.manifest.layers}
    assert all(layers[c].spec.residual for c in ("c3", "c4", "c5", "c6"))
    assert [c for c in layers if layers[c].in_place] == ["c4"]
    assert layers["c4"].kernel.endswith(IN_PLACE_SUFFIX)
    x = np.random.default_rng(3).standard_normal(m.inputs[0].shape).astype(np.float32)
    given = x.copy()
    for _ in range(2):  # the second call reuses the first's memory
        got = m(x)
        assert np.array_equal(x, given)
        want_y = ort_session(model.SerializeToString()).run(None, {"x": x})[0]
        assert np.abs(got - want_y).max() <= MODEL_TOLERANCE * np.abs(want_y).max()
    out, _, _ = _deploy(tmp_path, "residual_block", "corr", layout, cpu_target)
    layers = {layer.node: layer for layer in convgen.load(out).manifest.layers}
    # c2's residual is its own input; c4's, the shortcut c5, is read by the Add alone
    assert not layers["c2"].in_place and layers["c4"].in_place


@pytest.mark.parametrize("layout", ["channels-last", "channels-first"])
def test_an_output_written_over_a_residual_stays_the_callers(layout, cpu_target, tmp_path):
    """The model's output is a kernel's written over its residual (a tensor whose
    memory Relax could plan for reuse): a second call leaves the first's result alone."""
    n = Net(7)
    a = n.op("Relu", [n.conv("x", "c1", 8, 8, (3, 3), pads=[1, 1, 1, 1])], "a")
    b = n.op("Relu", [n.conv(a, "c2", 8, 8, (1, 1))], "b")
    model = n.model((1, 8, 6, 6), n.op("Add", [n.conv(b, "c3", 8, 8, (1, 1)), a], "y"),
                    (1, 8, 6, 6))
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    deploy_artifact(src, cpu_target, tmp_path / "out", DeployOptions(layout=layout))
    m = convgen.load(tmp_path / "out")
    assert [layer.node for layer in m.manifest.layers if layer.in_place] == ["c3"]
    rng = np.random.default_rng(0)
    x1, x2 = (rng.standard_normal((1, 8, 6, 6)).astype(np.float32) for _ in range(2))
    y1 = m(x1)
    kept = y1.copy()
    y2 = m(x2)
    assert np.array_equal(y1, kept) and not np.shares_memory(y1, y2)
    session = ort_session(model.SerializeToString())
    for x, y in ((x1, y1), (x2, y2)):
        want = session.run(None, {"x": x})[0]
        assert np.abs(y - want).max() <= MODEL_TOLERANCE * np.abs(want).max()


def test_pointwise_layers_run_on_merged_rows(tmp_path):
    """With 16 registers the 14-wide rows of these 1 x 1 layers run as two rows of 98
    (`cpu.rows_to_merge`): the kernels take reshaped views of their operands, the
    last one written over its residual through its view, and the model's output is
    onnxruntime's. (AVX2 code runs on every machine this project has.)"""
    from convgen.compiler.targets import resolve_target

    n = Net(8)
    a = n.op("Relu", [n.conv("x", "c1", 96, 128, (1, 1))], "a")
    b = n.op("Relu", [n.conv(a, "c2", 128, 128, (1, 1))], "b")
    model = n.model((1, 96, 14, 14), n.op("Relu", [n.op("Add", [n.conv(b, "c3", 128, 128,
                                                                       (1, 1)), a], "s")], "y"),
                    (1, 128, 14, 14))
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    # (2 cores, as this project's machines: the merged rows are shared among them)
    avx2 = resolve_target('{"kind": "llvm", "mcpu": "znver3", "num-cores": 2}')
    deploy_artifact(src, avx2, tmp_path / "out", DeployOptions())
    m = convgen.load(tmp_path / "out")
    assert m.manifest.verification.passed, m.manifest.verification.lines()
    layers = {layer.node: layer for layer in m.manifest.layers}
    assert all(layers[c].spec.in_size == (2, 98) for c in ("c1", "c2", "c3"))
    assert [c for c in layers if layers[c].in_place] == ["c3"]
    session = ort_session(model.SerializeToString())
    rng = np.random.default_rng(4)
    for _ in range(2):
        x = rng.standard_normal((1, 96, 14, 14)).astype(np.float32)
        got, want = m(x), session.run(None, {"x": x})[0]
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= MODEL_TOLERANCE * np.abs(want).max()


def test_transcendental_functions_are_vector_arithmetic(cpu_target, tmp_path):
    """Sigmoid, Exp, Erf, Tanh and Softmax, in the kernels' SiLU epilogue and as other
    operators, call no libm function: LLVM would call it once per vector lane."""
    import shutil

    if shutil.which("nm") is None:
        pytest.skip("needs binutils' nm to list the module's undefined symbols")
    out, _, _ = _deploy(tmp_path, "squeeze_excite", "corr", "channels-last", cpu_target)
    so = next(out.glob("*.so"))
    listed = subprocess.run(["nm", "-D", "--undefined-only", str(so)], capture_output=True,
                            text=True, check=True).stdout.splitlines()
    names = {line.split()[-1].split("@")[0] for line in listed if line.strip()}
    assert not names & {"expf", "exp", "erff", "erf", "tanhf", "tanh"}, names


def test_depthwise_separable_pairs_run_as_one_kernel(tmp_path):
    """The depthwise layer d1 and the 1 x 1 projection p1 that alone reads it: one
    kernel (`cpu_separable`) in channels-last, named in both layers; d2, read by the
    HardSwish only, and channels-first keep their own kernels; --no-separable too,
    with the same outputs. On 16 registers, where fusing must also pay
    (`separable.pays`: p1's 10-wide rows take 2 x 5 tiles), as AVX2 code runs on
    every machine this project has."""
    from convgen.compiler.targets import resolve_target

    cpu_target = resolve_target('{"kind": "llvm", "mcpu": "znver3", "num-cores": 2}')
    out, model, _ = _deploy(tmp_path, "depthwise_block", "corr", "channels-last", cpu_target)
    fused = convgen.load(out)
    layers = {layer.node: layer for layer in fused.manifest.layers}
    assert layers["d1"].pair == "p1" and layers["p1"].pair == "d1"
    assert layers["d1"].kernel == layers["p1"].kernel != layers["e1"].kernel
    assert layers["p1"].schedule.name == "cpu_separable" and layers["p1"].spec.residual
    assert layers["e1"].pair == layers["d2"].pair == ""
    src = tmp_path / "depthwise_block.onnx"
    apart_dir = tmp_path / "apart"
    deploy_artifact(src, cpu_target, apart_dir, DeployOptions(separable=False))
    apart = convgen.load(apart_dir)
    assert not any(layer.pair for layer in apart.manifest.layers)
    assert len({layer.kernel for layer in apart.manifest.layers}) == 4
    x = model_inputs(fused, seed=3)["x"]
    want = ort_session(model.SerializeToString()).run(None, {"x": x})[0]
    for m in (fused, apart):
        assert np.abs(m(x) - want).max() <= MODEL_TOLERANCE * np.abs(want).max()
    out, _, _ = _deploy(tmp_path, "depthwise_block", "corr", "channels-first", cpu_target)
    assert not any(layer.pair for layer in convgen.load(out).manifest.layers)


def test_model_calls_take_names_and_check_inputs(cpu_target, tmp_path):
    out, _, _ = _deploy(tmp_path, "depthwise_block", "corr", "channels-last", cpu_target)
    m = convgen.load(out)
    x = model_inputs(m, seed=1)["x"]
    np.testing.assert_array_equal(m(x), m(x=x))
    np.testing.assert_array_equal(m(x), m(np.asfortranarray(x)))  # any memory order
    with pytest.raises(convgen.ConvgenError, match=r"^x: shape"):
        m(x[..., :4])
    with pytest.raises(convgen.ConvgenError, match=r"^y: not an input"):
        m(y=x)
    with pytest.raises(convgen.ConvgenError, match=r"^inputs: .* takes 1"):
        m(x, x)
    with pytest.raises(convgen.ConvgenError, match=r"^x: expected an array .* got list"):
        m(x.tolist())
    # read-only (DLPack exports none: np.asarray of an image, np.frombuffer) and
    # strided arrays are copied, not refused
    frozen = np.frombuffer(x.tobytes(), np.float32).reshape(x.shape)
    np.testing.assert_array_equal(m(frozen), m(x))
    wide = np.zeros((*x.shape[:-1], 2 * x.shape[-1]), np.float32)
    wide[..., ::2] = x
    np.testing.assert_array_equal(m(wide[..., ::2]), m(x))


def test_calls_from_threads_take_turns(cpu_target, tmp_path):
    """A server calls one loaded model from several threads: every result is the one
    a lone call gives. Run apart: two calls inside the VM at once crashed it, in about
    two runs of this test out of three (a race: MobileNetV2 at full size, whose calls
    are long enough to overlap)."""
    from convgen import zoo

    src = tmp_path / "mobilenet_v2.onnx"
    onnx.save(zoo.build("mobilenet_v2"), src)
    out = tmp_path / "dep"
    deploy_artifact(src, cpu_target, out, DeployOptions(), verify=False)
    code = f"""
import threading, numpy as np, convgen
m = convgen.load({str(out)!r})
rng = np.random.default_rng(0)
xs = [rng.uniform(-1, 1, m.inputs[0].shape).astype(np.float32) for _ in range(4)]
want = [m(x).copy() for x in xs]
wrong = []
def work(i):
    for r in range(25):
        j = (i + r) % 4
        if not np.array_equal(m(xs[j]), want[j]):
            wrong.append((i, r))
threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert not wrong, wrong[:5]
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and "ok" in run.stdout, (run.returncode, run.stderr[-2000:])


def test_deployed_model_runs_without_the_compiler(cpu_target, tmp_path):
    """A deployment needs tvm-ffi and TVM's runtime library, never `import tvm`."""
    out, _, _ = _deploy(tmp_path, "residual_block", "conv", "channels-last", cpu_target)
    code = f"""
import sys, numpy as np, convgen
m = convgen.load({str(out)!r})
y = m(np.ones(m.inputs[0].shape, np.float32))
assert y.shape == (1, 10) and np.isfinite(y).all()
assert "tvm" not in sys.modules, "the TVM compiler was imported"
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr


def test_inputs_anywhere_in_memory_feed_the_operators(cpu_target, tmp_path):
    """Inputs that go straight into an operator TVM schedules (a gate's sigmoid, a
    normalisation's multiply) as well as into kernels, passed as the caller's arrays
    start anywhere: numpy's 16 bytes past a cache line, 48, or an element's 4 (a
    slice). Run apart: an operator that assumed 64-byte alignment would fault."""
    n = Net(5)
    scaled = n.op("Mul", ["x", n.init("scale", n.rng.uniform(0.5, 2, (1, 8, 1, 1)))], "scaled")
    y = n.op("Relu", [n.conv(scaled, "c1", 8, 16, (3, 3), pads=[1, 1, 1, 1])], "y")
    gate = n.op("Sigmoid", ["g"], "gate")
    out = n.op("Mul", [y, gate], "out")
    graph = helper.make_graph(
        n.nodes, "gated", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 8, 12, 12)),
                           helper.make_tensor_value_info("g", TensorProto.FLOAT, (1, 16, 12, 12))],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, (1, 16, 12, 12))],
        initializer=n.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    src = tmp_path / "gated.onnx"
    onnx.save(model, src)
    out_dir = tmp_path / "gated"
    deploy_artifact(src, cpu_target, out_dir, DeployOptions(), verify=False)
    code = f"""
import numpy as np, convgen
from convgen.runtime.kernel import aligned_empty
from convgen.runtime.verify import MODEL_TOLERANCE, ort_session
m = convgen.load({str(out_dir)!r})
ref = ort_session({str(src)!r})
rng = np.random.default_rng(0)
for offset in (4, 16, 48, 0):
    feed = {{}}
    for info in m.inputs:
        a = aligned_empty(info.shape, np.float32, offset=offset)
        a[...] = rng.uniform(-1, 1, info.shape)
        feed[info.name] = a
    want = ref.run(None, feed)[0]
    for _ in range(3):
        assert np.abs(m(**feed) - want).max() <= MODEL_TOLERANCE * np.abs(want).max()
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and "ok" in run.stdout, (run.returncode, run.stderr[-2000:])


def test_outputs_are_the_callers_own(cpu_target, tmp_path):
    """Outputs the model computes nothing for, a constant (a detection model's anchors)
    and a model input (a view of it), come back in memory of their own, as computed
    ones and onnxruntime's do: writing into a result changed the model's constant for
    every later call, or the caller's input. The copy of the input reads it where
    numpy put it, 16 bytes past a cache line, in a process of its own (a fault
    would end it)."""
    n = Net(15)
    y = n.op("Relu", [n.conv("x", "c", 8, 16, (3, 3), pads=[1, 1, 1, 1])], "y")
    anchors = n.op("Identity", [n.init("prior", n.rng.standard_normal((4, 6)))], "anchors")
    flat = n.op("Reshape", ["x", n.init_shape("flat_shape", [1, -1])], "flat")
    graph = helper.make_graph(
        n.nodes, "owned", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 8, 6, 6))],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, (1, 16, 6, 6)),
         helper.make_tensor_value_info(anchors, TensorProto.FLOAT, (4, 6)),
         helper.make_tensor_value_info(flat, TensorProto.FLOAT, (1, 288))],
        initializer=n.inits)
    src = tmp_path / "owned.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                ir_version=IR_VERSION), src)
    out_dir = tmp_path / "owned"
    _, manifest = deploy_artifact(src, cpu_target, out_dir, DeployOptions())
    assert manifest.verification.passed, manifest.verification.lines()
    code = f"""
import numpy as np, convgen
from convgen.runtime.kernel import aligned_empty
m = convgen.load({str(out_dir)!r})
x = aligned_empty((1, 8, 6, 6), np.float32, offset=16)
x[...] = np.random.default_rng(0).uniform(-1, 1, x.shape)
kept = x.copy()
first = m(x)
prior = first[1].copy()
assert not any(np.shares_memory(r, x) for r in first)
for r in first:
    r[...] = 7.0
again = m(x)
assert np.array_equal(x, kept) and np.array_equal(again[1], prior)
assert np.array_equal(again[2], kept.reshape(1, -1))
assert not any(np.shares_memory(a, b) for a, b in zip(first, again))
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and "ok" in run.stdout, (run.returncode, run.stderr[-2000:])


def _weights_made_in_graph(kind: str, w: np.ndarray) -> tuple[list[onnx.NodeProto],
                                                              list[onnx.TensorProto]]:
    """Nodes and initializers that produce the 3x3 weight `w` (K x C x 3 x 3) as "w"
    without it being an initializer: a Constant, an int8 DequantizeLinear, a Transpose."""
    if kind == "constant":
        return [helper.make_node("Constant", [], ["w"],
                                 value=numpy_helper.from_array(w.astype(np.float32)))], []
    if kind == "dequantize":
        q = np.round(w / 0.01).clip(-127, 127).astype(np.int8)
        return [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"])], [
            numpy_helper.from_array(q, "wq"), numpy_helper.from_array(np.float32(0.01), "ws"),
            numpy_helper.from_array(np.int8(0), "wz")]
    hwck = np.ascontiguousarray(w.transpose(2, 3, 1, 0)).astype(np.float32)  # kind: transpose
    return [helper.make_node("Transpose", ["w_hwck"], ["w"], perm=[3, 2, 0, 1])], [
        numpy_helper.from_array(hwck, "w_hwck")]


def _conv_on(kind: str, w: np.ndarray, dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """A Conv on weights `w` given as `kind`: an initializer, one another node reads too
    (shared: its sum, which the flip leaves alone, is added), a graph input, or made in
    the graph (`_weights_made_in_graph`)."""
    own = kind in ("initializer", "shared")
    nodes, inits = ([], [numpy_helper.from_array(w, "w")] if own else []
                    ) if kind in ("input", "initializer", "shared") else _weights_made_in_graph(
                        kind, w)
    inputs = [helper.make_tensor_value_info("x", dtype, (1, 8, 10, 10))]
    if kind == "input":
        inputs.append(helper.make_tensor_value_info("w", dtype, w.shape))
    if kind == "shared":
        nodes += [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                  helper.make_node("ReduceSum", ["w"], ["w_sum"], keepdims=0),
                  helper.make_node("Add", ["c", "w_sum"], ["y"])]
    else:
        nodes.append(helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]))
    graph = helper.make_graph(nodes, "conv", inputs,
                              [helper.make_tensor_value_info("y", dtype, (1, 16, 10, 10))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


@pytest.mark.parametrize("kind", ["constant", "dequantize", "transpose", "input", "shared"])
def test_conv_mode_flips_weights_however_the_model_makes_them(kind, cpu_target, tmp_path):
    """In `conv` mode every Conv is a true convolution, whatever produces its weights:
    the deployment and the reference (`flip_conv_weights`) against onnxruntime on the
    same graph built from weights flipped here (the deployment's Conv on weights given
    at run time is left to TVM, and flipped there)."""
    rng = np.random.default_rng(7)
    w = (rng.integers(-100, 100, (16, 8, 3, 3)) * 0.01).astype(np.float32)  # exact in int8
    src = tmp_path / f"{kind}.onnx"
    onnx.save(_conv_on(kind, w), src)
    out = tmp_path / kind
    _, manifest = deploy_artifact(src, cpu_target, out, DeployOptions(mode="conv"))
    assert manifest.verification.passed, manifest.verification.lines()
    flipped = np.ascontiguousarray(w[:, :, ::-1, ::-1])
    feed = {"x": rng.uniform(-1, 1, (1, 8, 10, 10)).astype(np.float32)}
    given = {"w": w} if kind == "input" else {}
    truth = ort_session(_conv_on(kind, flipped).SerializeToString()).run(
        None, {**feed, **({"w": flipped} if kind == "input" else {})})[0]
    if kind != "input":  # (a graph input's weights are the caller's to flip)
        ref = ort_session(flip_conv_weights(_conv_on(kind, w)).SerializeToString())
        np.testing.assert_allclose(ref.run(None, feed)[0], truth, rtol=1e-5, atol=1e-5)
    got = convgen.load(out)(**feed, **given)
    assert np.abs(got - truth).max() <= MODEL_TOLERANCE * np.abs(truth).max()


def test_conv_mode_flips_the_convolutions_left_to_tvm(cpu_target, tmp_path):
    """A float16 model's Conv runs on TVM's own operator (convgen's deploy kernels are
    float32): in `conv` mode it is flipped too, and verified at half's tolerance."""
    rng = np.random.default_rng(8)
    w = (rng.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float16)
    src = tmp_path / "half.onnx"
    onnx.save(_conv_on("initializer", w, TensorProto.FLOAT16), src)
    _, manifest = deploy_artifact(src, cpu_target, tmp_path / "half", DeployOptions(mode="conv"))
    assert manifest.verification.passed, manifest.verification.lines()
    x = rng.uniform(-1, 1, (1, 8, 10, 10)).astype(np.float16)
    flipped = np.ascontiguousarray(w[:, :, ::-1, ::-1])
    truth = ort_session(_conv_on("initializer", flipped, TensorProto.FLOAT16)
                        .SerializeToString()).run(None, {"x": x})[0].astype(np.float64)
    got = convgen.load(tmp_path / "half")(x).astype(np.float64)
    assert np.abs(got - truth).max() <= MODEL_TOLERANCES["float16"] * np.abs(truth).max()


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_mode_transposed_convolution_is_the_true_convolutions_adjoint(
        stride, cpu_target, tmp_path):
    """In `conv` mode a ConvTranspose is the adjoint of the true convolution of its
    weights (scipy's convolve2d, then every stride-th output): <A x, y> == <x, A^T y>
    with A^T the deployed model, whatever the weights' asymmetry."""
    from scipy.signal import convolve2d

    rng = np.random.default_rng(11)
    c, m, size = 3, 4, 9
    w = rng.standard_normal((m, c, 3, 3)).astype(np.float32)  # ConvTranspose: (in, out)
    out = (size - 3) // stride + 1
    n = Net(12)
    n.init("w", w)
    model = n.model((1, m, out, out), n.op("ConvTranspose", ["x", "w"], "y",
                                           kernel_shape=[3, 3], strides=[stride, stride]),
                    (1, c, size, size))
    src = tmp_path / "t.onnx"
    onnx.save(model, src)
    _, manifest = deploy_artifact(src, cpu_target, tmp_path / "t", DeployOptions(mode="conv"))
    assert manifest.verification.passed, manifest.verification.lines()
    deployed = convgen.load(tmp_path / "t")
    for _ in range(3):
        x = rng.standard_normal((c, size, size))
        y = rng.standard_normal((1, m, out, out)).astype(np.float32)
        ax = np.stack([sum(convolve2d(x[k], w[j, k].astype(np.float64), "valid")
                           for k in range(c))[::stride, ::stride] for j in range(m)])
        lhs = float(np.sum(ax * y[0]))
        rhs = float(np.sum(x * deployed(y)[0].astype(np.float64)))
        assert abs(lhs - rhs) <= 1e-5 * np.abs(ax).sum() * np.abs(y).max()


@pytest.mark.parametrize("op", ["Max", "Min", "Sum"])
def test_variadic_element_wise_ops_against_per_channel_constants(op, cpu_target, tmp_path):
    """Max / Min / Sum of two Conv outputs and a per-channel constant (a learned
    threshold): Relax's frontend stacked the inputs into a 5-D tensor that the
    channels-last layout conversion could not carry ("Invalid SLayout")."""
    n = Net(9)
    a = n.conv("x", "a", 8, 16, (3, 3), pads=[1, 1, 1, 1])
    b = n.conv("x", "b", 8, 16, (1, 1))
    y = n.op(op, [a, n.init("c", n.rng.standard_normal((16, 1, 1))), b], "y")
    src = tmp_path / f"{op}.onnx"
    onnx.save(n.model((1, 8, 10, 10), y, (1, 16, 10, 10)), src)
    _, manifest = deploy_artifact(src, cpu_target, tmp_path / op, DeployOptions())
    assert manifest.verification.passed, manifest.verification.lines()
    assert len(manifest.layers) == 2


@pytest.mark.parametrize("mode", ["corr", "conv"])
def test_outputs_nan_where_onnxruntime_has_nan_verify(mode, cpu_target, tmp_path):
    """A model whose outputs are NaN for some inputs (the square root of a Conv's
    negative outputs) agrees with onnxruntime where both give NaN; the rest is
    compared as usual."""
    n = Net(10)
    c = n.conv("x", "c", 8, 16, (3, 3), pads=[1, 1, 1, 1])
    y = n.op("Sqrt", [c], "y")
    src = tmp_path / "sqrt.onnx"
    onnx.save(n.model((1, 8, 10, 10), y, (1, 16, 10, 10)), src)
    _, manifest = deploy_artifact(src, cpu_target, tmp_path / "sqrt", DeployOptions(mode=mode))
    assert manifest.verification.passed, manifest.verification.lines()
    m = convgen.load(tmp_path / "sqrt")
    got = m(model_inputs(m, seed=0)["x"])
    assert np.isnan(got).any() and np.isfinite(got).any()


def test_dropout_is_the_identity(cpu_target, tmp_path):
    """Older exports keep Dropout nodes (SqueezeNet, VGG): Relax kept `dropout` as a
    tuple-valued operator, and the channels-last conversion failed on it."""
    n = Net(11)
    y = n.op("Dropout", [n.conv("x", "c", 8, 16, (3, 3), pads=[1, 1, 1, 1])], "y")
    src = tmp_path / "dropout.onnx"
    onnx.save(n.model((1, 8, 10, 10), y, (1, 16, 10, 10)), src)
    _, manifest = deploy_artifact(src, cpu_target, tmp_path / "dropout", DeployOptions())
    assert manifest.verification.passed, manifest.verification.lines()


def test_a_model_onnxruntime_refuses_fails_verification_in_one_line(tmp_path):
    """TVM imports what onnxruntime may refuse (here an opset-7 Dropout mask declared
    bool): the deployment is built, and its verification fails saying why, with no
    traceback."""
    n = Net(12)
    n.nodes.append(helper.make_node("Dropout", [n.conv("x", "c", 8, 16, (3, 3))],
                                    ["y", "mask"]))
    graph = helper.make_graph(
        n.nodes, "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 8, 6, 6))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, (1, 16, 4, 4)),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, (1, 16, 4, 4))],
        initializer=n.inits)
    src = tmp_path / "old.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)],
                                ir_version=3), src)
    result = CliRunner().invoke(main, ["deploy", str(src), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1, result.output
    assert "verification failed: onnxruntime cannot run the original model" in result.output
    assert "Traceback" not in result.output


def test_a_scalar_index_gather_is_scheduled(cpu_target, tmp_path):
    """Gather with one constant index (an exporter's x[:, :, -1]) reads a 0-d buffer:
    the operators' scheduler looked at the last axis of every buffer it reads and
    failed with a traceback."""
    n = Net(13)
    c = n.conv("x", "c", 8, 16, (3, 3), pads=[1, 1, 1, 1])
    n.inits.append(numpy_helper.from_array(np.array(-1, np.int64), "last"))
    y = n.op("Gather", [c, "last"], "y", axis=2)
    src = tmp_path / "gather.onnx"
    onnx.save(n.model((1, 8, 10, 10), y, (1, 16, 10)), src)
    _, manifest = deploy_artifact(src, cpu_target, tmp_path / "gather", DeployOptions())
    assert manifest.verification.passed, manifest.verification.lines()


def _indexed_model(tmp_path: Path) -> Path:
    """A Conv plus a row of a table picked by an int64 input (an embedding)."""
    n = Net(14)
    c = n.conv("x", "c", 4, 8, (3, 3), pads=[1, 1, 1, 1])
    e = n.op("Gather", [n.init("table", n.rng.standard_normal((10, 8))), "idx"], "e")
    y = n.op("Add", [c, n.op("Unsqueeze", [e, n.init_shape("axes", [2, 3])], "e4")], "y")
    graph = helper.make_graph(
        n.nodes, "indexed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 4, 6, 6)),
                             helper.make_tensor_value_info("idx", TensorProto.INT64, (1,))],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, (1, 8, 6, 6))],
        initializer=n.inits)
    src = tmp_path / "indexed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                ir_version=IR_VERSION), src)
    return src


def test_sample_inputs_feed_verify_and_bench(tmp_path):
    """An integer input (indices) takes no random values: deploy says so before it
    compiles, and takes the user's inputs from an .npz (`--inputs`), as verify and
    bench do; the report names them. Random inputs fill what the file leaves out."""
    src = _indexed_model(tmp_path)
    runner = CliRunner()
    out = tmp_path / "dep"
    result = runner.invoke(main, ["deploy", str(src), "--out", str(out)])
    assert result.exit_code == 2 and not out.exists(), result.output
    assert "idx: an input of int64, which random values do not fit" in result.output
    sample = tmp_path / "sample.npz"
    np.savez(sample, idx=np.array([-3], np.int64))
    result = runner.invoke(main, ["deploy", str(src), "--out", str(out), "--inputs", str(sample)])
    assert result.exit_code == 0, result.output
    assert "verification passed" in result.output and "inputs sample.npz (idx)" in result.output
    result = runner.invoke(main, ["verify", str(out), "--inputs", str(sample)])
    assert result.exit_code == 0 and "inputs sample.npz (idx)" in result.output, result.output
    result = runner.invoke(main, ["bench", str(out), "--inputs", str(sample), "--repeats", "2"])
    assert result.exit_code == 0, result.output
    # the file's values are the ones fed: onnxruntime's own answer for them
    m = convgen.load(out)
    x = np.random.default_rng(1).uniform(-1, 1, (1, 4, 6, 6)).astype(np.float32)
    want = ort_session(src).run(None, {"x": x, "idx": np.array([7], np.int64)})[0]
    assert np.abs(m(x, np.array([7], np.int64)) - want).max() <= 1e-4 * np.abs(want).max()


def test_gather_indices_out_of_range_are_clamped(cpu_target, tmp_path):
    """An index past the axis (a caller's bad token id) read wherever it pointed:
    garbage, or a segfault of the caller's process for a large one. Indices are
    clamped into range (onnxruntime raises instead); in range, negative ones
    included, they are onnxruntime's. In a process of its own (a fault would end
    it)."""
    src = _indexed_model(tmp_path)
    out = tmp_path / "dep"
    deploy_artifact(src, cpu_target, out, DeployOptions(), verify=False)
    code = f"""
import numpy as np, convgen
from convgen.runtime.verify import ort_session
m = convgen.load({str(out)!r})
ref = ort_session({str(src)!r})
x = np.random.default_rng(2).uniform(-1, 1, (1, 4, 6, 6)).astype(np.float32)
def want(i):
    return ref.run(None, {{"x": x, "idx": np.array([i], np.int64)}})[0]
for i, row in [(4, 4), (-3, 7), (10, 9), (10**12, 9), (-10**12, 0)]:
    got = m(x, np.array([i], np.int64))
    assert np.abs(got - want(row)).max() <= 1e-4 * np.abs(want(row)).max(), i
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and "ok" in run.stdout, (run.returncode, run.stderr[-2000:])


# (op, attributes, indices in range with negative ones, the same with one out of range
# per row, updates' shape or None): no two indices of a scatter meet once clamped
INDEXING_CASES = [
    ("GatherElements", {"axis": 1}, [[0, -1, 4], [1, 2, -5], [3, 3, 0], [-2, 1, 2]],
     [[7, -1, 4], [1, 10**12, -5], [3, 3, -6], [-10**12, 1, 2]], None),
    ("GatherND", {}, [[0, 4], [3, -1], [-4, 2]], [[9, 4], [3, -10**12], [-4, 5]], None),
    ("ScatterElements", {"axis": 1}, [[0, 4], [1, -1], [2, 3], [-5, 3]],
     [[7, 1], [1, -6], [2, 10**12], [-10**12, 3]], (4, 2)),
    ("ScatterND", {}, [[0, 4], [3, 2], [1, 1]], [[-10**12, 0], [10**12, 2], [1, 1]], (3,)),
]


def _indexing_model(path: Path, op: str, attrs: dict, n_indices: tuple[int, ...],
                    updates: tuple[int, ...] | None) -> None:
    """x[4, 5] indexed by an int64 input (and updated by a third, for a scatter)."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, (4, 5)),
              helper.make_tensor_value_info("i", TensorProto.INT64, n_indices)]
    out_shape: tuple[int, ...] = (4, 5) if updates else (
        (4, n_indices[1]) if op == "GatherElements" else (n_indices[0],))
    if updates:
        inputs.append(helper.make_tensor_value_info("u", TensorProto.FLOAT, updates))
    node = helper.make_node(op, [v.name for v in inputs], ["y"], **attrs)
    graph = helper.make_graph([node], op, inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                ir_version=IR_VERSION), path)


@pytest.mark.parametrize(("op", "attrs", "inside", "outside", "updates"), INDEXING_CASES,
                         ids=[c[0] for c in INDEXING_CASES])
def test_indexing_operators_clamp_indices_into_range(op, attrs, inside, outside, updates,
                                                     cpu_target, tmp_path):
    """GatherElements, GatherND, ScatterElements and ScatterND as Gather: in range,
    negative indices included, onnxruntime's results; out of range (onnxruntime
    raises), the result for the index clamped into range, where TVM's lowering read
    garbage, wrote past the tensor or segfaulted for a large one. (The scatters'
    functions, whose buffers declare an element offset, also failed to deploy.) In a
    process of its own, as a fault would end it."""
    src = tmp_path / f"{op}.onnx"
    inside_a = np.array(inside, np.int64)
    _indexing_model(src, op, attrs, inside_a.shape, updates)
    out = tmp_path / "dep"
    deploy_artifact(src, cpu_target, out, DeployOptions(), verify=False)
    code = f"""
import numpy as np, convgen
from convgen.runtime.verify import ort_session
m, ref = convgen.load({str(out)!r}), ort_session({str(src)!r})
rng = np.random.default_rng(3)
feed = {{"x": rng.standard_normal((4, 5)).astype(np.float32)}}
if {updates!r}:
    feed["u"] = rng.standard_normal({updates!r}).astype(np.float32)
def dims(i):  # the extent each index is for
    if {op!r}.endswith("Elements"):
        return np.full(i.shape, 5)
    return np.broadcast_to(np.array([4, 5][: i.shape[-1]]), i.shape)
def clamped(i):
    d = dims(i)
    return np.clip(np.where(i < 0, i + d, i), 0, d - 1)
for i in (np.array({inside!r}), np.array({outside!r})):
    got = m(**feed, i=i)
    want = ref.run(None, {{**feed, "i": clamped(i)}})[0]
    assert np.array_equal(got, want), (i, got, want)
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and "ok" in run.stdout, (run.returncode, run.stderr[-2000:])


def test_align_arguments_keeps_every_buffer_field():
    """A function reading a model input is declared at the element's alignment
    whatever else its buffers declare (TOPI's scatters: an element offset; strides
    with T.int64 values), and keeps those declarations."""
    import tvm

    from convgen.compiler.compute import align_arguments

    func = tvm.script.from_source("""
# from tvm.script import tirx as T
@T.prim_func
def f(a: T.handle, b: T.handle):
    A = T.match_buffer(a, (T.int64(4), T.int64(5)), "float32",
                       strides=(T.int64(5), T.int64(1)))
    B = T.match_buffer(b, (T.int64(4), T.int64(5)), "float32", offset_factor=1)
    for i, j in T.grid(T.int64(4), T.int64(5)):
        B[i, j] = A[i, j]
""")
    aligned = align_arguments(func, 4)
    a, b = (p.ty for p in aligned.params)
    assert a.data_alignment == b.data_alignment == 4
    assert [int(s) for s in a.strides] == [5, 1] and b.offset_factor == 1


# (id, opset, operator, attributes, constant inputs after x, output shape): exporters'
# older resampling forms, and a later Resize with empty roi and scales beside sizes
RESAMPLING = [
    ("upsample7", 7, "Upsample", {"mode": "nearest", "scales": [1.0, 1.0, 2.0, 3.0]}, [],
     (1, 4, 12, 18)),
    ("upsample9-linear", 9, "Upsample", {"mode": "linear"},
     [np.array([1, 1, 2, 2], np.float32)], (1, 4, 12, 12)),
    ("resize10", 10, "Resize", {"mode": "nearest"}, [np.array([1, 1, 1.5, 2], np.float32)],
     (1, 4, 9, 12)),
    ("resize13-sizes", 13, "Resize", {"mode": "linear"},
     [np.zeros(0, np.float32), np.zeros(0, np.float32), np.array([1, 4, 9, 13], np.int64)],
     (1, 4, 9, 13)),
]


@pytest.mark.parametrize(("opset", "op", "attrs", "consts", "shape"),
                         [r[1:] for r in RESAMPLING], ids=[r[0] for r in RESAMPLING])
def test_resampling_as_onnx_defines_it(opset, op, attrs, consts, shape, cpu_target, tmp_path):
    """Upsample (opsets 7, 9) and Resize-10 read input i / scale, the nearest pixel by
    floor: the frontend rounded (wrong pixels from opset 7), read opset 9's scales
    from an attribute and Resize-10's as a roi (both refused). A Resize with empty
    roi and scales beside its sizes was refused as giving both scales and sizes."""
    rng = np.random.default_rng(4)
    names = [f"c{i}" for i in range(len(consts))]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w"),
             *(numpy_helper.from_array(c, n) for c, n in zip(consts, names))]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node(op, ["c", *names], ["y"], **attrs)]
    graph = helper.make_graph(
        nodes, op, [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 4, 6, 6))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], initializer=inits)
    src = tmp_path / f"{op}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                ir_version=IR_VERSION), src)
    out = tmp_path / "dep"
    deploy_artifact(src, cpu_target, out, DeployOptions())
    m = convgen.load(out)
    assert m.manifest.verification.passed, m.manifest.verification.lines()
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    want = ort_session(src).run(None, {"x": x})[0]
    assert np.abs(m(x) - want).max() <= MODEL_TOLERANCE * np.abs(want).max()


def test_a_quantized_conv_is_verified_against_the_graph_as_written(cpu_target, tmp_path):
    """A QDQ Conv (QuantizeLinear / DequantizeLinear around it, as quantization tools
    write them): onnxruntime with its optimizations fuses it into an integer
    QLinearConv, which rounds some ties the other way (a quantization step off the
    graph as written); verification reads the graph as written, which convgen's
    float Conv between the same quantizations computes exactly."""
    rng = np.random.default_rng(5)
    sx, sw, sy = 0.02, 0.005, 0.03
    wq = np.clip(np.round(rng.standard_normal((8, 8, 3, 3)) * 0.1 / sw), -127, 127)
    inits = [numpy_helper.from_array(v, n) for n, v in [
        ("sx", np.array(sx, np.float32)), ("zx", np.array(128, np.uint8)),
        ("wq", wq.astype(np.int8)), ("sw", np.array(sw, np.float32)),
        ("zw", np.array(0, np.int8)), ("b", (rng.standard_normal(8) * 0.1).astype(np.float32)),
        ("sy", np.array(sy, np.float32)), ("zy", np.array(0, np.uint8))]]
    node = helper.make_node
    nodes = [node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"]),
             node("Conv", ["xd", "wd", "b"], ["c"], pads=[1, 1, 1, 1]),
             node("Relu", ["c"], ["r"]), node("QuantizeLinear", ["r", "sy", "zy"], ["yq"]),
             node("DequantizeLinear", ["yq", "sy", "zy"], ["y"])]
    shape = (1, 8, 24, 24)
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, shape)], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, shape)], initializer=inits)
    src = tmp_path / "qdq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                ir_version=IR_VERSION), src)
    out = tmp_path / "dep"
    deploy_artifact(src, cpu_target, out, DeployOptions())
    m = convgen.load(out)
    assert len(m.manifest.layers) == 1  # the Conv, on a convgen kernel
    for seed in range(3):
        report = verify_model(m, seed=seed)
        assert report.passed and report.checks[0].max_abs_error == 0, report.lines()
        x = model_inputs(m, seed=seed)
        # (the fused model is another one: it differs from the graph as written)
        fused = ort_session(src).run(None, x)[0]
        assert np.any(fused != ort_session(src, optimized=False).run(None, x)[0])


def test_an_output_shaped_by_shape_arithmetic_needs_no_declaration(cpu_target, tmp_path):
    """An output an exporter declares without a shape, which its graph computes from
    shapes (x.view(x.size(0), -1)): ONNX's shape inference follows the values through
    Shape, Gather and Concat, where deploy said it depended on the data."""
    model, _ = decoder_block()
    model.graph.output[0].type.tensor_type.ClearField("shape")
    src = tmp_path / "undeclared.onnx"
    onnx.save(model, src)
    out = tmp_path / "dep"
    deploy_artifact(src, cpu_target, out, DeployOptions())
    m = convgen.load(out)
    assert m.outputs[0].shape == (1, 8 * 12 * 12) and m.manifest.verification.passed


def test_tvm_reason_names_the_offending_operator():
    """A TVM error's one line for the user: its last line, past the printed IR's
    metadata footer; where it names an offending call, its first line and the call's
    operator (the footer alone said nothing)."""
    from convgen.errors import tvm_reason

    footer = "# Metadata omitted. Use show_meta=True in script() method to show it."
    vm = RuntimeError("CodeGenVM cannot emit this Relax operator directly.\nOffending call:\n"
                      "R.nn.conv2d_transpose(alloc1, metadata[0], strides=[2, 2])\n" + footer)
    assert tvm_reason(vm) == ("CodeGenVM cannot emit this Relax operator directly. "
                              "Offending call: R.nn.conv2d_transpose")
    assert tvm_reason(ValueError("a trace line\nthe reason\n\n" + footer)) == "the reason"
    assert tvm_reason(ValueError("")) == "ValueError"


@pytest.mark.parametrize("content, message", [
    ({"idx": np.array([1], np.int32)}, "idx: dtype int32 does not match the expected int64"),
    ({"idx": np.array([1, 2], np.int64)}, "idx: shape 2 does not match the expected 1"),
    ({"index": np.array([1], np.int64)}, "inputs: index in"),
    (None, "as an .npz of arrays by input name (not an .npz file"),
])
def test_bad_sample_inputs_are_one_line(content, message, tmp_path):
    src = _indexed_model(tmp_path)
    sample = tmp_path / "sample.npz"
    if content is None:
        np.save(sample, np.array([1], np.int64))  # (np.save keeps the name: a .npy)
        sample = sample.with_suffix(".npz.npy")
    else:
        np.savez(sample, **content)
    out = tmp_path / "dep"
    result = CliRunner().invoke(main, ["deploy", str(src), "--out", str(out),
                                       "--inputs", str(sample)])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()


def test_sample_inputs_are_for_models(tmp_path):
    sample = tmp_path / "s.npz"
    np.savez(sample, x=np.zeros(1, np.float32))
    runner = CliRunner()
    flags = ["--mode", "corr", "--input", "1x4x6x6", "--kernel", "8x4x3x3", "--inputs", str(sample)]
    for command in ("verify", "bench"):
        result = runner.invoke(main, [command, *flags])
        assert result.exit_code == 2, result.output
        assert "inputs: sample inputs are for a deployed model" in result.output
    result = runner.invoke(main, ["deploy", str(_indexed_model(tmp_path)), "--no-verify",
                                  "--inputs", str(sample), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--no-verify turns off" in result.output, result.output


def test_cli_deploy_verify_bench(tmp_path):
    model, _ = residual_block()
    src = tmp_path / "block.onnx"
    onnx.save(model, src)
    out = tmp_path / "dep"
    runner = CliRunner()
    result = runner.invoke(main, ["deploy", str(src), "--out", str(out), "--mode", "conv"])
    assert result.exit_code == 0, result.output
    assert "6 layers on convgen kernels (conv, channels-last)" in result.output
    assert "verification passed" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["block.json", "block.onnx", "block.so"]
    manifest = json.loads((out / "block.json").read_text())
    assert manifest["format"] == "convgen-model" and manifest["mode"] == "conv"
    assert manifest["inputs"] == [{"name": "x", "shape": [1, 8, 12, 12], "dtype": "float32"}]
    result = runner.invoke(main, ["verify", str(out)])
    assert result.exit_code == 0 and "verification passed" in result.output, result.output
    result = runner.invoke(main, ["bench", str(out), "--repeats", "3", "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    # PyTorch eager on the same graph too, where torch is installed (an optional extra)
    torch_too = importlib.util.find_spec("torch") is not None
    assert set(row["times"]) == {"convgen", "onnxruntime", *(["torch"] if torch_too else [])}
    if torch_too:
        assert any("eager on the same graph agrees" in note for note in row["notes"])
    result = runner.invoke(main, ["bench", str(out), "--repeats", "3", "--json", "--no-peers"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert set(row["times"]) == {"convgen"}


def test_models_with_external_data_deploy_whole(tmp_path):
    """A model whose weights live in a file beside it (as exporters write models past
    protobuf's 2 GB) deploys, and the artifact carries that data with it: moved
    elsewhere, it still verifies against onnxruntime."""
    import shutil

    model, _ = residual_block()
    src = tmp_path / "src" / "block.onnx"
    src.parent.mkdir()
    onnx.save(model, src, save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    assert (src.parent / "weights.bin").stat().st_size > 0
    out = tmp_path / "dep"
    runner = CliRunner()
    result = runner.invoke(main, ["deploy", str(src), "--out", str(out)])
    assert result.exit_code == 0 and "verification passed" in result.output, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "block.json", "block.onnx", "block.onnx.data", "block.so"]
    shutil.rmtree(src.parent)
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    result = runner.invoke(main, ["verify", str(moved)])
    assert result.exit_code == 0 and "verification passed" in result.output, result.output
    assert convgen.load(moved).manifest.files["onnx_data"].name == "block.onnx.data"


def test_bad_models_are_one_line(tmp_path):
    runner = CliRunner()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    result = runner.invoke(main, ["deploy", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.output.startswith("Error: model:"), result.output
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    result = runner.invoke(main, ["deploy", str(empty), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "holds no ONNX graph" in result.output, result.output
    model, _ = residual_block()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    dynamic = tmp_path / "dynamic.onnx"
    onnx.save(model, dynamic)
    result = runner.invoke(main, ["deploy", str(dynamic), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no static shape" in result.output, result.output
    n = Net(3)
    n.op("NonZero", [n.conv("x", "c", 8, 4, (3, 3))], "nz")
    graph = helper.make_graph(
        n.nodes, "nz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 8, 6, 6))],
        [helper.make_tensor_value_info("nz", TensorProto.INT64, None)], initializer=n.inits)
    data_dependent = tmp_path / "nonzero.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]),
              data_dependent)
    result = runner.invoke(main, ["deploy", str(data_dependent), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "depends on the data" in result.output, result.output
    # a Compress by a constant mask: its output's channels are unknown to ONNX's shape
    # inference, the Conv after it declared; TVM's layout pass fails on that Conv
    n = Net(4)
    kept = n.op("Compress", [n.conv("x", "c1", 8, 8, (3, 3), pads=[1, 1, 1, 1]),
                             "mask"], "kept", axis=1)
    n.inits.append(numpy_helper.from_array(np.array([1, 0] * 4, bool), "mask"))
    y = n.conv(kept, "c2", 4, 4, (1, 1))
    compressed = tmp_path / "compress.onnx"
    onnx.save(n.model((1, 8, 6, 6), y, (1, 4, 6, 6)), compressed)
    result = runner.invoke(main, ["deploy", str(compressed), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "from Compress node 'kept'" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def _dynamic_residual_block(tmp_path: Path) -> Path:
    """residual_block exported with dynamic axes: batch, height and width named."""
    model, _ = residual_block()
    for dim, name in zip(model.graph.input[0].type.tensor_type.shape.dim,
                         ("batch", None, "height", "width")):
        if name:
            dim.dim_param = name
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    path = tmp_path / "dynamic.onnx"
    onnx.save(model, path)
    return path


def test_dynamic_inputs_deploy_at_the_shapes_given(tmp_path):
    """`--shape` fixes a model's dynamic axes; the deployment runs at that shape and
    matches onnxruntime on the model as exported (its dynamic axes kept)."""
    src = _dynamic_residual_block(tmp_path)
    out = tmp_path / "dep"
    runner = CliRunner()
    result = runner.invoke(main, ["deploy", str(src), "--out", str(out), "--no-verify"])
    assert result.exit_code == 2, result.output
    assert "input 'x' has no static shape" in result.output
    assert "--shape x=DIMS" in result.output
    assert not out.exists() or not list(out.iterdir())
    result = runner.invoke(main, ["deploy", str(src), "--out", str(out),
                                  "--shape", "x=2x8x16x12"])
    assert result.exit_code == 0, result.output
    assert "verification passed" in result.output
    m = convgen.load(out)
    assert [(i.name, i.shape) for i in m.inputs] == [("x", (2, 8, 16, 12))]
    x = model_inputs(m, seed=3)["x"]
    want = ort_session(src).run(None, {"x": x})[0]
    assert want.shape == (2, 10)
    assert np.abs(m(x) - want).max() <= MODEL_TOLERANCE * np.abs(want).max()


def test_tune_and_build_take_the_shapes_too(tmp_path):
    """What `deploy --shape` builds, `tune --model --shape` tunes, and `--spec
    MODEL.onnx --shape` reads the Conv nodes at that shape."""
    from convgen.compiler.deploy import model_specs, read_model
    from convgen.compiler.targets import resolve_target
    from convgen.spec import specs_from_onnx

    src = _dynamic_residual_block(tmp_path)
    shapes = {"x": (2, 8, 16, 12)}
    specs = [s for _, s in model_specs(read_model(src, shapes), resolve_target("llvm"),
                                       DeployOptions())]
    assert specs[0].batch == 2 and specs[0].in_size == (16, 12)
    (_, first), *_ = specs_from_onnx(str(src), "corr", shapes)
    assert first.data_shape == (2, 8, 16, 12)
    result = CliRunner().invoke(main, ["tune", "--model", str(src), "--trials", "1"])
    assert result.exit_code == 2 and "--shape x=DIMS" in result.output, result.output


@pytest.mark.parametrize("flags, message", [
    (["--shape", "y=1x8x12x12"], "shape: the model has no input 'y' (its inputs: x)"),
    (["--shape", "x=1x8x12"], "shape: input 'x' has 4 dimensions (batchx8xheightxwidth), "
                              "not 3"),
    (["--shape", "x=1x3x12x12"], "shape: input 'x' has dimension 1 fixed at 8 by the model"),
    (["--shape", "x=1x8x0x12"], "shape: x: '1x8x0x12' has a dimension below 1"),
    (["--shape", "x:1x8x12x12"], "shape: 'x:1x8x12x12' is not NAME=DIMS"),
    (["--shape", "x=1x8x12x12", "--shape", "x=1x8x12x12"], "shape: input 'x' given twice"),
])
def test_bad_shapes_are_one_line(flags, message, tmp_path):
    src = _dynamic_residual_block(tmp_path)
    out = tmp_path / "dep"
    result = CliRunner().invoke(main, ["deploy", str(src), "--out", str(out), *flags])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"Error: {message}"), result.output
    assert not out.exists() or not list(out.iterdir())


def test_shape_needs_an_onnx_model(tmp_path):
    result = CliRunner().invoke(main, ["build", "--mode", "corr", "--input", "1x8x8x8",
                                       "--kernel", "8x8x3x3", "--shape", "x=1x8x8x8",
                                       "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error: shape: --shape fixes an ONNX model's inputs")


@pytest.mark.parametrize("name", ["residual_block", "dilated_context"])
def test_tune_model_targets_what_deploy_builds(name, cpu_target, tmp_path):
    """`convgen tune --model` tunes exactly the specs deploy builds (so a later deploy
    finds their records): the same layers, layout and epilogue, and windows without
    the taps that read only padding."""
    from convgen.compiler.deploy import model_specs

    out, model, _ = _deploy(tmp_path, name, "corr", "channels-last", cpu_target)
    deployed = [(layer.node, layer.spec) for layer in convgen.load(out).manifest.layers]
    assert model_specs(model, cpu_target, DeployOptions()) == deployed


@pytest.mark.cuda
def test_tune_model_emits_cuda_candidates_for_what_deploy_builds(tmp_path):
    """`convgen tune --target cuda --model M --emit-candidates DIR`: candidates for the
    specs a CUDA deploy builds (one per record: corr, no epilogue)."""
    from convgen.compiler.deploy import model_specs
    from convgen.compiler.records import record_spec
    from convgen.compiler.targets import resolve_target
    from convgen.spec import ConvSpec
    from convgen.tuning.measure import INDEX

    model, _ = residual_block()
    src = tmp_path / "block.onnx"
    onnx.save(model, src)
    cands = tmp_path / "cands"
    result = CliRunner().invoke(main, ["tune", "--target", "cuda", "--model", str(src),
                                       "--emit-candidates", str(cands), "--trials", "1"])
    assert result.exit_code == 0, result.output
    cuda = resolve_target("cuda")
    want = {record_spec(s, cuda) for _, s in model_specs(model, cuda, DeployOptions())}
    index = json.loads((cands / INDEX).read_text())
    assert {ConvSpec.from_dict(e["spec"]) for e in index["specs"]} == want


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_zoo_models_deploy_and_verify(name, cpu_target, tmp_path):
    """torchvision's ResNet-18/50 and MobileNetV2 (`convgen.zoo`, at 32 x 32 to keep
    the test short): every Conv and the classifier on convgen kernels, verified."""
    from convgen import zoo

    src = tmp_path / f"{name}.onnx"
    onnx.save(zoo.build(name, size=32), src)
    _, manifest = deploy_artifact(src, cpu_target, tmp_path / "dep", DeployOptions())
    assert manifest.verification.passed, manifest.verification.lines()
    convs = sum(n.op_type == "Conv" for n in onnx.load(src).graph.node)
    assert len(manifest.layers) == convs + 1  # + the classifier's Gemm
    assert not [op for op in manifest.other_ops
                if ("conv" in op and "transpose" not in op) or "matmul" in op]


def test_unfolded_batchnorm_folds_into_the_kernels(cpu_target, tmp_path):
    out, _, _ = _deploy(tmp_path, "batchnorm_block", "conv", "channels-last", cpu_target)
    m = convgen.load(out)
    assert m.manifest.verification.passed, m.manifest.verification.lines()
    layers = {layer.node: layer for layer in m.manifest.layers}
    assert layers["c1"].fused == ("Sub", "Div", "Mul", "Add", "Relu")
    assert layers["c1"].spec.bias and layers["c1"].spec.activation == "relu"
    assert layers["c2"].spec.residual
    assert m.manifest.other_ops == ["transpose", "transpose1"]  # only the model's edges


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["residual_block", "conv_1d_3d_grouped", "depthwise_block"])
def test_cuda_models_compile_and_verify_where_a_gpu_is(name, tmp_path, monkeypatch):
    """`deploy --target cuda`: the same graph on the CUDA templates (weights packed here
    in their layouts, split-K's workspace a second output that Relax allocates), the
    other operators on TVM's GPU rules, the VM on the host; compiled with nvcc here,
    verified against onnxruntime where a GPU is present."""
    from convgen.compiler.targets import resolve_target
    from convgen.errors import ToolchainError
    from convgen.runtime.cuda_driver import gpu_present

    model, convs = MODELS[name]()
    src = tmp_path / f"{name}.onnx"
    onnx.save(model, src)
    path, manifest = deploy_artifact(src, resolve_target("cuda"), tmp_path / "out",
                                     DeployOptions(mode="conv"))
    assert manifest.target.kind == "cuda" and path.is_file()
    assert len([layer for layer in manifest.layers if layer.node != "y"]) == convs
    assert all(layer.schedule.name.startswith("cuda_") for layer in manifest.layers)
    if name == "residual_block":  # C24 6x6: too few output tiles, the reduction split
        assert any(layer.schedule.knobs.get("split_k", 1) > 1 for layer in manifest.layers)
    _check_shipped_device_code(manifest, path.parent, monkeypatch)
    m = convgen.load(path)
    x = np.ones(m.inputs[0].shape, np.float32)
    if gpu_present():
        assert manifest.verification.passed, manifest.verification.lines()
        assert m(x).shape == m.outputs[0].shape
    else:
        assert manifest.verification.reason == "no GPU present"
        with pytest.raises(ToolchainError):  # one clear error, not the loader's
            m(x)


def _check_shipped_device_code(manifest, directory: Path, monkeypatch) -> None:
    """A CUDA model's kernels travel compiled (`deploy._write_device_code`): a cubin
    beside the library, and TVM's CUDA runtime, asking at load time for the kernels'
    source to be compiled, is answered with it; a source nobody shipped goes to the
    callback registered before (TVM's, where its compiler is imported), or with none
    is refused rather than compiled on the deployment machine."""
    import tvm_ffi

    from convgen.runtime import model as runtime_model

    code = manifest.path_of(runtime_model.DEVICE_SOURCE, directory).read_text()
    cubin = manifest.path_of(runtime_model.DEVICE_BINARY, directory).read_bytes()
    assert cubin[:4] == b"\x7fELF" and "__global__" in code
    runtime_model._provide_device_code(manifest, directory)
    compile_cuda = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
    assert bytes(compile_cuda(code)) == cubin
    monkeypatch.setattr(runtime_model, "_other_compiler", [None])
    with pytest.raises(Exception, match="ships compiled"):
        compile_cuda(code + "// another module\n")


@pytest.mark.cuda
def test_cuda_zoo_model_compiles(tmp_path):
    """MobileNetV2 (32 x 32, batch 2) for CUDA: depthwise layers on cuda_depthwise, and
    small outputs split along the reduction, the classifier's Gemm among them (a
    workspace on a reshaped dense call; at batch 1 its one row goes to cuda_direct)."""
    from convgen import zoo
    from convgen.compiler.targets import resolve_target

    src = tmp_path / "mobilenet_v2.onnx"
    onnx.save(zoo.build("mobilenet_v2", size=32, batch=2), src)
    path, manifest = deploy_artifact(src, resolve_target("cuda"), tmp_path / "dep",
                                     DeployOptions(), verify=False)
    assert path.is_file() and manifest.target.kind == "cuda"
    names = {layer.schedule.name for layer in manifest.layers}
    assert {"cuda_depthwise", "cuda_igemm_f32"} <= names
    classifier = manifest.layers[-1]
    assert classifier.node.startswith("gemm") and classifier.schedule.knobs["split_k"] > 1


PEER_GRAPHS = ["residual_block", "depthwise_block", "conv_1d_3d_grouped", "batchnorm_block",
               "dense_block", "dilated_context", "zoo:resnet18", "zoo:mobilenet_v2"]


def _peer_graph(name: str) -> onnx.ModelProto:
    from convgen import zoo

    return zoo.build(name[4:], size=32) if name.startswith("zoo:") else MODELS[name]()[0]


@pytest.mark.parametrize("name", PEER_GRAPHS)
def test_pytorch_peer_runs_the_graph_as_onnxruntime_does(name):
    """`bench`'s GPU peer for CUDA models (`runtime.torch_graph`: the ONNX graph node by
    node in PyTorch eager mode), here on the CPU, against onnxruntime on the same graph,
    its Conv weights flipped as for a `conv`-mode deployment."""
    torch = pytest.importorskip("torch", reason="torch is an optional extra")
    from convgen.runtime.torch_graph import torch_graph

    model = flip_conv_weights(_peer_graph(name))
    rng = np.random.default_rng(3)
    inits = {t.name for t in model.graph.initializer}
    feed = {i.name: rng.uniform(-1, 1, [d.dim_value for d in i.type.tensor_type.shape.dim]
                                ).astype(np.float32)
            for i in model.graph.input if i.name not in inits}
    want = ort_session(model.SerializeToString()).run(None, feed)
    got = torch_graph(model, "cpu")({k: torch.from_numpy(v) for k, v in feed.items()})
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g.numpy(), w, rtol=0, atol=1e-5 * np.abs(w).max())


def test_pytorch_peer_names_the_operator_it_does_not_run():
    pytest.importorskip("torch", reason="torch is an optional extra")
    from convgen.runtime.torch_graph import TorchGraphError, torch_graph

    with pytest.raises(TorchGraphError, match="Erf"):
        torch_graph(MODELS["squeeze_excite"]()[0], "cpu")


def test_pytorch_peer_refuses_computed_weights_by_name():
    """Weights the graph computes or takes as an input (not initializers) make the peer
    unavailable with the operand named, never a KeyError mid-benchmark."""
    pytest.importorskip("torch", reason="torch is an optional extra")
    from convgen.runtime.torch_graph import TorchGraphError, torch_graph

    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION)
    with pytest.raises(TorchGraphError, match="Conv with a computed 'w'"):
        torch_graph(model, "cpu")
