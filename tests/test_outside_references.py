"""Compiled kernels against references convgen did not write: scipy.signal in
1-D/2-D/3-D, and the ONNX project's own Conv test cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import scipy.signal
from helpers import assert_close, build_and_load
from onnx import numpy_helper

from convgen.reference import flip_weight
from convgen.spec import make_spec, specs_from_onnx

SCIPY_SHAPES = [(23,), (9, 11), (6, 7, 5)]
SCIPY_KERNELS = [(4,), (3, 4), (2, 3, 3)]


@pytest.mark.parametrize("scipy_mode", ["valid", "full"])
@pytest.mark.parametrize(("mode", "func"), [("conv", scipy.signal.convolve),
                                            ("corr", scipy.signal.correlate)])
@pytest.mark.parametrize(("shape", "kshape"), list(zip(SCIPY_SHAPES, SCIPY_KERNELS)),
                         ids=["1d", "2d", "3d"])
def test_scipy_signal(shape, kshape, mode, func, scipy_mode, cpu_target, tmp_path):
    rng = np.random.default_rng(len(shape))
    x = rng.standard_normal(shape).astype(np.float32)
    k = rng.standard_normal(kshape).astype(np.float32)
    spec = make_spec(mode=mode, input=(1, 1, *shape), kernel=(1, 1, *kshape), padding=scipy_mode)
    kernel = build_and_load(spec, cpu_target, tmp_path)
    got = kernel(x[None, None], k[None, None])[0, 0]
    want = func(x.astype(np.float64), k.astype(np.float64), mode=scipy_mode, method="direct")
    assert_close(got, want.astype(np.float32), "float32")


def _onnx_node_cases() -> list:
    from onnx.backend.test.case import node

    return [pytest.param(c, id=c.name) for c in node.collect_testcases("Conv")]


@pytest.mark.parametrize("case", _onnx_node_cases())
@pytest.mark.parametrize("mode", ["corr", "conv"])
def test_onnx_node_cases(case, mode, cpu_target, tmp_path):
    """onnx/backend/test/case/node/conv.py: corr against the stored outputs, conv
    against the same with the weights flipped."""
    path = tmp_path / "model.onnx"
    onnx.save(case.model, path)
    [(_, spec)] = specs_from_onnx(str(path), mode=mode)
    kernel = build_and_load(spec, cpu_target, tmp_path / "k")
    for inputs, outputs in case.data_sets:
        x, w = (np.asarray(a, dtype=np.float32) for a in inputs[:2])
        if mode == "conv":
            w = flip_weight(spec, w)
        assert_close(kernel(x, w), np.asarray(outputs[0], np.float32), "float32")


PYTORCH_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data" / "pytorch-converted"


def _pytorch_cases() -> list:
    dirs = sorted(p for p in PYTORCH_DATA.glob("test_Conv[123]d*") if p.is_dir())
    return [pytest.param(p, id=p.name) for p in dirs]


@pytest.mark.parametrize("case_dir", _pytorch_cases())
@pytest.mark.parametrize("mode", ["corr", "conv"])
def test_onnx_pytorch_converted(case_dir, mode, cpu_target, tmp_path):
    """onnx/backend/test/data/pytorch-converted/test_Conv{1,2,3}d*: PyTorch's Conv
    modules with their stored inputs and outputs."""
    model = onnx.load(case_dir / "model.onnx")
    [(_, spec)] = specs_from_onnx(str(case_dir / "model.onnx"), mode=mode)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    w = inits[conv.input[1]]
    b = inits.get(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    if mode == "conv":
        w = flip_weight(spec, w)
    kernel = build_and_load(spec, cpu_target, tmp_path)
    for data_set in sorted(case_dir.glob("test_data_set_*")):
        x = numpy_helper.to_array(onnx.load_tensor(str(data_set / "input_0.pb")))
        want = numpy_helper.to_array(onnx.load_tensor(str(data_set / "output_0.pb")))
        args = [x, w] + ([b] if b is not None else [])
        assert_close(kernel(*args), want, "float32")
