"""The click front-end: parse, call the stages, print. Nothing else lives here.

Errors convgen raises on purpose (ConvgenError) become one line and a non-zero
exit status (2 for bad input, 1 for a failed verification); never a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from convgen import __version__
from convgen.compiler.targets import DEFAULT_CUDA_ARCH
from convgen.errors import ArgumentError, ConvgenError, SpecError, ToolchainError
from convgen.spec import ACTIVATIONS

F = TypeVar("F", bound=Callable[..., Any])

MODE_HELP = (
    "conv: true convolution, the kernel flipped on every spatial axis (scipy.signal.convolve, "
    "cuDNN CUDNN_CONVOLUTION). corr: cross-correlation, no flip (what ONNX Conv, PyTorch "
    "and TVM call 'convolution'). Required: there is no default that hides the choice."
)


class CliError(click.ClickException):
    """A ConvgenError on its way out: 'Error: <message>' and the error's exit code."""

    def __init__(self, err: ConvgenError) -> None:
        super().__init__(str(err))
        self.exit_code = err.exit_code


def handle_errors(f: F) -> F:
    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except ConvgenError as err:
            raise CliError(err) from None

    return wrapper  # type: ignore[return-value]


SHAPE_HELP = ("NAME=DIMS, e.g. input=1x3x224x224: fix an ONNX model's input shape where the "
              "model leaves dimensions dynamic (a batch axis N). Repeat per input.")


def shape_option(help_text: str = SHAPE_HELP) -> Callable[[F], F]:
    return click.option("--shape", "input_shapes", metavar="NAME=DIMS", multiple=True,
                        help=help_text)


