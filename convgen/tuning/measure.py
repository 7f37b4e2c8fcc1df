"""Device-side measurement of CUDA tuning candidates: `convgen measure DIR`.

Runtime side: needs nvcc, tvm-ffi, numpy and a GPU, never the TVM compiler, so
it runs on a GPU machine where only the 3 MB tvm-ffi wheel can go. DIR was
written by `convgen tune --target cuda --emit-candidates DIR` on the build
machine: one deferred artifact per (spec, candidate) and an index,
`candidates.json`. This compiles every candidate with nvcc in parallel, then,
one spec at a time in its own process (a candidate that faults the GPU context
takes down only its own spec's measurements), checks each candidate against
the numpy oracle (a fast wrong kernel must never win), times what a bound
kernel runs (the run-packed entry on weights packed once) with CUDA events
(median of `repeats` samples) beside cuDNN when PyTorch is there, and writes
`results.json`, which `convgen tune --target cuda --ingest DIR` turns
into records.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from convgen.errors import ConvgenError, ToolchainError
from convgen.reference import reference_conv
from convgen.runtime import cuda_driver
from convgen.runtime.bench import cudnn_timings
from convgen.runtime.cores import available_cores
from convgen.runtime.kernel import Kernel
from convgen.runtime.nvcc import compile_artifact
from convgen.runtime.timing import gflops, time_cuda
from convgen.runtime.verify import compare, random_inputs, split_constants
from convgen.spec import ConvSpec

INDEX = "candidates.json"
RESULTS = "results.json"
PARTS = "results.d"  # one file per spec, merged into RESULTS


def fastest_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The fastest candidate that built, ran and computed the right result."""
    ok = [r for r in rows if r["median_ms"]]
    return min(ok, key=lambda r: r["median_ms"], default=None)


def _load_index(root: Path) -> dict[str, Any]:
    try:
        index: dict[str, Any] = json.loads((root / INDEX).read_text())
    except (OSError, ValueError) as err:
        raise ConvgenError(f"measure: {root / INDEX} is missing or unreadable: {err}") from None
    return index


def _compile_all(root: Path, index: dict[str, Any], jobs: int) -> dict[str, str]:
    """nvcc every candidate not compiled yet; returns {manifest: error} for failures."""
    from concurrent.futures import ThreadPoolExecutor

    manifests = [c["manifest"] for s in index["specs"] for c in s["candidates"]]

    def one(rel: str) -> tuple[str, str]:
        try:
            compile_artifact(root / rel)
        except ConvgenError as err:
            return rel, str(err)[:500]
        return rel, ""

    with ThreadPoolExecutor(max_workers=jobs or available_cores()) as pool:
        return {rel: err for rel, err in pool.map(one, manifests) if err}


def measure_spec(root: Path, spec_entry: dict[str, Any], build_errors: dict[str, str],
                 repeats: int) -> dict[str, Any]:
    """Check and time every candidate of one spec (and cuDNN beside it)."""
    spec = ConvSpec.from_dict(spec_entry["spec"])
    inputs = random_inputs(spec, seed=0)
    want = reference_conv(spec, *inputs.values())
    constants, per_call = (
        [cuda_driver.DeviceArray.from_numpy(a) for a in arrays]
        for arrays in split_constants(spec, inputs))
    out = cuda_driver.DeviceArray(spec.out_shape, spec.dtype)
    rows = []
    for cand in spec_entry["candidates"]:
        row = {"template": cand["template"], "knobs": cand["knobs"], "median_ms": None,
               "error": build_errors.get(cand["manifest"], "")}
        if not row["error"]:
            try:
                # what a deployment runs: the weights packed once (`bind`), the data per call
                kernel = Kernel(root / cand["manifest"])
                bound = kernel.bind(*constants)
                args = (per_call[0], *bound.constants, *per_call[1:], out, *kernel.scratch)
                out.fill_zero()
                bound.func(*args)
                if not compare("oracle", out.numpy(), want, spec.dtype).passed:
                    row["error"] = "wrong result"
                else:
                    t = time_cuda(lambda f=bound.func, a=args: f(*a), repeats, 3, 5.0)
                    row["median_ms"] = t.median * 1e3
            except Exception as err:  # a candidate that fails to load or run
                row["error"] = str(err).strip().splitlines()[-1][:300]
        rows.append(row)
    peers = {k: t.median * 1e3 for k, t in cudnn_timings(spec, inputs, repeats, 3, 5.0).items()}
    return {"spec": spec_entry["spec"], "candidates": rows, "peers_ms": peers}


