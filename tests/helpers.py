"""Building and running kernels inside tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from convgen.compiler.build import build_artifact
from convgen.compiler.targets import TargetInfo
from convgen.runtime.kernel import Kernel, load
from convgen.runtime.verify import compare, within_tolerance
from convgen.spec import ConvSpec


def build_and_load(spec: ConvSpec, target: TargetInfo, out: Path, verify: bool = False) -> Kernel:
    build_artifact(spec, target, out, verify=verify)
    return load(out, spec.name())


def assert_close(got: np.ndarray, want: np.ndarray, dtype: str) -> None:
    """Shape, then dtype, then values within the dtype's tolerance."""
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    assert got.dtype == np.dtype(dtype), f"dtype {got.dtype} != {dtype}"
    ok = within_tolerance(got, want, dtype)
    assert ok.all(), compare("values", got, want, dtype).line()


def random_case(spec: ConvSpec, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    arrays = {
        "data": rng.standard_normal(spec.data_shape),
        "weight": rng.standard_normal(spec.weight_shape),
    }
    if spec.bias:
        arrays["bias"] = rng.standard_normal(spec.bias_shape)
    if spec.residual:
        arrays["residual"] = rng.standard_normal(spec.out_shape)
    return {k: v.astype(spec.dtype) for k, v in arrays.items()}
