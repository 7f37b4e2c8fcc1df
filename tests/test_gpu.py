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
