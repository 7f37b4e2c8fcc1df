"""The tuned-record library: `schedules/<target key>/<spec name>.json`.

One human-readable JSON file per (target, spec), written by `convgen tune`,
reviewed and committed, read by `convgen build`. A record names the schedule
that won (a template and its knobs, or a MetaSchedule trace), what it measured,
and the TVM version it was tuned with. A record only matches a build when the
spec (every field), the target key and the TVM version all match: a schedule
tuned with another TVM may lower differently.

Files are written atomically (a temporary file, then renamed), so an
interrupted tune never leaves a torn record.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convgen.compiler.targets import TargetInfo
from convgen.errors import ConvgenError
from convgen.spec import ConvSpec

FORMAT = "convgen-record"
FORMAT_VERSION = 1
# The library shipped with convgen (the repository's schedules/ folder).
DEFAULT_LIBRARY = Path(__file__).resolve().parents[2] / "schedules"


class RecordError(ConvgenError):
    """A record file exists but cannot be used (corrupt, wrong format)."""


def library_path() -> Path:
    """$CONVGEN_SCHEDULES, else the schedules/ folder beside the package."""
    return Path(os.environ.get("CONVGEN_SCHEDULES", DEFAULT_LIBRARY))


@dataclass(frozen=True)
class Record:
    spec: ConvSpec
    target_key: str
    tvm_version: str
    schedule: dict[str, Any]  # {"kind": "template", "name", "knobs"} or {"kind": "trace", ...}
    measured: dict[str, Any]
    tuner: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.spec.name(),
            "spec": self.spec.to_dict(),
            "target_key": self.target_key,
            "tvm_version": self.tvm_version,
            "schedule": self.schedule,
            "measured": self.measured,
            "tuner": self.tuner,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> Record:
        if d.get("format") != FORMAT:
            raise RecordError(
                f"record: {where} is not a convgen record (format {d.get('format')!r})"
            )
        try:
            return cls(
                spec=ConvSpec.from_dict(d["spec"]),
                target_key=str(d["target_key"]),
                tvm_version=str(d["tvm_version"]),
                schedule=dict(d["schedule"]),
                measured=dict(d.get("measured", {})),
                tuner=dict(d.get("tuner", {})),
            )
        except (KeyError, TypeError, ConvgenError) as err:
            raise RecordError(f"record: {where} is malformed: {err}") from None


def record_path(library: Path, target_key: str, spec: ConvSpec) -> Path:
    return library / target_key / f"{spec.name()}.json"


def write_record(record: Record, library: Path | None = None) -> Path:
    """Write (or replace) a record atomically."""
    lib = library if library is not None else library_path()
    path = record_path(lib, record.target_key, record.spec)
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


def find_record(spec: ConvSpec, target: TargetInfo, library: Path | None = None) -> Record | None:
    """The record for exactly this spec, target and TVM version, if the library has one."""
    import tvm

    lib = library if library is not None else library_path()
    path = record_path(lib, target.key(), spec)
    if not path.is_file():
        return None
    record = read_record(path)
    if record.spec != spec or record.tvm_version != tvm.__version__:
        return None
    return record
