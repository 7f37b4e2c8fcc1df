"""The artifact's manifest (DIR/<name>.json): what was built, how, and whether it was verified.

One typed `Manifest`, read, validated and written (atomically) here and nowhere
else. It names every file of the artifact with its size and SHA-256, which
loading checks before a module is opened: a truncated `.so` (a failed copy)
would otherwise crash the process with a bus error. Manifests of format 1 (no
sizes or hashes) are still read; their files are not checked.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convgen.errors import ArtifactError
from convgen.spec import ConvSpec

FORMAT = "convgen-artifact"
# 1: files by name only; 2: with size and SHA-256; 3: entries may take a workspace
FORMAT_VERSION = 3
SUFFIX = ".json"
ENTRY = "convgen_main"
PACK_ENTRY = "convgen_pack"  # (weight, packed): the weights in the run entry's layout
RUN_PACKED_ENTRY = "convgen_run_packed"  # (data, packed[, bias][, residual], out)
PACKED_WEIGHT = "packed_weight"  # the run-packed entry's weight argument
WORKSPACE = "workspace"  # the entries' last argument where the kernel needs scratch memory
CALLING_CONVENTION = (
    "destination passing: entry(data, weight[, bias][, residual], out[, workspace])")
PACKED_CALLING_CONVENTION = (
    "pack_entry(weight, packed) once per set of weights, then "
    "run_entry(data, packed[, bias][, residual], out[, workspace])")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorInfo:
        return cls(str(d["name"]), tuple(int(x) for x in d["shape"]), str(d["dtype"]))


@dataclass(frozen=True)
class PackedWeights:
    """The module's entries for constant weights: `pack_entry(weight, packed)` writes
    the weights once in the layout the schedule reads (output channels blocked by
    `lanes` innermost where lanes > 1, `conv`'s flip applied), and
    `run_entry(data, packed[, bias][, residual], out)` runs on them."""

    packed: TensorInfo
    lanes: int
    pack_entry: str = PACK_ENTRY
    run_entry: str = RUN_PACKED_ENTRY

    def to_dict(self) -> dict[str, Any]:
        return {"pack_entry": self.pack_entry, "run_entry": self.run_entry,
                "calling_convention": PACKED_CALLING_CONVENTION,
                "packed": self.packed.to_dict(), "lanes": self.lanes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PackedWeights:
        return cls(TensorInfo.from_dict(d["packed"]), int(d["lanes"]), str(d["pack_entry"]),
                   str(d["run_entry"]))


@dataclass(frozen=True)
class ArtifactFile:
    """One file of an artifact; size and hash are None where not known (format 1, or a
    CUDA module not compiled yet)."""

    name: str
    size: int | None = None
    sha256: str | None = None

    @classmethod
    def of(cls, path: Path) -> ArtifactFile:
        return cls(path.name, path.stat().st_size, _sha256(path))

    def check(self, directory: Path) -> None:
        """Raise ArtifactError, naming the file, unless it is there and intact."""
        path = directory / self.name
        if not path.is_file():
            raise ArtifactError(f"artifact: {path} is missing")
        if self.size is None:
            return
        size = path.stat().st_size
        if size != self.size:
            raise ArtifactError(
                f"artifact: {path} is damaged: {size} bytes where the manifest says "
                f"{self.size} (a failed copy?); copy or build it again"
            )
        if self.sha256 is not None and _sha256(path) != self.sha256:
            raise ArtifactError(
                f"artifact: {path} is damaged: its SHA-256 differs from the manifest's; "
                "copy or build it again"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: str | dict[str, Any]) -> ArtifactFile:
        if isinstance(d, str):  # format 1
            return cls(d)
        return cls(str(d["name"]), d.get("size"), d.get("sha256"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ScheduleChoice:
    """How a kernel was scheduled. kind: "record" (a tuned record), "heuristic" (a
    template with the knobs its heuristic picked), "forced" (a template and knobs
    given explicitly, as tuning does), or "fallback" (the family's generic schedule).
    name: the template (the fallback's own name, or "meta_schedule" for a replayed
    MetaSchedule trace)."""

    kind: str
    name: str
    knobs: dict[str, Any] = field(default_factory=dict)
    record: str | None = None  # the record file, when kind == "record"

    def describe(self) -> str:
        knobs = ", ".join(f"{k}={v}" for k, v in self.knobs.items())
        text = f"{self.kind} {self.name}" + (f" ({knobs})" if knobs else "")
        return text + (f" from {Path(self.record).name}" if self.record else "")

    def brief(self) -> str:
        """For a table cell: `cpu_kvec lanes=8,nkv=4,pw=4 (record)`."""
        knobs = ",".join(f"{k}={v}" for k, v in self.knobs.items())
        return " ".join(x for x in (self.name, knobs, f"({self.kind})") if x)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "name": self.name, "knobs": self.knobs}
        if self.record:
            d["record"] = self.record
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScheduleChoice:
        kind = {"template": "heuristic"}.get(d["kind"], d["kind"])  # format 1's word
        return cls(kind, str(d["name"]), dict(d.get("knobs", {})), d.get("record"))


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    max_abs_error: float
    max_rel_error: float  # relative to max(1, max|want|)
    detail: str = ""

    def line(self) -> str:
        mark = "ok  " if self.passed else "FAIL"
        return f"{mark} {self.name}: max abs error {self.max_abs_error:.3g} {self.detail}".rstrip()


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of `convgen.runtime.verify` (or why it did not run), as recorded."""

    status: str  # "passed", "failed" or "not run"
    reason: str = ""
    seed: int | None = None
    dtype: str = ""
    tolerance: dict[str, float] = field(default_factory=dict)
    checks: tuple[Check, ...] = ()
    host: str = ""  # where it ran, when verified after the build (convgen verify DIR)
    device: str = ""
    against: str = "onnxruntime, numpy oracle, flip property, bound kernel"
    inputs: str = ""  # a model's sample inputs (--inputs): "FILE (names)"; else all random

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def lines(self) -> list[str]:
        """One line when it passed (the worst error against a reference), else every check."""
        head = f"verification {self.status}" + (f": {self.reason}" if self.reason else "")
        if self.passed:
            # the flip "differs" check's error is the distance to the wrong answer
            worst = max((c.max_abs_error for c in self.checks if "differs" not in c.name),
                        default=0.0)
            given = f"inputs {self.inputs}, " if self.inputs else ""
            return [f"{head} ({self.against}; max abs error {worst:.2g}, {given}"
                    f"seed {self.seed})"]
        return [head, *(f"  {c.line()}" for c in self.checks)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VerifyReport:
        checks = tuple(Check(**c) for c in d.get("checks", ()))
        return cls(**{**d, "checks": checks})


def not_run(reason: str) -> VerifyReport:
    return VerifyReport(status="not run", reason=reason)


# SIMD register width in bits of each vector ISA a CPU target key names (its last
# part: `llvm-znver3-avx2`); others (SVE counted at its minimum, NEON, SSE2) 128.
VECTOR_BITS = {"avx512": 512, "avx2": 256, "avx": 256}


@dataclass(frozen=True)
class TargetRecord:
    """The target an artifact was built for: the user's name for it, its kind
    ("llvm" or "cuda"), its record-library key and the TVM target dict."""

    name: str
    kind: str
    key: str
    config: dict[str, Any]

    @property
    def device(self) -> str:
        return "cuda" if self.kind == "cuda" else "cpu"

    @property
    def cuda_arch(self) -> str:
        return str(self.config["arch"])

    @property
    def vector_bits(self) -> int:
        """The SIMD width the CPU code was generated for (not this machine's)."""
        return VECTOR_BITS.get(self.key.rsplit("-", 1)[-1], 128)


@dataclass(frozen=True)
class Manifest:
    name: str
    spec: ConvSpec
    target: TargetRecord
    files: dict[str, ArtifactFile]  # "module", "onnx", "cuda_source", "tir", ...
    schedule: ScheduleChoice
    verification: VerifyReport
    versions: dict[str, str]
    build_seconds: dict[str, float] = field(default_factory=dict)
    module_compiled: bool = True  # False: a CUDA build with --defer-nvcc
    # the byte alignment the entry requires of every argument's data (TVM checks it);
    # 64 for artifacts that predate element-aligned arguments
    arg_alignment: int = 64
    created: str = field(default_factory=lambda: datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec="seconds"))
    entry: str = ENTRY
    packed_weights: PackedWeights | None = None  # None: no packed entries (traces, old builds)
    # "direct" or "winograd_f<m>"; verification's tolerance depends on it
    algorithm: str = "direct"
    # scratch memory on the kernel's device that the caller passes after `out` to
    # the entry and the run-packed entry (CUDA split-K's partial sums); its contents
    # need not survive between calls, so one allocation serves every call
    workspace: TensorInfo | None = None

    @property
    def inputs(self) -> list[TensorInfo]:
        return [TensorInfo(n, s, self.spec.dtype) for n, s in self.spec.input_shapes().items()]

    @property
    def outputs(self) -> list[TensorInfo]:
        return [TensorInfo("out", self.spec.out_shape, self.spec.dtype)]

    @property
    def flops(self) -> int:
        return self.spec.flops

    def path_of(self, role: str, directory: Path) -> Path:
        return directory / self.files[role].name

    def check_files(self, directory: Path) -> None:
        """Every file the manifest names is there, with its recorded size and hash."""
        for role, f in self.files.items():
            if role == "module" and not self.module_compiled:
                continue
            f.check(directory)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "description": self.spec.describe(),
            "created": self.created,
            "versions": self.versions,
            "spec": self.spec.to_dict(),
            "target": dataclasses.asdict(self.target),
            "entry": self.entry,
            "calling_convention": CALLING_CONVENTION,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "packed_weights": self.packed_weights.to_dict() if self.packed_weights else None,
            "workspace": self.workspace.to_dict() if self.workspace else None,
            "files": {role: f.to_dict() for role, f in self.files.items()},
            "module_compiled": self.module_compiled,
            "arg_alignment": self.arg_alignment,
            "schedule": self.schedule.to_dict(),
            "algorithm": self.algorithm,
            "flops": self.flops,
            "build_seconds": {k: round(v, 3) for k, v in self.build_seconds.items()},
            "verification": self.verification.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> Manifest:
        _check_format(d, where, FORMAT, FORMAT_VERSION, "manifest")
        try:
            return cls(
                name=str(d["name"]),
                spec=ConvSpec.from_dict(d["spec"]),
                target=TargetRecord(**d["target"]),
                files={role: ArtifactFile.from_dict(f) for role, f in d["files"].items()},
                schedule=ScheduleChoice.from_dict(d["schedule"]),
                verification=VerifyReport.from_dict(d.get("verification") or
                                                    {"status": "not run"}),
                versions=dict(d.get("versions", {})),
                build_seconds=dict(d.get("build_seconds", {})),
                module_compiled=bool(d.get("module_compiled", True)),
                arg_alignment=int(d.get("arg_alignment", 64)),
                created=str(d.get("created", "")),
                entry=str(d.get("entry", ENTRY)),
                packed_weights=PackedWeights.from_dict(d["packed_weights"])
                if d.get("packed_weights") else None,
                algorithm=str(d.get("algorithm", "direct")),
                workspace=TensorInfo.from_dict(d["workspace"]) if d.get("workspace") else None,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"artifact: {where} is malformed ({err!r})") from None

    @classmethod
    def read(cls, path: Path) -> Manifest:
        return cls.from_dict(_read_json(path), str(path))

    def write(self, path: Path) -> None:
        _write_json(path, self.to_dict())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ArtifactError(f"artifact: cannot read manifest {path}: {err}") from None


def _check_format(d: Any, where: str, fmt: str, newest: int, what: str) -> None:
    """A manifest of this kind (`fmt`), of a format version this convgen reads (a
    kernel manifest without one is format 1)."""
    if not isinstance(d, dict) or d.get("format") != fmt:
        raise ArtifactError(f"artifact: {where} is not a convgen {what}")
    version = d.get("format_version", 1)
    if not isinstance(version, int) or version > newest:
        raise ArtifactError(
            f"artifact: {where} was written by a newer convgen ({what} format "
            f"{version}; this convgen reads 1 to {newest}): upgrade convgen"
        )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write (or replace) a manifest atomically: a temporary file, then renamed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def is_manifest(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def find_manifest(path: str | os.PathLike[str], name: str | None = None) -> Path:
    """A directory, a manifest, or a module file -> the manifest's path."""
    p = Path(path)
    if p.is_dir():
        if name:
            m = p / f"{name}{SUFFIX}"
            if not m.is_file():
                raise ArtifactError(f"artifact: no kernel named {name!r} in {p}")
            return m
        found = list_manifests(p)
        if len(found) > 1:
            names = ", ".join(q.stem for q in found)
            raise ArtifactError(f"artifact: {p} holds several kernels; name one of: {names}")
        return found[0]
    if p.suffix in (".so", ".onnx") and p.with_suffix(SUFFIX).is_file():
        return p.with_suffix(SUFFIX)
    if p.is_file() and is_manifest(p):
        return p
    raise ArtifactError(f"artifact: {p} is not a convgen artifact directory or manifest")


def list_manifests(path: str | os.PathLike[str]) -> list[Path]:
    """Every manifest of an artifact directory (or the one given)."""
    p = Path(path)
    if p.is_dir():
        found = sorted(q for q in p.glob(f"*{SUFFIX}") if is_manifest(q))
        if not found:
            raise ArtifactError(f"artifact: {p} holds no convgen artifact (no manifest)")
        return found
    return [find_manifest(p)]


# ---- whole models (`convgen deploy`) ---------------------------------------------------

MODEL_FORMAT = "convgen-model"
MODEL_FORMAT_VERSION = 1
MODEL_ENTRY = "main"  # the Relax VM function that runs the model


@dataclass(frozen=True)
class ModelLayer:
    """One layer of a deployed model that runs on a convgen kernel: a convolution, or
    a Gemm/MatMul by constant weights (as the 1 x 1 convolution it is); the ONNX node
    it came from, the operators folded into its write-back, and the kernel."""

    node: str  # the ONNX node's name (Conv, Gemm or MatMul)
    fused: tuple[str, ...]  # the ONNX nodes folded into its epilogue (Add, Relu, ...)
    kernel: str  # the module's function (layers with one spec share one)
    spec: ConvSpec  # in the layout the model runs it in, with its epilogue
    schedule: ScheduleChoice
    algorithm: str
    # the other node of a depthwise-separable pair that runs as one kernel (a depthwise
    # layer computed row by row inside the 1 x 1 layer that reads it), else ""
    pair: str = ""
    # the kernel writes its output over its residual input, which nothing reads later
    in_place: bool = False
    # the box of the node's outputs this kernel computes (per spatial axis: start,
    # stop), where the layer runs split into tap regions (`ConvSpec.tap_regions`: each
    # box only the taps that read its input there), else ()
    region: tuple[tuple[int, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = {"node": self.node, "fused": list(self.fused), "kernel": self.kernel,
             "layout": self.spec.layout, "spec": self.spec.to_dict(),
             "schedule": self.schedule.to_dict(), "algorithm": self.algorithm}
        if self.pair:
            d["pair"] = self.pair
        if self.in_place:
            d["in_place"] = True
        if self.region:
            d["region"] = [list(axis) for axis in self.region]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelLayer:
        return cls(str(d["node"]), tuple(d.get("fused", ())), str(d["kernel"]),
                   ConvSpec.from_dict(d["spec"]), ScheduleChoice.from_dict(d["schedule"]),
                   str(d.get("algorithm", "direct")), str(d.get("pair", "")),
                   bool(d.get("in_place", False)),
                   tuple((int(a), int(b)) for a, b in d.get("region", ())))


@dataclass(frozen=True)
class ModelManifest:
    """A deployed model (DIR/<model>.json): its inputs and outputs, how each convolution
    runs, what the other operators got, and whether it was verified."""

    name: str
    target: TargetRecord
    # "module" (.so), "onnx" (the model as given), "onnx_data" (its external data, if any)
    files: dict[str, ArtifactFile]
    mode: str  # "corr": ONNX's Conv; "conv": every Conv a true convolution
    layout: str  # the activations' layout between layers: "channels-first" / "channels-last"
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    layers: list[ModelLayer]
    other_ops: list[str]  # the model's other operator functions, generically scheduled
    versions: dict[str, str]
    verification: VerifyReport
    build_seconds: dict[str, float] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec="seconds"))
    entry: str = MODEL_ENTRY

    @property
    def flops(self) -> int:
        """The convgen layers' FLOPs (the rest of a CNN is a rounding error)."""
        return sum(layer.spec.flops for layer in self.layers)

    def path_of(self, role: str, directory: Path) -> Path:
        return directory / self.files[role].name

    def check_files(self, directory: Path) -> None:
        for f in self.files.values():
            f.check(directory)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "name": self.name,
            "created": self.created,
            "versions": self.versions,
            "target": dataclasses.asdict(self.target),
            "mode": self.mode,
            "layout": self.layout,
            "entry": self.entry,
            "calling_convention": "entry(*inputs) -> output or tuple of outputs "
                                  "(a Relax VM function)",
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "files": {role: f.to_dict() for role, f in self.files.items()},
            "flops": self.flops,
            "layers": [layer.to_dict() for layer in self.layers],
            "other_ops": self.other_ops,
            "build_seconds": {k: round(v, 3) for k, v in self.build_seconds.items()},
            "verification": self.verification.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> ModelManifest:
        _check_format(d, where, MODEL_FORMAT, MODEL_FORMAT_VERSION, "model manifest")
        try:
            return cls(
                name=str(d["name"]),
                target=TargetRecord(**d["target"]),
                files={role: ArtifactFile.from_dict(f) for role, f in d["files"].items()},
                mode=str(d["mode"]),
                layout=str(d["layout"]),
                inputs=[TensorInfo.from_dict(t) for t in d["inputs"]],
                outputs=[TensorInfo.from_dict(t) for t in d["outputs"]],
                layers=[ModelLayer.from_dict(x) for x in d["layers"]],
                other_ops=[str(x) for x in d.get("other_ops", [])],
                versions=dict(d.get("versions", {})),
                verification=VerifyReport.from_dict(d.get("verification") or
                                                    {"status": "not run"}),
                build_seconds=dict(d.get("build_seconds", {})),
                created=str(d.get("created", "")),
                entry=str(d.get("entry", MODEL_ENTRY)),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"artifact: {where} is malformed ({err!r})") from None

    @classmethod
    def read(cls, path: Path) -> ModelManifest:
        return cls.from_dict(_read_json(path), str(path))

    def write(self, path: Path) -> None:
        _write_json(path, self.to_dict())


def find_model_manifest(path: str | os.PathLike[str]) -> Path | None:
    """The model manifest of a `convgen deploy` directory (or the manifest given); None
    where `path` is not a deployed model."""
    p = Path(path)
    candidates = sorted(p.glob(f"*{SUFFIX}")) if p.is_dir() else [p]
    for q in candidates:
        try:
            if q.suffix == SUFFIX and json.loads(q.read_text()).get("format") == MODEL_FORMAT:
                return q
        except (OSError, ValueError, AttributeError):
            continue
    return None
