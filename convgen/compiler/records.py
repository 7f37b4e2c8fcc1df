"""The tuned-record library: `schedules/<target key>/<spec name>.json`.

One human-readable JSON file per (target, spec), written by `convgen tune`,
reviewed and committed, read by `convgen build`. A record names the schedule
that won (`RecordedSchedule`: a template and its knobs, or a MetaSchedule
trace), what it measured, and the TVM version it was tuned with. A record only
matches a build when the spec (every field), the target key and the TVM version
all match: a schedule tuned with another TVM may lower differently. On CPU one
record serves both modes (`record_spec`).

Files are written atomically (a temporary file, then renamed), so an
interrupted tune never leaves a torn record.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convgen.compiler.targets import TargetInfo
from convgen.errors import ConvgenError
from convgen.spec import ConvSpec

FORMAT = "convgen-record"
FORMAT_VERSION = 2  # 1: schedule as {"kind": "template" | "fallback" | "trace", ...}
META_SCHEDULE = "meta_schedule"  # the template name of a replayed MetaSchedule trace
# The library shipped with convgen, inside the package (installed with it).
DEFAULT_LIBRARY = Path(__file__).resolve().parents[1] / "schedules"


class RecordError(ConvgenError):
    """A record file exists but cannot be used (corrupt, wrong format)."""


def library_path(library: Path | None = None) -> Path:
    """`library` if given, else $CONVGEN_SCHEDULES, else the schedules/ folder beside
    the package."""
    if library is not None:
        return library
    return Path(os.environ.get("CONVGEN_SCHEDULES", DEFAULT_LIBRARY))


@dataclass(frozen=True)
class RecordedSchedule:
    """What a record builds: a template (or the family's fallback, by its name) with
    knobs, or, with template == "meta_schedule", a MetaSchedule trace."""

    template: str
    knobs: dict[str, Any] = field(default_factory=dict)
    trace: list[Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.trace is not None:
            return {"template": self.template, "trace": self.trace}
        return {"template": self.template, "knobs": self.knobs}

    @classmethod
    def from_dict(cls, d: dict[str, Any], target_key: str) -> RecordedSchedule:
        if "template" in d:
            return cls(str(d["template"]), dict(d.get("knobs", {})), d.get("trace"))
        kind = d["kind"]  # format 1
        if kind == "trace":
            return cls(META_SCHEDULE, trace=list(d["trace"]))
        if kind == "fallback":
            from convgen.compiler.schedule import family_for_key

            return cls(family_for_key(target_key).fallback_name)
        return cls(str(d["name"]), dict(d.get("knobs", {})))


@dataclass(frozen=True)
class Record:
    spec: ConvSpec
    target_key: str
    tvm_version: str
    schedule: RecordedSchedule
    measured: dict[str, Any]
    tuner: dict[str, Any]

    @property
    def relpath(self) -> str:
        """Where the record lives inside a library: `<target key>/<spec name>.json`."""
        return f"{self.target_key}/{self.spec.name()}.json"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.spec.name(),
            "spec": self.spec.to_dict(),
            "target_key": self.target_key,
            "tvm_version": self.tvm_version,
            "schedule": self.schedule.to_dict(),
            "measured": self.measured,
            "tuner": self.tuner,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> Record:
        if d.get("format") != FORMAT:
            raise RecordError(
                f"record: {where} is not a convgen record (format {d.get('format')!r})"
            )
        if d.get("format_version", 1) > FORMAT_VERSION:
            raise RecordError(f"record: {where} was written by a newer convgen: upgrade convgen")
        try:
            return cls(
                spec=ConvSpec.from_dict(d["spec"]),
                target_key=str(d["target_key"]),
                tvm_version=str(d["tvm_version"]),
                schedule=RecordedSchedule.from_dict(d["schedule"], str(d["target_key"])),
                measured=dict(d.get("measured", {})),
                tuner=dict(d.get("tuner", {})),
            )
        except (KeyError, TypeError, ConvgenError) as err:
            raise RecordError(f"record: {where} is malformed: {err}") from None


def write_record(record: Record, library: Path | None = None) -> Path:
    """Write (or replace) a record atomically."""
    path = library_path(library) / record.relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record.to_dict(), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def read_record(path: Path) -> Record:
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise RecordError(f"record: cannot read {path}: {err.strerror}") from None
    except ValueError as err:
        raise RecordError(
            f"record: {path} is not valid JSON ({err}); delete or retune it"
        ) from None
    if not isinstance(data, dict):
        raise RecordError(f"record: {path} is not a JSON object; delete or retune it")
    return Record.from_dict(data, str(path))


def record_spec(spec: ConvSpec, target: TargetInfo) -> ConvSpec:
    """The spec a record is kept under. Where kernels run on packed weights (the CPU
    family), `conv`'s flip is applied while packing and the run entry computes `corr`:
    both modes run the same code, so one record, kept under `corr`, serves both (and
    they cannot end up on different tiles by the noise of two tuning runs). Records
    are kept without the fused epilogue: a bias and an activation are a few
    operations per output element on the tile in registers. A residual is not: it
    is a second output-sized tensor read in the write-back, and can change which
    tile is best (ResNet-50's C256 14x14 1x1 K1024: 181 against 221 GFLOP/s for two
    orders that ran alike without it), so tuning measures a residual where a spec
    sharing the record has one (`tuning.grid.tune_specs`)."""
    from convgen.compiler.schedule import family

    spec = spec.without_epilogue()
    return dataclasses.replace(spec, mode="corr") if family(target).packs_weights else spec


def find_record(spec: ConvSpec, target: TargetInfo, library: Path | None = None) -> Record | None:
    """The record for this spec (`record_spec`), target and TVM version, if the library
    has one."""
    import tvm

    key = record_spec(spec, target)
    path = library_path(library) / target.key() / f"{key.name()}.json"
    if not path.is_file():
        return None
    record = read_record(path)
    if record.spec != key or record.tvm_version != tvm.__version__:
        return None
    if record.schedule.trace is not None and spec.has_epilogue:
        return None  # a MetaSchedule trace names the blocks it saw; the epilogue adds one
    return record
