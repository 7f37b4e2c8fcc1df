"""Compiled CPU kernels over the shared case table, in both modes, against
onnxruntime, the numpy oracle and the flip property."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
from cases import case_specs
from helpers import assert_close, build_and_load, random_case

from convgen.compiler.build import build_artifact
from convgen.onnx_export import export_onnx
from convgen.reference import flip_weight, reference_conv
from convgen.runtime.kernel import load
from convgen.runtime.verify import split_constants
from convgen.spec import ConvSpec

SEED_INPUT = np.array(
    [[1, 2, 2, 1, 0], [3, 3, 3, 3, 0], [3, 0, 0, 2, 2], [0, 3, 0, 3, 3], [2, 2, 2, 3, 2]],
    dtype=np.float32,
)
SEED_KERNEL = np.arange(9, dtype=np.float32).reshape(3, 3)
SEED_CORR = [[60, 56, 52], [39, 61, 66], [54, 78, 82]]  # what MXNet printed
SEED_CONV = [[76, 72, 52], [81, 75, 62], [42, 42, 54]]


@pytest.mark.parametrize(("mode", "want"), [("corr", SEED_CORR), ("conv", SEED_CONV)])
def test_seed_example(mode, want, cpu_target, tmp_path):
    from convgen.spec import make_spec

    spec = make_spec(mode=mode, input="1x1x5x5", kernel="1x1x3x3")
    kernel = build_and_load(spec, cpu_target, tmp_path)
    got = kernel(SEED_INPUT[None, None], SEED_KERNEL[None, None])
    assert got.shape == (1, 1, 3, 3)
    assert got[0, 0].tolist() == want  # small integers: exact in float32


@pytest.mark.parametrize("spec", case_specs() + case_specs(epilogues=True))
def test_case_table(spec: ConvSpec, cpu_target, tmp_path):
    art = build_artifact(spec, cpu_target, tmp_path, verify=True, seed=1)
    report = art.manifest.verification
    failed = [c for c in report.checks if not c.passed]
    assert report.passed, failed
    # and independently of verify.py, on other inputs:
    kernel = load(art.manifest_path)
    inputs = random_case(spec, seed=7)
    got = kernel(*inputs.values())
    assert_close(got, reference_conv(spec, *inputs.values()), spec.dtype)
    session = ort.InferenceSession(export_onnx(spec).SerializeToString())
    assert_close(got, session.run(None, inputs)[0], spec.dtype)
    constants, per_call = split_constants(spec, inputs)
    assert_close(kernel.bind(*constants)(*per_call), got, spec.dtype)  # packed entries


@pytest.mark.parametrize("spec", case_specs(("conv",)))
def test_conv_is_corr_on_flipped_weights(spec: ConvSpec, cpu_target, tmp_path):
    """The defining property, with both kernels compiled: conv(I, K) == corr(I, flip(K))."""
    corr = dataclasses.replace(spec, mode="corr")
    k_conv = build_and_load(spec, cpu_target, tmp_path)
    k_corr = build_and_load(corr, cpu_target, tmp_path)
    inputs = random_case(spec, seed=3)
    flipped = dict(inputs, weight=flip_weight(spec, inputs["weight"]))
    assert_close(k_conv(*inputs.values()), k_corr(*flipped.values()), spec.dtype)
    if max(spec.kernel_size) > 1 and min(spec.in_size) > 1:
        assert not np.allclose(k_conv(*inputs.values()), k_corr(*inputs.values()), atol=1e-2)
