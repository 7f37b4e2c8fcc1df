"""Timing a kernel against the peers a user would pick instead, in one process.

CPU: onnxruntime (same thread count, intra-op spinning off so the two thread
pools do not fight) and PyTorch when installed, in rounds that alternate across
every kernel and peer of the run (`timing.time_host_rounds`). CUDA: PyTorch/cuDNN
when installed, timed with CUDA events. Runtime side: numpy, tvm-ffi and
onnxruntime only (torch is optional), so it runs on GPU machines without the
TVM compiler.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from convgen.runtime.cores import available_cores
from convgen.runtime.kernel import BoundKernel, Kernel, aligned_empty, host_usable
from convgen.runtime.model import Model
from convgen.runtime.timing import (
    Timing,
    geomean,
    gflops,
    measure_cpu_peak,
    time_cuda,
    time_host_rounds,
)
from convgen.spec import ConvSpec

# The headline: the call a deployment makes, a bound kernel (weights packed once by
# `Kernel.bind`, as onnxruntime prepacks initializers) on the array numpy gave it (on
# the GPU: on device tensors, returning one).
CALL = "convgen"
UNBOUND = "convgen_unbound"  # k(x, w): weights passed (and, for cpu_kvec, repacked) per call
RAW = "convgen_raw"  # the bound kernel's entry on buffers prepared for it
OWN = (CALL, UNBOUND, RAW)


@dataclass
class BenchResult:
    name: str
    description: str
    device: str
    threads: int
    flops: int
    times: dict[str, Timing] = field(default_factory=dict)  # "convgen", "onnxruntime", ...
    peak_gflops: float | None = None  # the measured FMA peak (CPU), for "% of peak"
    schedule: str | None = None  # how the kernel was scheduled, from its manifest
    algorithm: str = "direct"  # "direct" or "winograd_f<m>", from its manifest
    notes: list[str] = field(default_factory=list)

    def gflops(self, who: str) -> float:
        return gflops(self.flops, self.times[who].median)

    def ratio(self, peer: str) -> float:
        """Speed-up of convgen's bound call over `peer` (> 1: convgen is faster)."""
        return self.times[peer].median / self.times[CALL].median

    @property
    def peers(self) -> list[str]:
        return [k for k in self.times if k not in OWN]

    @property
    def call_overhead(self) -> float | None:
        """How much longer the bound call takes than its raw entry (0.02: 2%)."""
        if RAW not in self.times:
            return None
        return self.times[CALL].median / self.times[RAW].median - 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gflops"] = {k: round(self.gflops(k), 2) for k in self.times}
        d["speedup"] = {k: round(self.ratio(k), 3) for k in self.peers}
        if self.call_overhead is not None:
            d["call_overhead"] = round(self.call_overhead, 4)
        if self.peak_gflops:
            d["percent_of_peak"] = {k: round(100 * self.gflops(k) / self.peak_gflops, 1)
                                    for k in self.times}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchResult:
        """Inverse of `to_dict` (the derived figures are recomputed, not read)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        row = {k: v for k, v in d.items() if k in fields}
        row["times"] = {k: Timing(**t) for k, t in d["times"].items()}
        return cls(**row)


def bench_kernels(
    kernels: list[Kernel],
    *,
    repeats: int = 30,
    warmup: int = 5,
    min_sample_ms: float = 20.0,
    peers: tuple[str, ...] = ("onnxruntime", "torch"),
) -> list[BenchResult]:
    """Time loaded convgen kernels and their peers on the same inputs. CPU kernels are
    timed together, their rounds alternating across the whole list: a slow spell of
    a shared machine (they lasted from seconds to minutes here) then costs every row
    a round or two, instead of all of one row's samples."""
    results: list[BenchResult] = []
    host_calls: dict[tuple[int, str], Callable[[], Any]] = {}
    for i, kernel in enumerate(kernels):
        result, calls = _prepare(kernel, peers, repeats, warmup, min_sample_ms)
        results.append(result)
        host_calls.update({(i, name): call for name, call in calls.items()})
    for (i, name), timing in time_host_rounds(host_calls, repeats, warmup,
                                              min_sample_ms).items():
        results[i].times[name] = timing
    return results