def measure_candidates(
    directory: str | os.PathLike[str], repeats: int = 20, jobs: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    root = Path(directory)
    index = _load_index(root)
    device = cuda_driver.device_name()  # no GPU: fail before minutes of nvcc
    t0 = time.perf_counter()
    build_errors = _compile_all(root, index, jobs)
    (root / "build_errors.json").write_text(json.dumps(build_errors, indent=1))
    if log:
        n = sum(len(s["candidates"]) for s in index["specs"])
        log(f"nvcc: {n} candidates in {time.perf_counter() - t0:.1f} s "
            f"({len(build_errors)} failed)")
    parts = root / PARTS
    parts.mkdir(exist_ok=True)
    specs = index["specs"]
    # One process measures the specs in turn, writing a part per spec; where a
    # candidate faults the GPU context the process dies, that spec is recorded as
    # failed, and a new process carries on with the next one.
    while True:
        todo = [i for i in range(len(specs)) if not (parts / f"{i:04d}.json").exists()]
        if not todo:
            break
        proc = subprocess.run(
            [sys.executable, "-m", "convgen.tuning.measure", str(root), str(repeats)],
            capture_output=True, text=True,
        )
        current = parts / "current"
        if proc.returncode != 0 and current.exists():
            i = int(current.read_text())
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            rows = [{"template": c["template"], "knobs": c["knobs"], "median_ms": None,
                     "error": f"measuring process died: {tail[0][:300]}"}
                    for c in specs[i]["candidates"]]
            (parts / f"{i:04d}.json").write_text(
                json.dumps({"spec": specs[i]["spec"], "candidates": rows, "peers_ms": {}}))
        elif proc.returncode != 0:
            raise ToolchainError(f"measure: {proc.stderr.strip()[-1000:]}")
    results: dict[str, Any] = {"device": device, "specs": {}}
    for i, spec_entry in enumerate(specs):
        spec = ConvSpec.from_dict(spec_entry["spec"])
        entry = json.loads((parts / f"{i:04d}.json").read_text())
        results["specs"][spec.name()] = entry
        if log:
            log(_summary(spec, entry))
    (root / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
    return results


def _summary(spec: ConvSpec, entry: dict[str, Any]) -> str:
    won = fastest_row(entry["candidates"])
    if won is None:
        return f"{spec.name()}: no candidate built, ran and computed the right result"
    best = won["median_ms"]
    vs = "".join(f", {k} {v:.4f} ms ({v / best:.2f}x)"
                 for k, v in entry.get("peers_ms", {}).items())
    return (f"{spec.name()}: best {best:.4f} ms ({won['template']}, "
            f"{gflops(spec.flops, best / 1e3):.0f} GFLOP/s){vs}")


if __name__ == "__main__":  # the measuring process (see measure_candidates)
    _root, _repeats = Path(sys.argv[1]), int(sys.argv[2])
    _index = _load_index(_root)
    _errors = json.loads((_root / "build_errors.json").read_text())
    _parts = _root / PARTS
    for _i, _spec_entry in enumerate(_index["specs"]):
        _part = _parts / f"{_i:04d}.json"
        if _part.exists():
            continue
        (_parts / "current").write_text(str(_i))
        _entry = measure_spec(_root, _spec_entry, _errors, _repeats)
        _tmp = _part.with_suffix(".tmp")
        _tmp.write_text(json.dumps(_entry))
        os.replace(_tmp, _part)
    (_parts / "current").unlink(missing_ok=True)
