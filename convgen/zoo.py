"""Whole models for `convgen deploy`'s tests and benchmarks, as ONNX, without PyTorch.

torchvision's ResNet-18, ResNet-50 (v1.5: the stride on the 3x3 of a bottleneck)
and MobileNetV2 (width 1.0), written layer for layer as `torch.onnx.export`
writes them in eval mode: every BatchNorm folded into its Conv's weights and
bias, ReLU as Relu, ReLU6 as Clip(0, 6), the classifier as Flatten + Gemm.
The weights are random (no download) and scaled as a trained network's
BatchNorm scales its activations: He-initialised convolutions keep each layer's
output at unit scale, and the last convolution of every residual branch is
scaled down (as BatchNorm's learned gamma is) so the sum over a stage stays
O(1) rather than doubling per block.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from convgen.onnx_export import IR_VERSION, OPSET

MODELS = ("resnet18", "resnet50", "mobilenet_v2")
BRANCH_SCALE = 0.2  # the last convolution of a residual branch (BatchNorm's gamma)


class _Graph:
    """An ONNX graph under construction, NCHW, float32."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[object] = []
        self.inits: list[object] = []
        self.count = 0

    def _name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}_{self.count}"

    def node(self, op: str, inputs: list[str], **attrs: object) -> str:
        from onnx import helper

        out = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(self, kind: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self._name(kind)
        self.inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def conv(self, x: str, c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1,
             scale: float = 1.0) -> str:
        fan_in = c_in // groups * k * k
        w = self.rng.standard_normal((c_out, c_in // groups, k, k)) * math.sqrt(2 / fan_in)
        b = self.rng.standard_normal(c_out) * 0.1
        return self.node("Conv", [x, self.const("w", w * scale), self.const("b", b * scale)],
                         kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4,
                         group=groups)

    def relu6(self, x: str) -> str:
        lo = self.const("clip_min", np.array(0.0))
        hi = self.const("clip_max", np.array(6.0))
        return self.node("Clip", [x, lo, hi])

    def classifier(self, x: str, c_in: int, classes: int) -> str:
        x = self.node("Flatten", [self.node("GlobalAveragePool", [x])], axis=1)
        w = self.rng.standard_normal((classes, c_in)) * math.sqrt(1 / c_in)
        b = self.rng.standard_normal(classes) * 0.1
        return self.node("Gemm", [x, self.const("fc_w", w), self.const("fc_b", b)], transB=1)

    def model(self, name: str, x: str, shape: tuple[int, ...], y: str, classes: int) -> object:
        import onnx
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            self.nodes, name, [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info(y, TensorProto.FLOAT, [shape[0], classes])],
            initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  ir_version=IR_VERSION, producer_name="convgen.zoo")
        onnx.checker.check_model(model, full_check=True)
        return model


def resnet(depth: int, size: int = 224, batch: int = 1, classes: int = 1000,
           seed: int = 0) -> object:
    """torchvision's resnet18 (depth 18) or resnet50 (depth 50)."""
    blocks, bottleneck = {18: ([2, 2, 2, 2], False), 50: ([3, 4, 6, 3], True)}[depth]
    g = _Graph(seed)
    x = g.node("Relu", [g.conv("input", 3, 64, 7, stride=2)])
    x = g.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c_in = 64
    for stage, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            c_out = width * 4 if bottleneck else width
            if bottleneck:
                y = g.node("Relu", [g.conv(x, c_in, width, 1)])
                y = g.node("Relu", [g.conv(y, width, width, 3, stride)])
                y = g.conv(y, width, c_out, 1, scale=BRANCH_SCALE)
            else:
                y = g.node("Relu", [g.conv(x, c_in, width, 3, stride)])
                y = g.conv(y, width, c_out, 3, scale=BRANCH_SCALE)
            shortcut = x if stride == 1 and c_in == c_out else g.conv(x, c_in, c_out, 1, stride)
            x = g.node("Relu", [g.node("Add", [y, shortcut])])
            c_in = c_out
    y = g.classifier(x, c_in, classes)
    return g.model(f"resnet{depth}", "input", (batch, 3, size, size), y, classes)


def mobilenet_v2(size: int = 224, batch: int = 1, classes: int = 1000, seed: int = 0
                 ) -> object:
    """torchvision's mobilenet_v2 (width 1.0)."""
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1)]  # expansion, channels, repeats, stride
    g = _Graph(seed)
    x = g.relu6(g.conv("input", 3, 32, 3, stride=2))
    c_in = 32
    for t, c, n, s in settings:
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = c_in * t
            y = g.relu6(g.conv(x, c_in, hidden, 1)) if t != 1 else x
            y = g.relu6(g.conv(y, hidden, hidden, 3, stride, groups=hidden))
            residual = stride == 1 and c_in == c
            y = g.conv(y, hidden, c, 1, scale=BRANCH_SCALE if residual else 1.0)
            x = g.node("Add", [x, y]) if residual else y
            c_in = c
    x = g.relu6(g.conv(x, c_in, 1280, 1))
    y = g.classifier(x, 1280, classes)
    return g.model("mobilenet_v2", "input", (batch, 3, size, size), y, classes)


BUILDERS: dict[str, Callable[..., object]] = {
    "resnet18": lambda **kw: resnet(18, **kw),
    "resnet50": lambda **kw: resnet(50, **kw),
    "mobilenet_v2": mobilenet_v2,
}


def build(name: str, size: int = 224, batch: int = 1, seed: int = 0) -> object:
    """One of MODELS as an onnx.ModelProto."""
    return BUILDERS[name](size=size, batch=batch, seed=seed)