def spec_options(f: F) -> F:
    """The operator flags, shared by build, verify, inspect and bench."""
    options = [
        click.option("--spec", "spec_file", type=click.Path(dir_okay=False),
                     help="TOML or JSON file with one table per kernel (the flags' field "
                     "names), or an .onnx model (its Conv nodes, in --mode)."),
        shape_option("With --spec MODEL.onnx (or tune's --model): " + SHAPE_HELP),
        click.option("--suite", help="A named suite (resnet50): every layer in both "
                     "layouts and modes; --mode / --layout / --dtype narrow it."),
        click.option("--mode", type=click.Choice(["conv", "corr"], case_sensitive=False),
                     help=MODE_HELP),
        click.option("--input", "input_shape", metavar="SHAPE",
                     help="Data shape in the layout's order, e.g. 1x64x56x56 (N x C x H x W) "
                     "or 1x56x56x64 with --layout NHWC. 1 to 3 spatial dimensions."),
        click.option("--kernel", "kernel_shape", metavar="SHAPE",
                     help="Weight shape: K x C/groups x R... (channels-first) or "
                     "K x R... x C/groups (channels-last), e.g. 64x64x3x3."),
        click.option("--padding", default="0", show_default=True,
                     help="An integer, one per axis (2,1), per side in ONNX order (all "
                     "begins, then all ends: 1,0,2,3), valid, same (ONNX SAME_UPPER: "
                     "output = ceil(input/stride), extra pad at the end), same_lower, or "
                     "full (dilated kernel extent - 1 on both sides, as scipy's 'full')."),
        click.option("--stride", default="1", show_default=True,
                     help="One value or one per spatial axis (2,1)."),
        click.option("--dilation", default="1", show_default=True,
                     help="One value or one per spatial axis."),
        click.option("--groups", default="1", show_default=True,
                     help="Channel groups (C for depthwise)."),
        click.option("--layout", default=None,
                     help="NCW/NCHW/NCDHW (channels-first, the default) or NWC/NHWC/NDHWC "
                     "(channels-last, weight K x R... x C/groups)."),
        click.option("--dtype", default="float32", show_default=True,
                     type=click.Choice(["float32", "float16"]),
                     help="float16 multiplies and accumulates in float32."),
        click.option("--bias/--no-bias", default=False, show_default=True,
                     help="Add a per-output-channel bias input."),
        click.option("--residual/--no-residual", default=False, show_default=True,
                     help="Add a residual input of the output's shape (fused: "
                     "activation(conv + bias + residual), the output written once)."),
        click.option("--activation", default="none", show_default=True,
                     type=click.Choice(list(ACTIVATIONS)), metavar="NAME",
                     help="Fused activation, after bias and residual: none, relu, relu6 "
                     "(ONNX Clip 0..6), silu (x * sigmoid(x)), hardswish."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def target_option(f: F) -> F:
    return click.option(
        "--target", default="llvm", show_default=True,
        help=f"llvm / cpu (this machine's CPU), llvm:<mcpu>, cuda ({DEFAULT_CUDA_ARCH}), "
        "cuda:sm_80, or a JSON target dict.",
    )(f)


def library_option(f: F) -> F:
    return click.option(
        "--library", type=click.Path(file_okay=False), default=None,
        help="Record library of tuned schedules (default: the one shipped with convgen, or "
        "$CONVGEN_SCHEDULES).",
    )(f)


def algorithm_option(f: F) -> F:
    return click.option(
        "--algorithm", type=click.Choice(["auto", "direct", "winograd"]), default="auto",
        metavar="NAME",
        help="auto (the default: the tuned record, else the heuristics' choice), direct "
        "convolution, or winograd: F(m x m, 3x3) for 2-D 3x3 stride-1 float32 layers, "
        "dilated too, on CPU (the tile m is a knob).",
    )(f)


def inputs_option(f: F) -> F:
    return click.option(
        "--inputs", "sample", type=click.Path(exists=True, dir_okay=False), default=None,
        metavar="FILE.npz",
        help="A deployed model's inputs, an .npz of arrays by input name (np.savez), in "
        "place of random ones; the inputs it leaves out are random. Needed for integer "
        "inputs (indices, token ids).",
    )(f)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(f)


def collect_specs(
    spec_file: str | None, input_shapes: tuple[str, ...], suite: str | None,
    mode: str | None, input_shape: str | None,
    kernel_shape: str | None, padding: str, stride: str, dilation: str, groups: str,
    layout: str | None, dtype: str, bias: bool, residual: bool, activation: str,
) -> list[Any]:
    """The flags (or --spec FILE, or --suite NAME) -> a list of ConvSpec."""
    from convgen.spec import make_spec, parse_input_shapes, specs_from_file, specs_from_onnx

    if input_shapes and not (spec_file or "").endswith(".onnx"):
        raise SpecError("shape: --shape fixes an ONNX model's inputs: give it with "
                        "--spec MODEL.onnx")
    if suite:
        from convgen.suites import suite_specs

        if spec_file or input_shape or kernel_shape:
            raise SpecError("suite: give --suite alone (with --mode/--layout/--dtype filters)")
        return suite_specs(
            suite,
            modes=(mode,) if mode else ("conv", "corr"),
            layouts=(layout.upper(),) if layout else ("NCHW", "NHWC"),
            dtype=dtype,
        )
    if spec_file:
        if input_shape or kernel_shape:
            raise SpecError("spec: give either --spec FILE or --input/--kernel, not both")
        if spec_file.endswith(".onnx"):
            return [s for _, s in specs_from_onnx(spec_file, mode or "corr",
                                                  parse_input_shapes(input_shapes))]
        return [s for _, s in specs_from_file(spec_file)]
    missing = [n for n, v in (("--mode", mode), ("--input", input_shape),
                              ("--kernel", kernel_shape)) if not v]
    if missing:
        raise SpecError(f"{missing[0].lstrip('-')}: {', '.join(missing)} required (or --spec FILE)")
    return [make_spec(mode=str(mode), input=str(input_shape), kernel=str(kernel_shape),
                      padding=padding, stride=stride, dilation=dilation, groups=groups,
                      layout=layout, dtype=dtype, bias=bias, residual=residual,
                      activation=activation)]


def emit(as_json: bool, payload: Any, human: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(payload, indent=2))
    else:
        for line in human:
            click.echo(line)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="convgen")
def main() -> None:
    """convgen: optimized convolution kernels, true convolution (conv) or
    cross-correlation (corr), compiled through Apache TVM for CPUs and NVIDIA GPUs,
    verified against onnxruntime."""


@main.command()
@spec_options
@target_option
@click.option("--out", "out_dir", default="build", show_default=True,
              type=click.Path(file_okay=False), help="Artifact directory.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check the kernel against onnxruntime, the numpy oracle and the flip.")
@click.option("--emit-source", is_flag=True,
              help="Also write the scheduled TIR and the CUDA C or LLVM IR / assembly.")
@click.option("--defer-nvcc", is_flag=True,
              help="CUDA: write the .cu and stop; `convgen compile DIR` runs nvcc later, "
              "e.g. on the GPU machine (it needs only nvcc and tvm-ffi).")
@click.option("--seed", default=0, show_default=True, help="Seed of the verification inputs.")
@library_option
@algorithm_option
@json_option
@handle_errors
def build(target: str, out_dir: str, verify: bool, emit_source: bool, defer_nvcc: bool,
          seed: int, library: str | None, algorithm: str, as_json: bool,
          **spec_flags: Any) -> None:
    """Compile kernels into DIR/<name>.{so,onnx,json}."""
    from convgen.compiler.build import build_artifact
    from convgen.compiler.targets import resolve_target

    specs = collect_specs(**spec_flags)
    tinfo = resolve_target(target)
    results, lines, failed = [], [], False
    for spec in specs:
        art = build_artifact(spec, tinfo, out_dir, target_name=target, verify=verify,
                             emit_source=emit_source, defer_nvcc=defer_nvcc, seed=seed,
                             library=Path(library) if library else None, algorithm=algorithm)
        m = art.manifest
        failed |= not art.verified_ok
        results.append({"manifest": str(art.manifest_path), "name": m.name,
                        "files": {k: str(Path(out_dir) / f.name) for k, f in m.files.items()},
                        "schedule": m.schedule.to_dict(), "algorithm": m.algorithm,
                        "verification": m.verification.to_dict()})
        secs = sum(m.build_seconds.values())
        main_file = m.files["module" if m.module_compiled else "cuda_source"].name
        lines += [f"built {m.name}", f"  {spec.describe()}",
                  f"  target {tinfo.key()}, {m.algorithm}, schedule {m.schedule.describe()}, "
                  f"{secs:.1f} s",
                  f"  -> {Path(out_dir) / main_file} (+ .onnx, .json)",
                  *("  " + line for line in m.verification.lines())]
    emit(as_json, results, lines)
    if failed:
        sys.exit(1)


@main.command()
@click.argument("artifact", required=False, type=click.Path(exists=True))
@spec_options
@target_option
@click.option("--seed", default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--update/--no-update", default=True, show_default=True,
              help="Record the result in the artifact's manifest.")
@inputs_option
@library_option
@json_option
@handle_errors
def verify(artifact: str | None, target: str, seed: int, update: bool, sample: str | None,
           library: str | None, as_json: bool, **spec_flags: Any) -> None:
    """Verify built artifacts (ARTIFACT: a directory or manifest), or build the spec
    given by the flags into a temporary directory and verify it."""
    if artifact is None:
        if sample is not None:
            raise ArgumentError("inputs: sample inputs are for a deployed model (ARTIFACT)")
        from convgen.compiler.build import build_artifact
        from convgen.compiler.targets import resolve_target

        specs = collect_specs(**spec_flags)
        tinfo = resolve_target(target)
        lib = Path(library) if library else None
        with tempfile.TemporaryDirectory(prefix="convgen-verify-") as tmp:
            reports = [
                (spec.name(), build_artifact(spec, tinfo, tmp, target_name=target, seed=seed,
                                             library=lib).manifest.verification)
                for spec in specs
            ]
    else:
        from convgen.runtime.verify import verify_artifact

        reports = verify_artifact(artifact, seed=seed, update=update, sample=sample)
    lines = []
    for name, rep in reports:
        lines += [name, *("  " + line for line in rep.lines())]
    emit(as_json, [{"name": n, "verification": r.to_dict()} for n, r in reports], lines)
    if any(r.status == "failed" for _, r in reports):
        sys.exit(1)


@main.command()
@spec_options
@target_option
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="Candidates measured per kernel (default: the whole template grid); for "
              "CUDA candidates, at most this many per template.")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Wall-clock budget for the run.")
