"""Device-side measurement of CUDA tuning candidates: `convgen measure DIR`.

Runtime side: needs nvcc, tvm-ffi, numpy and a GPU, never the TVM compiler, so
it runs on a GPU machine where only the 3 MB tvm-ffi wheel can go. DIR was
written by `convgen tune --target cuda --emit-candidates DIR` on the build
machine: one deferred artifact per (spec, candidate) and an index,
`candidates.json`. This compiles every candidate with nvcc in parallel, checks
each against the numpy oracle (a fast wrong kernel must never win), times it
with CUDA events (median of `repeats` samples) and writes `results.json`,
which `convgen tune --target cuda --ingest DIR` turns into records.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

INDEX = "candidates.json"
RESULTS = "results.json"


def measure_candidates(
    directory: str | os.PathLike[str], repeats: int = 20, jobs: int = 0,
    log: Any = None,
) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    from convgen import cuda_driver
    from convgen.bench import time_cuda
    from convgen.errors import ConvgenError
    from convgen.nvcc import nvcc
    from convgen.reference import reference_conv
    from convgen.runtime import Kernel, read_manifest
    from convgen.spec import ConvSpec
    from convgen.verify import TOLERANCES, random_inputs

    root = Path(directory)
    try:
        index = json.loads((root / INDEX).read_text())
    except (OSError, ValueError) as err:
        raise ConvgenError(f"measure: {root / INDEX} is missing or unreadable: {err}") from None

    device = cuda_driver.device_name()  # no GPU: fail before minutes of nvcc
    entries = [(spec_entry, cand) for spec_entry in index["specs"]
               for cand in spec_entry["candidates"]]

    def build(item: tuple[dict[str, Any], dict[str, Any]]) -> str:
        _, cand = item
        manifest_path = root / cand["manifest"]
        m = read_manifest(manifest_path)
        so = manifest_path.parent / m["files"]["module"]
        if so.exists():
            return ""
        try:
            nvcc(manifest_path.parent / m["files"]["cuda_source"], so,
                 m["target"]["config"].get("arch", "sm_90"))
        except ConvgenError as err:
            return str(err)[:500]
        return ""

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs or len(os.sched_getaffinity(0))) as pool:
        build_errors = list(pool.map(build, entries))
    if log:
        log(f"nvcc: {len(entries)} candidates in {time.perf_counter() - t0:.1f} s")

    results: dict[str, Any] = {"device": device, "specs": {}}
    errors = iter(build_errors)
    for spec_entry in index["specs"]:
        spec = ConvSpec.from_dict(spec_entry["spec"])
        inputs = random_inputs(spec, seed=0)
        want = reference_conv(spec, *inputs.values()).astype(np.float64)
        rtol, atol = TOLERANCES[spec.dtype]
        scale = max(1.0, float(np.abs(want).max()))
        dev_in = [cuda_driver.DeviceArray.from_numpy(a) for a in inputs.values()]
        out = cuda_driver.DeviceArray(spec.out_shape, spec.dtype)
        rows = []
        for cand in spec_entry["candidates"]:
            row = {"template": cand["template"], "knobs": cand["knobs"], "median_ms": None,
                   "error": next(errors)}
            if not row["error"]:
                try:
                    kernel = Kernel(root / cand["manifest"])
                    func = kernel.func
                    out.fill_zero()
                    func(*dev_in, out)
                    got = out.numpy().astype(np.float64)
                    if not np.allclose(got, want, rtol=rtol, atol=atol * scale):
                        row["error"] = "wrong result"
                    else:
                        t = time_cuda(lambda f=func, a=dev_in, o=out: f(*a, o), repeats, 3, 5.0)
                        row["median_ms"] = t.median * 1e3
                except Exception as err:  # a candidate that fails to load or run
                    row["error"] = str(err).strip().splitlines()[-1][:300]
            rows.append(row)
        best = min((r["median_ms"] for r in rows if r["median_ms"]), default=math.inf)
        if log:
            log(f"{spec.name()}: {len(rows)} candidates, best {best:.4f} ms")
        results["specs"][spec.name()] = {"spec": spec_entry["spec"], "candidates": rows}
    (root / RESULTS).write_text(json.dumps(results, indent=2) + "\n")
    return results
