"""Verify a compiled kernel against references convgen did not write.

On seeded random inputs (asymmetric random kernels, so a missing or extra flip
cannot hide) the kernel's output is compared with:

  * onnxruntime running the artifact's exported ONNX model,
  * the numpy oracle (convgen.reference),
  * the flip property, through a plain ONNX Conv (cross-correlation) run by
    onnxruntime: a `conv` kernel equals Conv on the flipped weights and differs
    from Conv on the unflipped ones; a `corr` kernel the other way round.

Tolerances are per dtype, relative to the output's magnitude.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convgen.reference import flip_weight, reference_conv
from convgen.spec import ConvSpec

# |got - want| <= atol * max(1, max|want|) + rtol * |want|, elementwise.
# float32: the kernel and the references sum in different orders; over the
# largest reductions we build (C=512 x 3x3) that differs by ~1e-6 relative.
# float16: one rounding of the float32 sum to half (2^-11 relative), which
# can land one half-ulp apart when the float32 sums differ in their last bit.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-4, 1e-5),
    "float16": (2e-3, 1e-3),
}
# The flip check's "differs": the wrong-flip reference must miss by far more
# than the tolerance; where conv == corr for this operator (1x1 kernels) it is moot.
DIFFERS_FACTOR = 10.0


@dataclass
class Check:
    name: str
    passed: bool
    max_abs_error: float
    max_rel_error: float  # relative to max(1, max|want|)
    detail: str = ""

    def line(self) -> str:
        mark = "ok  " if self.passed else "FAIL"
        return f"{mark} {self.name}: max abs error {self.max_abs_error:.3g} {self.detail}".rstrip()


@dataclass
class VerifyReport:
    status: str  # "passed", "failed" or "not run"
    reason: str = ""
    seed: int | None = None
    dtype: str = ""
    tolerance: dict[str, float] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        head = f"verification {self.status}" + (f": {self.reason}" if self.reason else "")
        return [head, *(f"  {c.line()}" for c in self.checks)]


def not_run(reason: str) -> VerifyReport:
    return VerifyReport(status="not run", reason=reason)


def random_inputs(spec: ConvSpec, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs: data in [-1, 1), weights and bias normal. A random kernel is
    asymmetric with probability 1, so conv and corr give different outputs."""
    rng = np.random.default_rng(seed)
    arrays = {
        "data": rng.uniform(-1, 1, spec.data_shape),
        "weight": rng.standard_normal(spec.weight_shape) / math.sqrt(spec.gemm_shape[2]),
    }
    if spec.bias:
        arrays["bias"] = rng.standard_normal(spec.bias_shape)
    return {k: v.astype(spec.dtype) for k, v in arrays.items()}


def compare(name: str, got: np.ndarray, want: np.ndarray, dtype: str) -> Check:
    rtol, atol = TOLERANCES[dtype]
    g, w = got.astype(np.float64), want.astype(np.float64)
    if g.shape != w.shape:
        return Check(name, False, math.inf, math.inf, f"shape {g.shape} != {w.shape}")
    scale = max(1.0, float(np.abs(w).max(initial=0.0)))
    err = np.abs(g - w)
    bad = ~(err <= atol * scale + rtol * np.abs(w))  # NaN counts as bad
    max_abs = float(np.nanmax(err, initial=0.0)) if not np.isnan(err).all() else math.inf
    detail = ""
    if bad.any():
        worst = int(np.argmax(np.where(bad, err, -1)))
        idx = tuple(int(i) for i in np.unravel_index(worst, err.shape))
        detail = (
            f"({int(bad.sum())} of {err.size} elements off; worst at {list(idx)}: "
            f"got {g[idx]:.6g}, want {w[idx]:.6g})"
        )
    return Check(name, not bad.any(), max_abs, max_abs / scale, detail)


def ort_session(model: bytes | Path) -> Any:
    """onnxruntime on the CPU: every core, all graph optimizations, intra-op spinning
    off (so its thread pool does not fight TVM's when both run in one process)."""
    import onnxruntime as ort

    from convgen.runtime.kernel import available_cores

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = available_cores()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        model if isinstance(model, bytes) else str(model),
        sess_options=opts,
        providers=["CPUExecutionProvider"],
    )