@click.option("--method", type=click.Choice(["grid", "meta", "both"]), default="grid",
              show_default=True,
              help="grid: every knob setting of convgen's templates; meta: TVM MetaSchedule's "
              "own space (--trials per kernel, default 64); both: the faster wins.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Parallel candidate compiles (0: every core). Timing is always serial.")
@library_option
@click.option("--work-dir", type=click.Path(file_okay=False), default=None,
              help="Where measurement logs live, for resuming (default ~/.cache/convgen/tune).")
@click.option("--emit-candidates", type=click.Path(file_okay=False), default=None,
              help="CUDA: write every candidate into this folder for `convgen measure` on the "
              "GPU machine (which needs only nvcc, tvm-ffi and numpy).")
@click.option("--ingest", type=click.Path(exists=True, file_okay=False), default=None,
              help="CUDA: turn a measured candidates folder (results.json) into records.")
@click.option("--model", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Tune the layers `convgen deploy` builds for this ONNX model (its "
              "convolutions and Gemms, channels-last, as deployed), which a later deploy "
              "then uses.")
@algorithm_option
@json_option
@handle_errors
def tune(target: str, trials: int | None, minutes: float | None, method: str, workers: int,
         library: str | None, work_dir: str | None, emit_candidates: str | None,
         ingest: str | None, model: str | None, algorithm: str, as_json: bool,
         **spec_flags: Any) -> None:
    """Search schedules for kernels and keep the fastest in the record library, which
    `convgen build` then uses. CPU: measured here; Ctrl-C keeps every finished record and
    rerunning the same command resumes. CUDA: --emit-candidates DIR here, `convgen measure
    DIR` on the GPU machine, --ingest DIR here (or all three at once where the GPU is local)."""
    from convgen.compiler.targets import resolve_target
    from convgen.tuning.grid import TuneOptions, tune_specs

    tinfo = resolve_target(target)
    lib = Path(library) if library else None
    if ingest:  # (the specs are in the folder)
        from convgen.tuning.cuda_offline import ingest_cuda_results

        written = ingest_cuda_results(Path(ingest), lib)
        emit(as_json, [str(p) for p in written], [f"record {p}" for p in written])
        return
    if model:
        from convgen.compiler.deploy import DeployOptions, model_specs, read_model
        from convgen.spec import parse_input_shapes

        shapes = parse_input_shapes(spec_flags["input_shapes"])
        specs = list(dict.fromkeys(s for _, s in model_specs(read_model(model, shapes), tinfo,
                                                             DeployOptions())))
    else:
        specs = collect_specs(**spec_flags)
    if tinfo.is_cuda:
        _tune_cuda(tinfo, trials, lib, emit_candidates, as_json, specs)
        return
    options = TuneOptions(trials=trials, minutes=minutes, workers=workers, method=method,
                          algorithm=algorithm, library=Path(library) if library else None,
                          work_dir=Path(work_dir) if work_dir else None)
    from convgen.compiler.records import record_spec

    # tuning runs each record's spec once (`record_spec`: corr on CPU, no epilogue)
    keys = list(dict.fromkeys(record_spec(s, tinfo) for s in specs))
    position = {k.name(): i + 1 for i, k in enumerate(keys)}
    live = sys.stderr.isatty() and not as_json

    def progress(spec: Any, done: int, total: int, gflops: float) -> None:
        at = position[record_spec(spec, tinfo).name()]  # (timed with a residual, maybe)
        line = (f"[{at}/{len(keys)}] {spec.name()}: {done}/{total} "
                f"candidates, best {gflops:.1f} GFLOP/s")
        if live:
            click.echo("\r" + line + " " * 8, nl=done == total, err=True)
        elif done == total:
            click.echo(line, err=True)

    results = tune_specs(specs, tinfo, options, progress)
    rows, lines = [], []
    for r in results:
        rows.append({"name": r.spec.name(), "gflops": round(r.gflops, 2), "measured": r.measured,
                     "partial": r.partial,
                     "record": str(r.record_path) if r.record_path else None,
                     "seconds": round(r.seconds, 1),
                     "schedule": r.best.candidate.__dict__ if r.best else None})
        where = f"-> {r.record_path}" if r.record_path else "(no working candidate)"
        part = f" (partial: {r.measured} candidates measured)" if r.partial else ""
        lines.append(f"{r.spec.name()}: {r.gflops:.1f} GFLOP/s in {r.seconds:.0f} s "
                     f"{where}{part}")
    if results and results[-1].interrupted:
        lines.append("stopped early (budget or Ctrl-C); rerun the same command to resume")
    emit(as_json, rows, lines)


def _tune_cuda(tinfo: Any, trials: int | None, library: Path | None,
               emit_candidates: str | None, as_json: bool, specs: list[Any]) -> None:
    from convgen.runtime import cuda_driver
    from convgen.tuning.cuda_offline import emit_cuda_candidates, ingest_cuda_results

    if emit_candidates:
        from convgen.compiler.records import record_spec

        n = emit_cuda_candidates(specs, tinfo, Path(emit_candidates), trials)
        records = len(dict.fromkeys(record_spec(s, tinfo) for s in specs))
        emit(as_json, {"candidates": n, "dir": emit_candidates},
             [f"{n} candidates for {records} records ({len(specs)} kernels) in "
              f"{emit_candidates}",
              f"next, on the GPU machine: convgen measure {emit_candidates}",
              f"then here: convgen tune --target cuda:{tinfo.arch} "
              f"--ingest {emit_candidates}"])
        return
    if not cuda_driver.gpu_present():
        raise ToolchainError("target: no GPU here: use --emit-candidates DIR, run `convgen "
                             "measure DIR` on the GPU machine, then --ingest DIR")
    from convgen.tuning.measure import measure_candidates

    with tempfile.TemporaryDirectory(prefix="convgen-tune-") as tmp:
        emit_cuda_candidates(specs, tinfo, Path(tmp), trials)
        measure_candidates(tmp, log=lambda line: click.echo(line, err=True))
        written = ingest_cuda_results(Path(tmp), library)
    emit(as_json, [str(p) for p in written], [f"record {p}" for p in written])


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("-j", "--jobs", type=click.IntRange(min=0), default=0,
              help="Parallel nvcc runs (default: every core).")
@handle_errors
def measure(directory: str, repeats: int, jobs: int) -> None:
    """On the GPU machine: compile, check and time the CUDA candidates in DIRECTORY
    (from `convgen tune --target cuda --emit-candidates`); writes DIRECTORY/results.json."""
    from convgen.tuning.measure import measure_candidates

    measure_candidates(directory, repeats=repeats, jobs=jobs, log=click.echo)
    click.echo(f"results: {Path(directory) / 'results.json'}")


@main.command("compile")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("-j", "--jobs", type=click.IntRange(min=0), default=0,
              help="Parallel nvcc runs (default: every core).")
@json_option
@handle_errors
def compile_cmd(artifact: str, jobs: int, as_json: bool) -> None:
    """Run nvcc on the CUDA artifacts in ARTIFACT built with --defer-nvcc (needs nvcc and
    tvm-ffi, not the TVM compiler)."""
    from convgen.runtime.nvcc import compile_artifacts

    done = compile_artifacts(artifact, jobs)
    emit(as_json, [{"name": n, "seconds": round(t, 2)} for n, t in done],
         [f"compiled {n} ({t:.1f} s)" for n, t in done] or ["nothing to compile"])


@main.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@target_option
@click.option("--out", "out_dir", default="build", show_default=True,
              type=click.Path(file_okay=False), help="Artifact directory.")
@click.option("--mode", type=click.Choice(["corr", "conv"]), default="corr", show_default=True,
              help="corr: every Conv as ONNX means it (cross-correlation). conv: every Conv a "
              "true convolution of the model's weights, and every ConvTranspose its "
              "adjoint, for weights trained where convolution flips the kernel (DSP "
              "code, scipy, MATLAB).")
@click.option("--layout", type=click.Choice(["channels-last", "channels-first"]),
              default="channels-last", show_default=True,
              help="The activations' layout between layers; converted once, at the model's "
              "edges. channels-last is the fast one on CPUs (channels-first runs strided "
              "depthwise layers on the generic fallback).")
@click.option("--separable/--no-separable", default=True, show_default=True,
              help="Run each depthwise layer and the 1x1 layer that alone reads it as one "
              "kernel, the depthwise rows computed as the 1x1 layer reads them "
              "(channels-last CPU models).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check the model against onnxruntime on the original model.")
@click.option("--seed", default=0, show_default=True, help="Seed of the verification inputs.")
@inputs_option
@shape_option()
@library_option
@algorithm_option
@json_option
@handle_errors
def deploy(model: str, target: str, out_dir: str, mode: str, layout: str, separable: bool,
           verify: bool, seed: int, sample: str | None, input_shapes: tuple[str, ...],
           library: str | None, algorithm: str, as_json: bool) -> None:
    """Compile a whole ONNX MODEL into DIR/<model>.{so,onnx,json}: every Conv (and Gemm)
    a convgen kernel, with its bias, BatchNorm, residual Add and ReLU/ReLU6/SiLU/HardSwish
    fused (a depthwise layer and the 1x1 after it: one kernel), weights packed at build
    time, tuned records used; the other operators scheduled; one module that
    `convgen.load(DIR)` runs without the TVM compiler (a CUDA model: with TVM's CUDA
    runtime library and a GPU; built and compiled with nvcc here, verified where a GPU
    is present)."""
    from convgen.compiler.deploy import DeployOptions, deploy_artifact, layer_summary
    from convgen.compiler.targets import resolve_target
    from convgen.spec import parse_input_shapes

    options = DeployOptions(mode=mode, layout=layout, algorithm=algorithm,
                            library=Path(library) if library else None, separable=separable)
    path, m = deploy_artifact(model, resolve_target(target), out_dir, options,
                              target_name=target, shapes=parse_input_shapes(input_shapes),
                              verify=verify, seed=seed, sample=sample)
    secs = sum(m.build_seconds.values())
    lines = [f"deployed {m.name}: {len(m.layers)} layers on convgen kernels ({mode}, {layout}), "
             f"{len(m.other_ops)} other operator functions, {secs:.1f} s",
             *("  " + line for line in layer_summary(m.layers)),
             f"  -> {Path(out_dir) / m.files['module'].name} (+ .onnx, .json)",
             *("  " + line for line in m.verification.lines())]
    emit(as_json, {"manifest": str(path), **m.to_dict()}, lines)
    if m.verification.status == "failed":
        sys.exit(1)


@main.command()
@spec_options
@target_option
@click.option("--what", type=click.Choice(["all", "tir", "source"]), default="all",
              show_default=True, help="The scheduled TIR, the generated source, or both.")
@library_option
@algorithm_option
@handle_errors
def inspect(target: str, what: str, library: str | None, algorithm: str,
            **spec_flags: Any) -> None:
    """Print the scheduled TIR and the generated CUDA C or LLVM IR of a spec, with the
    algorithm chosen (and why Winograd does not apply, where it does not)."""
    from convgen.compiler.build import compile_kernel
    from convgen.compiler.schedule import declined
    from convgen.compiler.targets import resolve_target

    tinfo = resolve_target(target)
    for spec in collect_specs(**spec_flags):
        compiled = compile_kernel(spec, tinfo, library=Path(library) if library else None,
                                  algorithm=algorithm)
        click.echo(f"// {spec.name()}: {spec.describe()}")
        click.echo(f"// algorithm: {compiled.algorithm}")
        if compiled.algorithm == "direct":
            why = declined(spec, tinfo, "winograd")
            click.echo(f"// winograd: {why or 'applies, not chosen (heuristic or record)'}")
        click.echo(f"// schedule: {compiled.schedule.describe()}")
        if what in ("all", "tir"):
            click.echo(compiled.tir)
        if what in ("all", "source"):
            if tinfo.is_cuda:
                click.echo(compiled.cuda_source)
            else:
                click.echo(compiled.lib.mod.inspect_source("ll"))


@main.command()
@click.argument("artifact", required=False, type=click.Path(exists=True))
@spec_options
@target_option
@click.option("--repeats", type=click.IntRange(min=1), default=30, show_default=True,
              help="Timed samples (median kept).")
@click.option("--no-peers", is_flag=True, help="Time convgen alone.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False),
              help="Also draw the bars into this PNG (needs matplotlib).")
@inputs_option
@library_option
@algorithm_option
@json_option
@handle_errors
def bench(artifact: str | None, target: str, repeats: int, no_peers: bool,
          plot_file: str | None, sample: str | None, library: str | None, algorithm: str,
          as_json: bool, **spec_flags: Any) -> None:
    """Time kernels against onnxruntime (and PyTorch when installed), in one process:
    medians, GFLOP/s and speed-ups. ARTIFACT: a directory or manifest (a deployed model:
    end to end against onnxruntime on the original model); or the spec flags."""
    from convgen.runtime.bench import bench_kernels, format_table
    from convgen.runtime.kernel import Kernel
    from convgen.runtime.manifest import find_model_manifest, list_manifests

    peers = () if no_peers else ("onnxruntime", "torch")
    if artifact is not None and find_model_manifest(artifact) is not None:
        from convgen.runtime.bench import bench_model, format_model_table
        from convgen.runtime.model import load_model

        result = bench_model(load_model(artifact), repeats=repeats, sample=sample,
                             peers=not no_peers)
        emit(as_json, [result.to_dict()],
             [*format_model_table([result]), *result.notes,
              f"threads: {result.threads}; medians of {repeats} samples"])
        return
    if sample is not None:
        raise ArgumentError("inputs: sample inputs are for a deployed model (ARTIFACT)")
    with tempfile.TemporaryDirectory(prefix="convgen-bench-") as tmp:
        if artifact is None:
            from convgen.compiler.build import build_artifact
            from convgen.compiler.targets import resolve_target

            tinfo = resolve_target(target)
            lib = Path(library) if library else None
            paths = [build_artifact(s, tinfo, tmp, target_name=target, verify=False,
                                    library=lib, algorithm=algorithm).manifest_path
                     for s in collect_specs(**spec_flags)]
        else:
            paths = list_manifests(artifact)
        results = bench_kernels([Kernel(p) for p in paths], repeats=repeats, peers=peers)
    lines = format_table(results)
    lines.append(f"threads: {results[0].threads}; medians of {repeats} samples")
    if plot_file:
        from convgen.runtime.bench import plot

        plot(results, plot_file)
        lines.append(f"plot: {plot_file}")
    emit(as_json, [r.to_dict() for r in results], lines)


if __name__ == "__main__":
    main()
