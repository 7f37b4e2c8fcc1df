"""CUDA kernels run on a GPU: the shared case table in both modes, against the numpy
oracle, onnxruntime and the flip property.

Where TVM is installed the kernels are built here; on a GPU machine without the
TVM compiler, point CONVGEN_PREBUILT at a directory built elsewhere with
`convgen build --target cuda --spec ... --defer-nvcc` (scripts/gpu_check.sh) and
they are compiled with nvcc and verified there.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from cases import case_specs
from helpers import assert_close, random_case

from convgen.reference import reference_conv
from convgen.spec import ConvSpec

pytestmark = pytest.mark.gpu


def _kernel(spec: ConvSpec, tmp_path: Path):
    from convgen.runtime.kernel import load

    prebuilt = os.environ.get("CONVGEN_PREBUILT")
    if prebuilt:
        from convgen.runtime.nvcc import compile_artifacts

        manifest = Path(prebuilt) / f"{spec.name()}.json"
        if not manifest.is_file():
            pytest.skip(f"{spec.name()} not in CONVGEN_PREBUILT")
        compile_artifacts(prebuilt)
        return load(manifest)
    if importlib.util.find_spec("tvm") is None:
        pytest.skip("no TVM compiler here and CONVGEN_PREBUILT not set")
    from convgen.compiler.build import build_artifact
    from convgen.compiler.targets import resolve_target

    build_artifact(spec, resolve_target("cuda"), tmp_path, verify=False)
    return load(tmp_path, spec.name())


@pytest.mark.parametrize("spec", case_specs())
def test_cuda_case_table(spec: ConvSpec, tmp_path):
    from convgen.runtime.verify import verify_kernel

    kernel = _kernel(spec, tmp_path)
    inputs = random_case(spec, seed=5)
    assert_close(kernel(*inputs.values()), reference_conv(spec, *inputs.values()), spec.dtype)
    report = verify_kernel(kernel, seed=2)
    assert report.status == "passed", report.lines()


SPLIT_K = [  # layers the heuristic splits along the reduction (a workspace per kernel)
    dict(mode="conv", input="1x128x7x7", kernel="128x128x3x3", padding=1, bias=True,
         residual=True, activation="relu"),
    dict(mode="conv", input="1x4x4x64", kernel="64x3x3x64", padding=1, layout="NHWC",
         dtype="float16", bias=True),
]


@pytest.mark.parametrize("flags", SPLIT_K, ids=lambda f: f["input"])
def test_device_tensors_in_device_array_out(flags, tmp_path):
    """The call a GPU deployment makes: weights bound (packed on the GPU, the flip of
    `conv` applied), device tensors in and a device array out that DLPack consumers
    take; split-K's workspace is allocated by the kernel and reused by every call."""
    from convgen.runtime import cuda_driver
    from convgen.runtime.verify import split_constants
    from convgen.spec import make_spec

    spec = make_spec(**flags)
    kernel = _kernel(spec, tmp_path)
    assert kernel.manifest.packed_weights is not None and kernel.manifest.workspace is not None
    inputs = random_case(spec, seed=7)
    want = reference_conv(spec, *inputs.values())
    constants, per_call = split_constants(spec, inputs)
    bound = kernel.bind(*constants)
    dev = [cuda_driver.DeviceArray.from_numpy(a) for a in per_call]
    for _ in range(2):  # the second call reuses the workspace and the cached output memory
        y = bound(*dev)
        assert isinstance(y, cuda_driver.DeviceArray)
        assert_close(y.numpy(), want, spec.dtype)
    assert_close(bound(*per_call), want, spec.dtype)  # numpy in, numpy out
    torch = pytest.importorskip("torch")
    assert_close(torch.from_dlpack(bound(*dev)).cpu().numpy(), want, spec.dtype)
