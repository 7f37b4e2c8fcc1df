"""CUDA tuning without a GPU here: candidates written on this machine, measured on the GPU one.

`convgen tune --target cuda --emit-candidates DIR` writes every candidate of every
spec as a deferred CUDA artifact (CUDA C++, no nvcc yet) with an index;
`convgen measure DIR` compiles, checks and times them on the GPU machine
(`convgen.tuning.measure`, which needs no TVM); `--ingest DIR` turns its
results.json into records here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from convgen.compiler.records import Record, RecordedSchedule, write_record
from convgen.compiler.targets import TargetInfo
from convgen.errors import UnsupportedError
from convgen.runtime.timing import gflops
from convgen.spec import ConvSpec
from convgen.tuning.grid import Candidate, candidates_for
from convgen.tuning.measure import INDEX, RESULTS, fastest_row


def emit_cuda_candidates(specs: list[ConvSpec], target: TargetInfo, out_dir: Path,
                         per_template: int | None = None) -> int:
    """Write the candidates (template knobs, `per_template` at most of each, and the
    direct fallback) of every spec as deferred CUDA artifacts under out_dir, with the
    index `convgen measure` reads. Returns the number of candidates."""
    from convgen.compiler.build import build_artifact
    from convgen.compiler.records import record_spec
    from convgen.compiler.schedule import family

    if not target.is_cuda:
        raise UnsupportedError("tune: --emit-candidates is for CUDA targets")
    out_dir.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"target": target.config_dict, "target_key": target.key(),
                             "specs": []}
    count = 0
    fallback = Candidate(family(target).fallback_name, {})
    # each record once, on the spec it is kept under (`record_spec`)
    for spec in dict.fromkeys(record_spec(s, target) for s in specs):
        entries = []
        for i, cand in enumerate([*candidates_for(spec, target, per_template), fallback]):
            sub = out_dir / spec.name() / f"c{i:03d}"
            try:
                art = build_artifact(spec, target, sub, verify=False, defer_nvcc=True,
                                     template=cand.template, knobs=cand.knobs)
            except Exception:  # a candidate TVM cannot lower: skip it, the search goes on
                continue
            entries.append({"template": cand.template, "knobs": cand.knobs,
                            "manifest": str(art.manifest_path.relative_to(out_dir))})
            count += 1
        index["specs"].append({"spec": spec.to_dict(), "candidates": entries})
    (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return count


def ingest_cuda_results(directory: Path, library: Path | None = None) -> list[Path]:
    """results.json from `convgen measure` -> one record per spec (its fastest candidate
    that computed the right result)."""
    import tvm

    index = json.loads((directory / INDEX).read_text())
    try:
        results = json.loads((directory / RESULTS).read_text())
    except OSError:
        raise UnsupportedError(
            f"tune: {directory / RESULTS} not found: run `convgen measure {directory}` on the "
            "GPU machine first"
        ) from None
    written = []
    for entry in results["specs"].values():
        spec = ConvSpec.from_dict(entry["spec"])
        best = fastest_row(entry["candidates"])
        if best is None:
            continue
        ok = sum(1 for r in entry["candidates"] if r["median_ms"])
        record = Record(
            spec=spec, target_key=index["target_key"], tvm_version=tvm.__version__,
            schedule=RecordedSchedule(best["template"], best["knobs"]),
            measured={"median_ms": round(best["median_ms"], 5),
                      "gflops": round(gflops(spec.flops, best["median_ms"] / 1e3), 1),
                      "device": results.get("device", ""), "date": time.strftime("%Y-%m-%d"),
                      "peers_ms": entry.get("peers_ms", {})},
            tuner={"method": "template grid on the device", "candidates": len(entry["candidates"]),
                   "failed": len(entry["candidates"]) - ok},
        )
        written.append(write_record(record, library))
    return written