def _prepare(
    kernel: Kernel, peers: tuple[str, ...], repeats: int, warmup: int, min_sample_ms: float,
) -> tuple[BenchResult, dict[str, Callable[[], Any]]]:
    """The result row of one kernel and, on the CPU, the calls to time (convgen and
    its peers, on the same inputs); a CUDA kernel is timed here, on its own."""
    from convgen.runtime.verify import random_inputs, split_constants

    spec = kernel.spec
    n = available_cores()
    inputs = random_inputs(spec, seed=0)
    result = BenchResult(spec.name(), spec.describe(), kernel.device, n, spec.flops,
                         schedule=kernel.manifest.schedule.brief(),
                         algorithm=kernel.manifest.algorithm)
    constants, per_call = split_constants(spec, inputs)
    bound = kernel.bind(*constants)
    if kernel.device == "cuda":
        from convgen.runtime import cuda_driver

        # device-resident inputs: the public call `bound(x)` returns a device array (no
        # host copy inside the timing); beside it the raw entry on prepared buffers, so
        # the table's call overhead is what the call path adds per launch
        xs = [cuda_driver.DeviceArray.from_numpy(a) for a in per_call]
        out = cuda_driver.DeviceArray(spec.out_shape, spec.dtype)
        func, held, scratch = bound.func, bound.constants, kernel.scratch
        result.times[CALL] = time_cuda(lambda: bound(*xs), repeats, warmup, min_sample_ms)
        result.times[RAW] = time_cuda(lambda: func(xs[0], *held, *xs[1:], out, *scratch),
                                      repeats, warmup, min_sample_ms)
        result.notes.append(f"GPU: {cuda_driver.device_name()}")
        if "torch" in peers:
            result.times.update(cudnn_timings(spec, inputs, repeats, warmup, min_sample_ms))
        return result, {}
    calls: dict[str, Callable[[], Any]] = {
        CALL: lambda: bound(*per_call),
        UNBOUND: lambda: kernel(*inputs.values()),
        RAW: _raw_entry(bound, per_call),
    }
    result.peak_gflops = measure_cpu_peak(n, kernel.manifest.target.vector_bits)
    if "onnxruntime" in peers:
        calls["onnxruntime"] = _onnxruntime_call(spec, inputs)
    if "torch" in peers:
        call = torch_conv(spec, inputs, "cpu")
        if call is None:
            result.notes.append("PyTorch not installed: no torch column")
        else:
            calls["torch"] = call
    return result, calls