def verify_kernel(kernel: Any, spec: ConvSpec, onnx_path: Path, seed: int = 0) -> VerifyReport:
    """Run `kernel` on seeded inputs and check it against onnxruntime, the numpy oracle
    and the flip property."""
    from convgen.onnx_export import export_onnx

    if kernel.device == "cuda":
        from convgen.runtime import cuda_driver

        if not cuda_driver.gpu_present():
            return not_run("no GPU present")
    rtol, atol = TOLERANCES[spec.dtype]
    report = VerifyReport(
        status="passed", seed=seed, dtype=spec.dtype, tolerance={"rtol": rtol, "atol": atol}
    )
    inputs = random_inputs(spec, seed)
    got = kernel(*inputs.values())
    if got.shape != spec.out_shape or got.dtype != np.dtype(spec.dtype):
        report.checks.append(
            Check("output shape and dtype", False, math.inf, math.inf,
                  f"got {got.shape} {got.dtype}, want {spec.out_shape} {spec.dtype}")
        )
    else:
        report.checks.append(Check("output shape and dtype", True, 0.0, 0.0))
        onnx_out = ort_session(onnx_path).run(None, inputs)[0]
        report.checks.append(compare("onnxruntime (exported model)", got, onnx_out, spec.dtype))
        oracle = reference_conv(spec, *inputs.values())
        report.checks.append(compare("numpy oracle", got, oracle, spec.dtype))
        report.checks.extend(_flip_checks(spec, inputs, got, export_onnx))
    if not all(c.passed for c in report.checks):
        report.status = "failed"
        report.reason = "output does not match the references"
    return report


def _flip_checks(
    spec: ConvSpec, inputs: dict[str, np.ndarray], got: np.ndarray, export_onnx: Any
) -> list[Check]:
    """conv == Conv(flip(W)) != Conv(W); corr == Conv(W) != Conv(flip(W))."""
    plain = dataclasses.replace(spec, mode="corr")
    session = ort_session(export_onnx(plain).SerializeToString())
    flipped = dict(inputs, weight=flip_weight(spec, inputs["weight"]))
    as_given = session.run(None, inputs)[0]
    as_flipped = session.run(None, flipped)[0]
    same, other = (as_flipped, as_given) if spec.mode == "conv" else (as_given, as_flipped)
    which = "flipped" if spec.mode == "conv" else "unflipped"
    checks = [compare(f"flip: equals ONNX Conv on {which} weights", got, same, spec.dtype)]
    other_name = "unflipped" if spec.mode == "conv" else "flipped"
    rtol, atol = TOLERANCES[spec.dtype]
    threshold = DIFFERS_FACTOR * (atol + rtol)
    if compare("", same, other, spec.dtype).max_rel_error <= threshold:
        # e.g. 1x1 kernels, or padding that leaves only the centre tap in range
        checks.append(Check("flip: not observable on this operator (conv == corr)", True, 0, 0))
    else:
        wrong = compare("", got, other, spec.dtype)
        differs = wrong.max_rel_error > threshold
        checks.append(
            Check(
                f"flip: differs from ONNX Conv on {other_name} weights",
                differs,
                wrong.max_abs_error,
                wrong.max_rel_error,
                "" if differs else "(the kernel's output matches the wrong flip)",
            )
        )
    return checks


def verify_artifact(
    path: str | os.PathLike[str], seed: int = 0, update: bool = True
) -> list[tuple[str, dict[str, Any]]]:
    """Verify every kernel of an artifact directory (or one manifest) on this machine.

    With `update`, the result replaces the manifest's verification record (written
    atomically), so an artifact built where its GPU was absent can be verified later
    on the GPU machine.
    """
    import platform

    from convgen.runtime.kernel import Kernel, list_manifests, write_manifest
    from convgen.spec import ConvSpec

    results = []
    for manifest_path in list_manifests(path):
        kernel = Kernel(manifest_path)
        spec = ConvSpec.from_dict(kernel.manifest["spec"])
        onnx_path = manifest_path.parent / kernel.manifest["files"]["onnx"]
        report = verify_kernel(kernel, spec, onnx_path, seed=seed).to_dict()
        if report["status"] != "not run":
            report["host"] = platform.node()
            if kernel.device == "cuda":
                from convgen.runtime import cuda_driver

                report["device"] = cuda_driver.device_name()
        if update and report["status"] != "not run":
            try:
                write_manifest(manifest_path, dict(kernel.manifest, verification=report))
            except OSError:
                report["reason"] = "manifest is read-only: result not recorded"
        results.append((kernel.name, report))
    return results
