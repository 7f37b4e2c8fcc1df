"""An ONNX graph run node by node in PyTorch eager mode: a deployed model's PyTorch peer.

What a PyTorch user runs instead of a deployed model is the network in eager mode,
every convolution a oneDNN call on the CPU or a cuDNN call on the GPU
(`cudnn.benchmark` on), every other operator one of PyTorch's own kernels. On a
GPU machine it is the only peer: onnxruntime there runs on the CPU. Running the
deployed model's own ONNX graph that way (the weights of that graph, BatchNorm
folded as the exporter wrote it; in `conv` mode with the Conv weights flipped)
gives the same calls on the same shapes without needing the network's Python
definition. Operators outside the table below make the peer unavailable
(`TorchGraphError` names the first one); the table holds what image classifiers
are made of.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


class TorchGraphError(Exception):
    """The graph uses an operator (or an attribute of one) this peer does not run."""


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def torch_pads(pads: list[int] | tuple[int, ...], ndim: int
               ) -> tuple[list[int] | None, list[int]]:
    """ONNX pads (begins then ends, as `ConvSpec.pads`) as PyTorch takes them: symmetric
    pads as the operator's own `padding`, else an explicit F.pad (last axis first) and
    none."""
    begin, end = list(pads[:ndim]), list(pads[ndim:])
    if begin == end:
        return None, begin
    return [p for i in reversed(range(ndim)) for p in (begin[i], end[i])], [0] * ndim


def torch_graph(proto: Any, device: str) -> Callable[[dict[str, Any]], list[Any]]:
    """A callable taking the graph's inputs as torch tensors by name and returning its
    outputs as torch tensors, every initializer moved to `device` once. Raises
    TorchGraphError for an operator it does not run."""
    import torch
    import torch.nn.functional as F
    from onnx import numpy_helper

    dev = torch.device(device)
    consts = {t.name: torch.from_numpy(np.array(numpy_helper.to_array(t))).to(dev)
              for t in proto.graph.initializer}
    outputs = [o.name for o in proto.graph.output]
    steps: list[Callable[[dict[str, Any]], None]] = []

    def step(node: Any) -> Callable[[dict[str, Any]], None]:
        op, a, ins, out = node.op_type, _attrs(node), list(node.input), node.output[0]

        def const(name: str) -> Any:
            if name not in consts:
                raise TorchGraphError(f"{op} with a computed {name!r} (not an initializer)")
            return consts[name]

        if len(node.output) != 1:
            raise TorchGraphError(f"{op} with {len(node.output)} outputs")

        def unary(fn: Callable[[Any], Any]) -> Callable[[dict[str, Any]], None]:
            def run(env: dict[str, Any]) -> None:
                env[out] = fn(env[ins[0]])
            return run

        def binary(fn: Callable[[Any, Any], Any]) -> Callable[[dict[str, Any]], None]:
            def run(env: dict[str, Any]) -> None:
                env[out] = fn(env[ins[0]], env[ins[1]])
            return run

        if op == "Conv":
            kernel = const(ins[1])
            ndim = kernel.dim() - 2
            conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[ndim]
            if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                raise TorchGraphError("Conv with auto_pad")
            explicit, padding = torch_pads(a.get("pads", [0] * 2 * ndim), ndim)
            bias = const(ins[2]) if len(ins) > 2 and ins[2] else None
            kw = dict(stride=a.get("strides", [1] * ndim), padding=padding,
                      dilation=a.get("dilations", [1] * ndim), groups=a.get("group", 1))

            def run_conv(env: dict[str, Any]) -> None:
                x = env[ins[0]]
                if explicit is not None:
                    x = F.pad(x, explicit)
                env[out] = conv(x, kernel, bias, **kw)
            return run_conv
        if op == "Relu":
            return unary(F.relu)
        if op == "Sigmoid":
            return unary(torch.sigmoid)
        if op == "HardSigmoid":
            alpha, beta = a.get("alpha", 0.2), a.get("beta", 0.5)
            return unary(lambda x: torch.clamp(x * alpha + beta, 0.0, 1.0))
        if op == "HardSwish":
            return unary(F.hardswish)
        if op == "Clip":
            lo = float(const(ins[1])) if len(ins) > 1 and ins[1] else a.get("min")
            hi = float(const(ins[2])) if len(ins) > 2 and ins[2] else a.get("max")
            return unary(lambda x: torch.clamp(x, lo, hi))
        if op in ("Add", "Mul", "Sub", "Div"):
            fn = {"Add": torch.add, "Mul": torch.mul, "Sub": torch.sub, "Div": torch.div}[op]
            return binary(fn)  # (a constant operand is an initializer in `env`)
        if op == "GlobalAveragePool":
            return unary(lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True))
        if op in ("MaxPool", "AveragePool"):
            k = a["kernel_shape"]
            ndim = len(k)
            if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or a.get("ceil_mode"):
                raise TorchGraphError(f"{op} with auto_pad or ceil_mode")
            explicit, padding = torch_pads(a.get("pads", [0] * 2 * ndim), ndim)
            if explicit is not None:
                raise TorchGraphError(f"{op} with asymmetric pads")
            stride = a.get("strides", [1] * ndim)
            if op == "MaxPool":
                pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[ndim]
                return unary(lambda x: pool(x, k, stride, padding,
                                            dilation=a.get("dilations", [1] * ndim)))
            avg = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[ndim]
            include = bool(a.get("count_include_pad", 0))
            return unary(lambda x: avg(x, k, stride, padding, count_include_pad=include))
        if op == "Flatten":
            axis = a.get("axis", 1)
            return unary(lambda x: x.reshape(int(np.prod(x.shape[:axis])), -1))
        if op == "Gemm":
            if a.get("transA", 0):
                raise TorchGraphError("Gemm with transA")
            w = const(ins[1])
            w = w.t() if a.get("transB", 0) else w
            w = (w * a.get("alpha", 1.0)).contiguous()
            c = const(ins[2]) * a.get("beta", 1.0) if len(ins) > 2 and ins[2] else None

            def run_gemm(env: dict[str, Any]) -> None:
                y = env[ins[0]] @ w
                env[out] = y + c if c is not None else y
            return run_gemm
        if op == "BatchNormalization":
            scale, shift, mean, var = (const(n) for n in ins[1:5])
            eps = a.get("epsilon", 1e-5)
            return unary(lambda x: F.batch_norm(x, mean, var, scale, shift, False, 0.0, eps))
        if op == "Transpose":
            perm = a.get("perm")
            return unary(lambda x: x.permute(*(perm or reversed(range(x.dim())))))
        if op == "Reshape":
            if a.get("allowzero", 0):
                raise TorchGraphError("Reshape with allowzero")
            target = [int(d) for d in const(ins[1]).tolist()]
            # ONNX's 0 keeps the input's extent on that axis
            return unary(lambda x: x.reshape([x.shape[i] if d == 0 else d
                                              for i, d in enumerate(target)]))
        if op == "Concat":
            axis = a["axis"]

            def run_concat(env: dict[str, Any]) -> None:
                env[out] = torch.cat([env[n] for n in ins], dim=axis)
            return run_concat
        raise TorchGraphError(op)

    for node in proto.graph.node:
        steps.append(step(node))

    def call(feed: dict[str, Any]) -> list[Any]:
        env: dict[str, Any] = {**consts, **feed}
        with torch.no_grad():
            for s in steps:
                s(env)
        return [env[n] for n in outputs]

    return call