def bench_model(model: Model, *, repeats: int = 30, warmup: int = 5,
                min_sample_ms: float = 20.0,
                sample: str | os.PathLike[str] | None = None,
                peers: bool = True) -> BenchResult:
    """A deployed model against onnxruntime on the model as given (all optimizations,
    weights as initializers, its thread pool spinning as by default; for `conv` mode
    with its Conv weights flipped) and PyTorch eager on the same graph
    (`torch_model_call`, where torch is installed), in one process, alternating
    rounds (each starting once the others' threads are idle); convgen through
    `model(x)` on numpy arrays. A CUDA model: `model(x)` on device tensors, against
    PyTorch eager on the GPU with TF32 off and on. Without `peers`, convgen alone. On
    `sample` inputs where given (`verify.model_inputs`)."""
    from convgen.runtime.verify import model_inputs, reference_session

    m = model.manifest
    inputs = model_inputs(model, seed=0, sample=sample)
    kernel_calls = len(m.layers) - sum(bool(layer.pair) for layer in m.layers) // 2
    result = BenchResult(m.name, f"{m.name}: {len(m.layers)} convgen layers, {m.mode}, "
                         f"{m.layout}", model.device, available_cores(), m.flops,
                         schedule=f"{kernel_calls} convgen kernel calls", algorithm="model")
    if model.device == "cuda":
        # on device tensors (no copies in the timing), CUDA events; onnxruntime here
        # runs on the CPU, which is no peer for a GPU model
        from convgen.runtime import cuda_driver

        on_gpu = [cuda_driver.DeviceArray.from_numpy(a) for a in inputs.values()]
        result.times[CALL] = time_cuda(lambda: model(*on_gpu), repeats, warmup, min_sample_ms)
        result.notes.append(f"GPU: {cuda_driver.device_name()}")
        if peers:
            call, notes = torch_model_call(model, inputs, "cuda")
            result.notes += notes
            if call is not None:
                import torch

                saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
                try:
                    for name, tf32 in (("torch", False), ("torch_tf32", True)):
                        torch.backends.cudnn.allow_tf32 = tf32
                        torch.backends.cuda.matmul.allow_tf32 = tf32
                        result.times[name] = time_cuda(call, repeats, warmup, min_sample_ms)
                finally:
                    (torch.backends.cudnn.allow_tf32,
                     torch.backends.cuda.matmul.allow_tf32) = saved
        return result
    calls: dict[str, Callable[[], Any]] = {CALL: lambda: model(**inputs)}
    if peers:
        session = reference_session(model, spinning=True)  # onnxruntime's default
        calls["onnxruntime"] = lambda: session.run(None, inputs)
        call, notes = torch_model_call(model, inputs, "cpu")
        result.notes += notes
        if call is not None:
            calls["torch"] = call
    # rounds of two samples: a whole model's sample is tens of milliseconds, and the
    # shared machine's slow spells (up to 2x, seconds long) must fall on both alike
    result.times.update(time_host_rounds(calls, repeats, warmup, min_sample_ms,
                                         rounds=max(5, repeats // 2)))
    return result


def torch_model_call(model: Model, inputs: dict[str, np.ndarray], device: str
                     ) -> tuple[Callable[[], Any] | None, list[str]]:
    """PyTorch as its users run a network: the model's own ONNX graph in eager mode
    (`torch_graph`; for `conv` with the Conv weights flipped), on `device` ("cpu":
    oneDNN, as many threads as convgen; "cuda": cuDNN with cudnn.benchmark on, TF32
    off while checking), on tensors made once from `inputs`. Its outputs are checked
    against the deployed model's first: a peer that disagrees is not returned.
    Returns the zero-argument call (or None) and notes for the report."""
    try:
        import torch
    except ImportError:
        return None, ["PyTorch not installed: no PyTorch column"]
    if device == "cuda" and not torch.cuda.is_available():
        return None, ["PyTorch has no CUDA here: no PyTorch column"]
    import onnx

    from convgen.onnx_export import flip_conv_weights
    from convgen.runtime.torch_graph import TorchGraphError, torch_graph
    from convgen.runtime.verify import MODEL_TOLERANCES, output_error

    m = model.manifest
    proto = onnx.load(str(m.path_of("onnx", model.directory)))
    if m.mode == "conv":
        proto = flip_conv_weights(proto)
    try:
        graph = torch_graph(proto, device)
    except TorchGraphError as err:
        return None, [f"no PyTorch column: it does not run {err}"]
    torch.set_num_threads(available_cores())
    torch.backends.cudnn.benchmark = True
    feed = {name: torch.from_numpy(a).to(device) for name, a in inputs.items()}
    want = model(**inputs)
    want = want if isinstance(want, tuple) else (want,)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        got = [t.cpu().numpy() for t in graph(feed)]
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    errors = [output_error(g, w) for g, w in zip(got, want, strict=True)]
    worst = max(err / scale for err, scale in errors)
    if worst > MODEL_TOLERANCES[str(want[0].dtype)]:
        return None, [f"PyTorch disagrees with the model (relative error {worst:.1e}): "
                      "not timed"]
    return (lambda: graph(feed)), [f"PyTorch {torch.__version__} eager on the same graph "
                                   f"agrees (relative error {worst:.1e})"]


def _raw_entry(bound: BoundKernel, per_call: list[np.ndarray]) -> Callable[[], Any]:
    """The bound kernel's entry on buffers prepared for it (64-byte aligned, output
    given): what the kernel costs without the call path around it."""
    spec = bound.kernel.spec
    x, *rest = (host_usable(a, a.dtype, 64) for a in per_call)
    out = aligned_empty(spec.out_shape, spec.dtype, 64)
    func, constants, scratch = bound.func, bound.constants, bound.kernel.scratch
    return lambda: func(x, *constants, *rest, out, *scratch)


def _onnxruntime_call(spec: ConvSpec, inputs: dict[str, np.ndarray]) -> Callable[[], Any]:
    """onnxruntime as a deployed model runs: the weights (and bias) are initializers,
    which lets it prepack them and pick its blocked kernels, and only the data is fed
    per call. For `conv` the model holds the weights flipped once (the model a user
    porting DSP weights would deploy), so no flip is paid per call."""
    from convgen.onnx_export import export_onnx
    from convgen.reference import flip_weight
    from convgen.runtime.verify import ort_session

    constants = {k: v for k, v in inputs.items() if k in spec.constant_inputs}
    if spec.mode == "conv":
        constants["weight"] = flip_weight(spec, inputs["weight"])
    model = export_onnx(dataclasses.replace(spec, mode="corr"), constants)
    session = ort_session(model.SerializeToString())
    feed = {k: v for k, v in inputs.items() if k not in spec.constant_inputs}
    return lambda: session.run(None, feed)


def torch_conv(spec: ConvSpec, inputs: dict[str, np.ndarray], device: str) -> Any:
    """A zero-argument callable running the same operator in PyTorch (cuDNN on CUDA,
    oneDNN on the CPU), the epilogue as PyTorch users write it (in place after the
    conv), or None where PyTorch (or its CUDA) is missing. torch has no
    true convolution: for `conv` the weights are flipped once, outside the timing."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    from convgen.runtime.torch_graph import torch_pads

    if device == "cuda" and not torch.cuda.is_available():
        return None
    torch.set_num_threads(available_cores())
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda" if device == "cuda" else "cpu")
    x = torch.from_numpy(inputs["data"]).to(dev)
    w = torch.from_numpy(inputs["weight"]).to(dev)
    b = torch.from_numpy(inputs["bias"]).to(dev) if spec.bias else None
    if spec.channels_last:
        # PyTorch's channels-last: logical NCHW tensors with NHWC memory.
        x = x.movedim(-1, 1)
        w = w.movedim(-1, 1)
        if spec.ndim in (2, 3):
            fmt = torch.channels_last if spec.ndim == 2 else torch.channels_last_3d
            x, w = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
    if spec.mode == "conv":
        w = w.flip(list(range(2, 2 + spec.ndim)))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spec.ndim]
    explicit, padding = torch_pads(spec.pads, spec.ndim)
    if explicit is not None:
        x = F.pad(x, explicit)
    residual = None
    if spec.residual:
        residual = torch.from_numpy(inputs["residual"]).to(dev)
        if spec.channels_last:
            residual = residual.movedim(-1, 1)
    activation = {"relu": F.relu, "relu6": F.relu6, "silu": F.silu,
                  "hardswish": F.hardswish}.get(spec.activation)

    def call() -> Any:
        with torch.no_grad():
            y = conv(x, w, b, stride=list(spec.stride), padding=padding,
                     dilation=list(spec.dilation), groups=spec.groups)
            if residual is not None:
                y += residual
            return activation(y, inplace=True) if activation is not None else y

    return call


def cudnn_timings(spec: ConvSpec, inputs: dict[str, np.ndarray], repeats: int, warmup: int,
                  min_sample_ms: float) -> dict[str, Timing]:
    """cuDNN through PyTorch (cudnn.benchmark on): for float32 both with TF32 off
    (the same arithmetic as convgen's kernels) and on (PyTorch's default)."""
    call = torch_conv(spec, inputs, "cuda")
    if call is None:
        return {}
    import torch

    out = {}
    modes = [("cudnn", False), ("cudnn_tf32", True)] if spec.dtype == "float32" else [
        ("cudnn", True)]
    saved = torch.backends.cudnn.allow_tf32
    try:
        for name, tf32 in modes:
            torch.backends.cudnn.allow_tf32 = tf32
            out[name] = time_cuda(call, repeats, warmup, min_sample_ms)
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    return out


def format_table(results: list[BenchResult]) -> list[str]:
    """A markdown table: GFLOP/s of convgen's bound call (`k.bind(w)(x)` on numpy
    arrays), of its raw entry and of the unbound call `k(x, w)`, and of each peer with
    the bound call's speed-up over it."""
    peers = sorted({p for r in results for p in r.peers})
    with_raw = any(RAW in r.times for r in results)
    with_unbound = any(UNBOUND in r.times for r in results)
    with_peak = any(r.peak_gflops for r in results)
    head = ["kernel", "algorithm", "schedule", "convgen ms", "convgen GFLOP/s"]
    head += ["raw entry GFLOP/s", "call overhead"] if with_raw else []
    head += ["k(x, w) GFLOP/s"] if with_unbound else []
    head += ["% peak"] if with_peak else []
    for p in peers:
        head += [f"{p} GFLOP/s", f"vs {p}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [r.name, r.algorithm, r.schedule or "-", f"{r.times[CALL].median * 1e3:.3f}",
               f"{r.gflops(CALL):.1f}"]
        if with_raw:
            overhead = r.call_overhead
            row += ([f"{r.gflops(RAW):.1f}", f"{100 * overhead:+.1f}%"] if overhead is not None
                    else ["-", "-"])
        if with_unbound:
            row.append(f"{r.gflops(UNBOUND):.1f}" if UNBOUND in r.times else "-")
        if with_peak:
            row.append(f"{100 * r.gflops(CALL) / r.peak_gflops:.0f}%" if r.peak_gflops
                       else "-")
        for p in peers:
            row += ([f"{r.gflops(p):.1f}", f"{r.ratio(p):.2f}x"] if p in r.times else ["-", "-"])
        lines.append("| " + " | ".join(row) + " |")
    for p in peers:
        ratios = [r.ratio(p) for r in results if p in r.times]
        if ratios:
            lines.append(f"geometric-mean speed-up over {p}: {geomean(ratios):.2f}x "
                         f"(worst {min(ratios):.2f}x, {len(ratios)} kernels)")
    peaks = {r.peak_gflops for r in results if r.peak_gflops}
    if peaks:
        lines.append(f"measured FMA peak: {max(peaks):.1f} GFLOP/s on {results[0].threads} threads")
    return lines


def format_model_table(results: list[BenchResult]) -> list[str]:
    """A markdown table of deployed models: milliseconds end to end, and the speed-up
    over each peer."""
    peers = sorted({p for r in results for p in r.peers})
    head = ["model", "convgen ms", *(c for p in peers for c in (f"{p} ms", f"vs {p}"))]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [r.name, f"{r.times[CALL].median * 1e3:.2f}"]
        for p in peers:
            row += ([f"{r.times[p].median * 1e3:.2f}", f"{r.ratio(p):.2f}x"] if p in r.times
                    else ["-", "-"])
        lines.append("| " + " | ".join(row) + " |")
    return lines


def plot(results: list[BenchResult], path: str) -> None:
    """Bar chart of GFLOP/s per kernel and implementation (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from convgen.errors import ToolchainError

        raise ToolchainError("plot: matplotlib is not installed (pip install matplotlib)") from None
    who = [CALL, *sorted({p for r in results for p in r.peers})]
    fig, ax = plt.subplots(figsize=(max(6, len(results) * 0.6), 4.5))
    width = 0.8 / len(who)
    for i, w in enumerate(who):
        xs = [j + i * width for j, r in enumerate(results) if w in r.times]
        ys = [r.gflops(w) for r in results if w in r.times]
        ax.bar(xs, ys, width, label=w)
    peaks = [r.peak_gflops for r in results if r.peak_gflops]
    if peaks:
        ax.axhline(max(peaks), color="gray", linestyle="--", linewidth=1, label="FMA peak")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(results))])
    ax.set_xticklabels([r.name.split("_s")[0] for r in results], rotation=75, fontsize=6)
    ax.set_ylabel("GFLOP/s")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
