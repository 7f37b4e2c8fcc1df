"""Verify a compiled kernel against references convgen did not write.

On seeded random inputs (asymmetric random kernels, so a missing or extra flip
cannot hide) the kernel's output is compared with:

  * onnxruntime running the artifact's exported ONNX model,
  * the numpy oracle (convgen.reference),
  * the flip property, through a plain ONNX Conv (cross-correlation) run by
    onnxruntime: a `conv` kernel equals Conv on the flipped weights and differs
    from Conv on the unflipped ones; a `corr` kernel the other way round;
  * for the bound kernel (`kernel.bind`: the packing and run-packed entries,
    where the module has them), onnxruntime again.

Tolerances are per dtype, relative to the output's magnitude.

A deployed model (`convgen deploy`) is checked against onnxruntime running the
model as given (`verify_model`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from convgen.errors import ArgumentError
from convgen.onnx_export import export_onnx
from convgen.reference import flip_weight, reference_conv
from convgen.runtime.cores import available_cores
from convgen.runtime.kernel import Kernel, check_tensor
from convgen.runtime.manifest import (
    Check,
    Manifest,
    ModelManifest,
    TensorInfo,
    VerifyReport,
    find_model_manifest,
    list_manifests,
    not_run,
)
from convgen.runtime.model import Model
from convgen.spec import ConvSpec

# (rtol, atol): |got - want| <= atol * max(1, max|want|) + rtol * |want|, elementwise.
# float32: the kernel and the references sum in different orders; over the
# largest reductions we build (C=512 x 3x3) that differs by ~1e-6 relative.
# float16: one rounding of the float32 sum to half (2^-11 relative), which
# can land one half-ulp apart when the float32 sums differ in their last bit.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-4, 1e-5),
    "float16": (2e-3, 1e-3),
}
# Winograd F(m x m, 3x3) (float32 only) rounds in its transforms, more for larger
# tiles. Worst error against a float64 oracle, relative to the output's magnitude,
# over the suite's dense 3x3 layers and the case table's Winograd specs (two seeds
# each, benchmarks/NOTES.md): F2 1.1e-6, F3 6.1e-6, F4 1.0e-5, F6 2.3e-5. The atol
# stated is at least 4x that.
ALGORITHM_TOLERANCES: dict[str, tuple[float, float]] = {
    "winograd_f2": (1e-4, 1e-5),
    "winograd_f3": (1e-4, 5e-5),
    "winograd_f4": (1e-4, 5e-5),
    "winograd_f6": (1e-4, 1e-4),
}


def tolerance(dtype: str, algorithm: str = "direct") -> tuple[float, float]:
    """(rtol, atol) of a kernel's results: the dtype's, or the algorithm's where looser."""
    return ALGORITHM_TOLERANCES.get(algorithm, TOLERANCES[dtype])
# The flip check's "differs": the wrong-flip reference must miss by far more
# than the tolerance; where conv == corr for this operator (1x1 kernels) it is moot.
DIFFERS_FACTOR = 10.0


