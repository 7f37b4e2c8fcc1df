"""Compile a spec for a target and write the artifact directory (the only writer).

Artifact contract (docs/architecture.md): DIR/<name>.so (the module: the entry
function, destination passing, and on CPU the packing and run-packed entries for
constant weights), DIR/<name>.onnx (the same operator in ONNX),
DIR/<name>.json (the manifest, `convgen.runtime.manifest`), optional sources.
Files are written into a temporary directory beside DIR's contents and renamed
into place, the manifest last, so a crash never leaves a half artifact that
looks whole.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convgen import __version__
from convgen.compiler.compute import (
    WeightPacking,
    algorithm_of,
    argument_alignment,
    pack_prim_func,
)
from convgen.compiler.schedule import forced_schedule, packed_schedule, schedule_for
from convgen.compiler.targets import TargetInfo
from convgen.errors import ConvgenError, UnsupportedError, tvm_reason
from convgen.runtime.kernel import Kernel
from convgen.runtime.manifest import (
    ENTRY,
    PACK_ENTRY,
    PACKED_WEIGHT,
    RUN_PACKED_ENTRY,
    SUFFIX,
    WORKSPACE,
    ArtifactFile,
    Manifest,
    ModelManifest,
    PackedWeights,
    ScheduleChoice,
    TargetRecord,
    TensorInfo,
    VerifyReport,
    not_run,
)
from convgen.runtime.nvcc import nvcc
from convgen.spec import ConvSpec


@dataclass
class Compiled:
    """A compiled kernel, not yet written anywhere."""

    spec: ConvSpec
    target: TargetInfo
    schedule: ScheduleChoice
    packing: WeightPacking | None  # the run-packed entry's weight layout (None: no entry)
    lib: Any  # tvm Executable (CPU) or the CUDA-host source module
    tir: str  # the scheduled TIR, as TVMScript
    workspace: TensorInfo | None  # the entries' scratch argument after `out`, if any
    cuda_source: str | None = None  # host + device CUDA C++ (CUDA targets)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def algorithm(self) -> str:
        return algorithm_of(self.packing)


def lower(
    spec: ConvSpec, target: TargetInfo, template: str | None = None,
    knobs: dict[str, Any] | None = None, library: Path | None = None,
    algorithm: str = "auto",
) -> tuple[Any, ScheduleChoice, WeightPacking | None]:
    """The scheduled IRModule: the chooser's pick (records from `library`), or a named
    template (or the fallback, by its name) with explicit knobs, as tuning needs; with
    the packing and run-packed entries where the family has them."""
    import tvm

    if template is None:
        sch, choice = schedule_for(spec, target, library, algorithm=algorithm)
    else:
        sch, choice = forced_schedule(spec, target, template, knobs or {})
    packed = packed_schedule(spec, target, choice)
    if packed is None:
        return sch.mod, choice, None
    run, packing = packed
    mod = tvm.IRModule({
        ENTRY: sch.mod[ENTRY],
        RUN_PACKED_ENTRY: run.mod[ENTRY],  # schedules work on the name ENTRY
        PACK_ENTRY: pack_prim_func(spec, target, packing),
    })
    return mod, choice, packing


def compile_kernel(
    spec: ConvSpec, target: TargetInfo, template: str | None = None,
    knobs: dict[str, Any] | None = None, library: Path | None = None,
    algorithm: str = "auto",
) -> Compiled:
    import tvm

    t0 = time.perf_counter()
    mod, choice, packing = lower(spec, target, template, knobs, library, algorithm)
    tvm_target = target.tvm_target()
    t1 = time.perf_counter()
    try:
        lib = tvm.compile(mod, target=tvm_target)
    except Exception as err:  # TVM's errors carry the C++ trace; keep the message
        raise UnsupportedError(
            f"TVM could not compile {spec.name()} for {target.key()} with {choice.describe()}: "
            f"{tvm_reason(err)}"
        ) from err
    t2 = time.perf_counter()
    compiled = Compiled(spec, target, choice, packing, lib, mod.script(), workspace_of(mod, spec),
                        seconds={"schedule": t1 - t0, "tvm_compile": t2 - t1})
    if target.is_cuda:
        compiled.cuda_source = _cuda_source(lib, spec)
    return compiled


def workspace_of(mod: Any, spec: ConvSpec) -> TensorInfo | None:
    """The scratch argument the entries take after `out` (`compute.workspace_as_argument`):
    the same in the plain and the run-packed entry, which share their knobs."""
    found = set()
    after_out = len(spec.input_shapes()) + 1
    for gv in mod.get_global_vars():
        if gv.name_hint != PACK_ENTRY:
            found.add(tuple((tuple(int(x) for x in p.shape), str(p.dtype))
                            for p in mod[gv].params[after_out:]))
    if len(found) != 1:
        raise UnsupportedError(f"the entries disagree on their workspace: {sorted(found)}")
    [extra] = found
    if not extra:
        return None
    [(shape, dtype)] = extra
    return TensorInfo(WORKSPACE, shape, dtype)


def _cuda_source(lib: Any, spec: ConvSpec) -> str:
    """One CUDA C++ translation unit (device kernels + host wrappers)."""
    from tvm.backend.cuda import export_cuda_host

    # An unscheduled PrimFunc compiled for CUDA silently becomes host code with
    # no GPU kernel: refuse it rather than ship a kernel that does not run on the GPU.
    device_imports = [m for m in lib.mod.imports if m.kind == "cuda"]
    if not device_imports:
        raise UnsupportedError(
            f"{spec.name()}: the CUDA build produced no GPU kernel (the schedule binds no "
            "threads); refusing to emit host-only code"
        )
    return str(export_cuda_host(lib.mod))


def write_module(compiled: Compiled, directory: Path, defer_nvcc: bool = False) -> dict[str, str]:
    """Write the module (and its sources, when CUDA) into `directory`; returns file names
    by role. With `defer_nvcc` a CUDA module is left as source for `convgen compile`."""
    name = compiled.spec.name()
    files = {"module": f"{name}.so"}
    if compiled.target.is_cuda:
        assert compiled.cuda_source is not None
        src = directory / f"{name}.cu"
        src.write_text(compiled.cuda_source)
        files["cuda_source"] = src.name
        if not defer_nvcc:
            t0 = time.perf_counter()
            nvcc(src, directory / files["module"], compiled.target.arch)
            compiled.seconds["nvcc"] = time.perf_counter() - t0
    else:
        compiled.lib.export_library(str(directory / files["module"]))
    return files


def emit_sources(compiled: Compiled, directory: Path, files: dict[str, str]) -> None:
    """--emit-source: the scheduled TIR, and the LLVM IR and assembly for CPU targets
    (CUDA targets already keep their .cu)."""
    name = compiled.spec.name()
    (directory / f"{name}.tir.py").write_text(compiled.tir)
    files["tir"] = f"{name}.tir.py"
    if not compiled.target.is_cuda:
        mod = compiled.lib.mod
        (directory / f"{name}.ll").write_text(mod.inspect_source("ll"))
        (directory / f"{name}.s").write_text(mod.inspect_source("asm"))
        files["llvm_ir"], files["asm"] = f"{name}.ll", f"{name}.s"


def manifest_for(compiled: Compiled, target_name: str, directory: Path, files: dict[str, str],
                 compiled_module: bool) -> Manifest:
    """The manifest of the files written into `directory` (sizes and hashes taken from
    them), not yet verified."""
    import tvm
    import tvm_ffi

    spec, target = compiled.spec, compiled.target
    entries = {
        role: ArtifactFile.of(directory / fname) if (directory / fname).exists()
        else ArtifactFile(fname)  # a deferred CUDA module: hashed by `convgen compile`
        for role, fname in files.items()
    }
    return Manifest(
        name=spec.name(),
        spec=spec,
        target=TargetRecord(target_name, target.kind, target.key(), target.config_dict),
        files=entries,
        schedule=compiled.schedule,
        verification=not_run("not verified yet"),
        versions={"convgen": __version__, "tvm": tvm.__version__,
                  "tvm_ffi": tvm_ffi.__version__},
        build_seconds=dict(compiled.seconds),
        module_compiled=compiled_module,
        arg_alignment=argument_alignment(spec, target),
        algorithm=compiled.algorithm,
        packed_weights=None if compiled.packing is None else PackedWeights(
            TensorInfo(PACKED_WEIGHT, compiled.packing.packed_shape(spec), spec.dtype),
            compiled.packing.lanes),
        workspace=compiled.workspace,
    )


@dataclass
class Artifact:
    manifest_path: Path
    manifest: Manifest

    @property
    def verified_ok(self) -> bool:
        return self.manifest.verification.status != "failed"


def build_artifact(
    spec: ConvSpec,
    target: TargetInfo,
    out_dir: str | os.PathLike[str],
    *,
    target_name: str = "",
    verify: bool = True,
    emit_source: bool = False,
    defer_nvcc: bool = False,
    seed: int = 0,
    template: str | None = None,
    knobs: dict[str, Any] | None = None,
    library: Path | None = None,
    algorithm: str = "auto",
) -> Artifact:
    """Compile, export, (verify) and write DIR/<name>.{so,onnx,json}, atomically.
    `library`: the record library to take a tuned schedule from (default: the shipped
    one, or $CONVGEN_SCHEDULES); `algorithm`: "auto", "direct" or "winograd"."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConvgenError(f"out: cannot create {out}: {err.strerror}") from None
    compiled = compile_kernel(spec, target, template, knobs, library, algorithm)
    defer_nvcc = defer_nvcc and target.is_cuda
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name()}.", dir=out))
    try:
        manifest = _write_files(compiled, tmp, target_name or target.key(), emit_source,
                                defer_nvcc)
        manifest = dataclasses.replace(manifest, verification=_verification(
            tmp, manifest, verify, defer_nvcc, seed))
        manifest.write(tmp / f"{manifest.name}{SUFFIX}")
        move_into_place(tmp, out, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Artifact(out / f"{manifest.name}{SUFFIX}", manifest)


def _write_files(compiled: Compiled, tmp: Path, target_name: str, emit_source: bool,
                 defer_nvcc: bool) -> Manifest:
    """The module, the ONNX model and (--emit-source) the sources, into `tmp`."""
    from convgen.onnx_export import export_onnx

    name = compiled.spec.name()
    files = write_module(compiled, tmp, defer_nvcc)
    files["onnx"] = f"{name}.onnx"
    (tmp / files["onnx"]).write_bytes(export_onnx(compiled.spec).SerializeToString())
    if emit_source:
        emit_sources(compiled, tmp, files)
    elif "cuda_source" in files and not defer_nvcc:
        (tmp / files.pop("cuda_source")).unlink()
    return manifest_for(compiled, target_name, tmp, files, compiled_module=not defer_nvcc)


def _verification(tmp: Path, manifest: Manifest, verify: bool, defer_nvcc: bool,
                  seed: int) -> VerifyReport:
    from convgen.runtime.verify import verify_kernel

    if defer_nvcc:
        return not_run("module not compiled yet (--defer-nvcc): run `convgen compile DIR`")
    if not verify:
        return not_run("skipped (--no-verify)")
    return verify_kernel(Kernel(tmp / f"{manifest.name}{SUFFIX}", manifest), seed=seed)


def move_into_place(tmp: Path, out: Path, manifest: Manifest | ModelManifest) -> None:
    """Rename the files into `out`, the manifest last: it is what marks an artifact whole
    (a kernel's, or a deployed model's)."""
    final = out / f"{manifest.name}{SUFFIX}"
    final.unlink(missing_ok=True)
    for f in manifest.files.values():
        if (tmp / f.name).exists():
            os.replace(tmp / f.name, out / f.name)
        else:  # a deferred module: no stale one from an earlier build may stay
            (out / f.name).unlink(missing_ok=True)
    os.replace(tmp / final.name, final)