def random_inputs(spec: ConvSpec, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs: data (and residual) in [-1, 1), weights and bias normal. A random
    kernel is asymmetric
    with probability 1, so conv and corr give different outputs."""
    rng = np.random.default_rng(seed)
    arrays = {
        "data": rng.uniform(-1, 1, spec.data_shape),
        "weight": rng.standard_normal(spec.weight_shape) / math.sqrt(spec.gemm_shape[2]),
    }
    if spec.bias:
        arrays["bias"] = rng.standard_normal(spec.bias_shape)
    if spec.residual:
        arrays["residual"] = rng.uniform(-1, 1, spec.out_shape)
    return {k: v.astype(spec.dtype) for k, v in arrays.items()}


def split_constants(spec: ConvSpec, inputs: dict[str, np.ndarray]
                    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(weight[, bias]), (data[, residual]): what `bind` takes, what each call takes."""
    constants = [v for k, v in inputs.items() if k in spec.constant_inputs]
    return constants, [v for k, v in inputs.items() if k not in spec.constant_inputs]


def within_tolerance(got: np.ndarray, want: np.ndarray, dtype: str,
                     algorithm: str = "direct") -> np.ndarray:
    """Elementwise: |got - want| <= atol * max(1, max|want|) + rtol * |want| (NaN fails)."""
    rtol, atol = tolerance(dtype, algorithm)
    g, w = got.astype(np.float64), want.astype(np.float64)
    scale = max(1.0, float(np.abs(w).max(initial=0.0)))
    return np.abs(g - w) <= atol * scale + rtol * np.abs(w)


def compare(name: str, got: np.ndarray, want: np.ndarray, dtype: str,
            algorithm: str = "direct") -> Check:
    g, w = got.astype(np.float64), want.astype(np.float64)
    if g.shape != w.shape:
        return Check(name, False, math.inf, math.inf, f"shape {g.shape} != {w.shape}")
    scale = max(1.0, float(np.abs(w).max(initial=0.0)))
    err = np.abs(g - w)
    bad = ~within_tolerance(got, want, dtype, algorithm)
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


def ort_session(model: bytes | Path, spinning: bool = False, profiling: bool = False,
                optimized: bool = True) -> Any:
    """onnxruntime on the CPU: every core, all graph optimizations (`optimized`: off,
    the graph as written), intra-op spinning off unless asked for (so its thread pool
    does not fight TVM's when both run in one process; the benchmarks, which time them
    in separate rounds, turn it on as onnxruntime's users have it); `profiling`: its
    per-node profiler on."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = available_cores()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.enable_profiling = profiling
    return ort.InferenceSession(
        model if isinstance(model, bytes) else str(model),
        sess_options=opts,
        providers=["CPUExecutionProvider"],
    )


def verify_kernel(kernel: Kernel, seed: int = 0) -> VerifyReport:
    """Run `kernel` on seeded inputs and check it against onnxruntime on the artifact's
    ONNX model, the numpy oracle and the flip property."""
    spec = kernel.spec
    if kernel.device == "cuda":
        from convgen.runtime import cuda_driver

        if not cuda_driver.gpu_present():
            return not_run("no GPU present")
    algo = kernel.manifest.algorithm
    rtol, atol = tolerance(spec.dtype, algo)
    inputs = random_inputs(spec, seed)
    got = kernel(*inputs.values())
    if got.shape != spec.out_shape or got.dtype != np.dtype(spec.dtype):
        checks = [Check("output shape and dtype", False, math.inf, math.inf,
                        f"got {got.shape} {got.dtype}, want {spec.out_shape} {spec.dtype}")]
    else:
        onnx_path = kernel.manifest.path_of("onnx", kernel.directory)
        onnx_out = ort_session(onnx_path).run(None, inputs)[0]
        checks = [
            Check("output shape and dtype", True, 0.0, 0.0),
            compare("onnxruntime (exported model)", got, onnx_out, spec.dtype, algo),
            compare("numpy oracle", got, reference_conv(spec, *inputs.values()), spec.dtype,
                    algo),
            *_flip_checks(spec, inputs, got, algo),
            compare(_bound_check_name(kernel), _bound_output(kernel, inputs), onnx_out,
                    spec.dtype, algo),
        ]
    ok = all(c.passed for c in checks)
    return VerifyReport(
        status="passed" if ok else "failed",
        reason="" if ok else "output does not match the references",
        seed=seed, dtype=spec.dtype, tolerance={"rtol": rtol, "atol": atol},
        checks=tuple(checks),
    )


def _bound_check_name(kernel: Kernel) -> str:
    packed = kernel.manifest.packed_weights
    if packed is None:
        return "bound kernel (weights held, plain entry) vs onnxruntime"
    return f"bound kernel ({packed.pack_entry} + {packed.run_entry}) vs onnxruntime"


def _bound_output(kernel: Kernel, inputs: dict[str, np.ndarray]) -> np.ndarray:
    constants, per_call = split_constants(kernel.spec, inputs)
    out = kernel.bind(*constants)(*per_call)
    return out if isinstance(out, np.ndarray) else np.asarray(out)


def _flip_checks(spec: ConvSpec, inputs: dict[str, np.ndarray], got: np.ndarray,
                 algorithm: str) -> list[Check]:
    """conv == Conv(flip(W)) != Conv(W); corr == Conv(W) != Conv(flip(W))."""
    plain = dataclasses.replace(spec, mode="corr")
    session = ort_session(export_onnx(plain).SerializeToString())
    flipped = dict(inputs, weight=flip_weight(spec, inputs["weight"]))
    as_given = session.run(None, inputs)[0]
    as_flipped = session.run(None, flipped)[0]
    same, other = (as_flipped, as_given) if spec.mode == "conv" else (as_given, as_flipped)
    which = "flipped" if spec.mode == "conv" else "unflipped"
    checks = [compare(f"flip: equals ONNX Conv on {which} weights", got, same, spec.dtype,
                      algorithm)]
    other_name = "unflipped" if spec.mode == "conv" else "flipped"
    rtol, atol = tolerance(spec.dtype, algorithm)
    threshold = DIFFERS_FACTOR * (atol + rtol)
    if compare("", same, other, spec.dtype).max_rel_error <= threshold:
        # e.g. 1x1 kernels, or padding that leaves only the centre tap in range
        checks.append(Check("flip: not observable on this operator (conv == corr)", True, 0, 0))
    else:
        wrong = compare("", got, other, spec.dtype, algorithm)
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
    path: str | os.PathLike[str], seed: int = 0, update: bool = True,
    sample: str | os.PathLike[str] | None = None,
) -> list[tuple[str, VerifyReport]]:
    """Verify every kernel of an artifact directory (or one manifest) on this machine.

    With `update`, the result replaces the manifest's verification record (written
    atomically), so an artifact built where its GPU was absent can be verified later
    on the GPU machine. A deployed model's directory verifies the model (on `sample`
    inputs where given, `model_inputs`).
    """
    model_manifest = find_model_manifest(path)
    if model_manifest is not None:
        model = Model(model_manifest)
        report = dataclasses.replace(verify_model(model, seed=seed, sample=sample),
                                     host=platform.node())
        if update:
            report = _record(model.manifest, model_manifest, report)
        return [(model.name, report)]
    if sample is not None:
        raise ArgumentError(f"inputs: sample inputs are for a deployed model; {path} "
                            "holds kernels")
    results = []
    for manifest_path in list_manifests(path):
        kernel = Kernel(manifest_path)
        report = verify_kernel(kernel, seed=seed)
        if report.status != "not run":
            device = ""
            if kernel.device == "cuda":
                from convgen.runtime import cuda_driver

                device = cuda_driver.device_name()
            report = dataclasses.replace(report, host=platform.node(), device=device)
            if update:
                report = _record(kernel.manifest, manifest_path, report)
        results.append((kernel.name, report))
    return results


def _record(manifest: Manifest | ModelManifest, path: Path, report: VerifyReport
            ) -> VerifyReport:
    """Write the report into the manifest; a read-only artifact keeps its old record."""
    try:
        dataclasses.replace(manifest, verification=report).write(path)
    except OSError:
        return dataclasses.replace(report, reason="manifest is read-only: result not recorded")
    return report


# ---- deployed models ------------------------------------------------------------------

# A model's outputs against onnxruntime's: |got - want| <= tolerance * max|want|, by the
# output's dtype. float32: tens of layers compound each kernel's rounding (Winograd's
# most of all), and a classifier's logits are compared, not a single layer's output.
# float16: every layer's output is rounded to half (2^-11 relative) where each
# implementation chooses, so the two differ by whole half ulps of the largest
# magnitude (one 3x3 layer: 1.2e-3, one ulp of its largest output).
MODEL_TOLERANCES = {"float32": 1e-3, "float16": 1e-2}
MODEL_TOLERANCE = MODEL_TOLERANCES["float32"]


def read_sample_inputs(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """A model's sample inputs from an .npz file (`np.savez(path, name=array, ...)`),
    by input name."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):  # (np.load would try a pickle)
            raise ValueError("not an .npz file: np.savez writes one")
        with np.load(path, allow_pickle=False) as found:
            return {name: found[name] for name in found.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ArgumentError(f"inputs: cannot read {path} as an .npz of arrays by input "
                            f"name ({err})") from None


def model_inputs(model: Model, seed: int,
                 sample: str | os.PathLike[str] | None = None) -> dict[str, np.ndarray]:
    """An array for every input of a deployed model (`sample_inputs`)."""
    return sample_inputs(model.inputs, model.name, seed, sample)


def sample_inputs(inputs: list[TensorInfo], owner: str, seed: int,
                  sample: str | os.PathLike[str] | None = None) -> dict[str, np.ndarray]:
    """An array for each of a model's `inputs`: the `sample` file's
    (`read_sample_inputs`), each checked against the input's shape and dtype; the
    others seeded, uniform in [-1, 1) (an image's scale). Random values are no input
    for an integer one (indices, token ids), so those must come from the file."""
    given = read_sample_inputs(sample) if sample is not None else {}
    return _fill_inputs(inputs, owner, seed, given, str(sample))


def _fill_inputs(inputs: list[TensorInfo], owner: str, seed: int,
                 given: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """`sample_inputs` on arrays already read from `source`."""
    names = [info.name for info in inputs]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ArgumentError(f"inputs: {unknown[0]} in {source} is not an input of "
                            f"{owner} (inputs: {', '.join(names)})")
    rng = np.random.default_rng(seed)
    arrays = {}
    for info in inputs:
        if info.name in given:
            check_tensor(info, given[info.name])
            arrays[info.name] = given[info.name]
        elif np.issubdtype(np.dtype(info.dtype), np.floating):
            arrays[info.name] = rng.uniform(-1, 1, info.shape).astype(info.dtype)
        else:
            raise ArgumentError(f"{info.name}: an input of {info.dtype}, which random "
                                "values do not fit: give sample inputs (--inputs FILE.npz, "
                                "arrays by input name)")
    return arrays


def reference_session(model: Model, spinning: bool = False, profiling: bool = False,
                      optimized: bool = True) -> Any:
    """onnxruntime on the model as given (weights as initializers; all optimizations,
    or with `optimized` off the graph as written); for a `conv`-mode deployment, with
    every Conv's weights flipped, which is what the deployment computes."""
    import onnx

    from convgen.onnx_export import flip_conv_weights

    proto = onnx.load(str(model.manifest.path_of("onnx", model.directory)))
    if model.manifest.mode == "conv":
        proto = flip_conv_weights(proto)
    return ort_session(proto.SerializeToString(), spinning, profiling, optimized)


def output_error(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(max |got - want|, max |want|) over the finite values. Equal values agree,
    infinities and NaNs included (a model whose outputs are NaN for the random inputs,
    x ** 0.5 of a negative, where onnxruntime's are too); a NaN on one side only is an
    infinite error."""
    g, w = got.astype(np.float64), np.asarray(want, np.float64)
    nan = np.isnan(w)
    if not np.array_equal(np.isnan(g), nan):
        return float("inf"), 1.0
    finite = np.isfinite(w)
    scale = max(float(np.max(np.abs(w[finite]))) if finite.any() else 0.0, 1e-30)
    differ = ~nan & (g != w)
    return (float(np.max(np.abs(g[differ] - w[differ]))) if differ.any() else 0.0), scale


def verify_model(model: Model, seed: int = 0,
                 sample: str | os.PathLike[str] | None = None) -> VerifyReport:
    """The deployed model against onnxruntime on the original model, every output within
    its dtype's MODEL_TOLERANCES of the largest magnitude; in `conv` mode also that it
    differs from the model run as cross-correlation (the flip happened). On `sample`
    inputs where given (`model_inputs`)."""
    if model.device == "cuda":
        from convgen.runtime import cuda_driver

        if not cuda_driver.gpu_present():
            return not_run("no GPU present")
    from_file = read_sample_inputs(sample) if sample is not None else {}
    inputs = _fill_inputs(model.inputs, model.name, seed, from_file, str(sample))
    # the report's record of them: "FILE (names)" (every name was an input, or raised)
    given = f"{Path(sample).name} ({', '.join(from_file)})" if sample is not None else ""
    try:
        # The graph as written: onnxruntime's optimizations rewrite it into another
        # model that computes the same to within rounding, except where rounding is
        # the point (a QDQ Conv fused into an integer QLinearConv rounds a tie the
        # other way: one quantization step off the model as written).
        want = reference_session(model, optimized=False).run(None, inputs)
    except Exception as err:  # onnxruntime's own error types
        return VerifyReport(status="failed", seed=seed, against="onnxruntime on the "
                            "original model", reason="onnxruntime cannot run the original "
                            f"model: {str(err).strip().splitlines()[0][:300]}", inputs=given)
    got = model(**inputs)
    got = list(got) if isinstance(got, tuple) else [got]
    checks = []
    for info, g, w in zip(model.outputs, got, want):
        err, scale = output_error(g, w)
        tol = MODEL_TOLERANCES.get(info.dtype, MODEL_TOLERANCE)
        checks.append(Check(f"{info.name} vs onnxruntime", bool(err <= tol * scale),
                            err, err / scale, f"(relative to max |output| {scale:.3g})"))
    tol = MODEL_TOLERANCES.get(model.outputs[0].dtype, MODEL_TOLERANCE)  # (the first's)
    if model.manifest.mode == "conv" and any(
            max(layer.spec.kernel_size) > 1 for layer in model.manifest.layers):
        as_given = ort_session(Path(model.manifest.path_of("onnx", model.directory)),
                               optimized=False)
        gap, scale = output_error(got[0], as_given.run(None, inputs)[0])
        checks.append(Check("differs from Conv on the weights as given (the flip)",
                            bool(gap > DIFFERS_FACTOR * tol * scale), gap,
                            gap / scale))
    ok = all(c.passed for c in checks)
    return VerifyReport(
        status="passed" if ok else "failed",
        reason="" if ok else "output does not match onnxruntime",
        seed=seed, dtype=model.outputs[0].dtype, tolerance={"relative_to_max": tol},
        checks=tuple(checks), against="onnxruntime on the original model", inputs=given,
    )
