"""Time deployed builds of one model against each other and onnxruntime, alternating
in one process.

    python scripts/ab_models.py DIR_A DIR_B [...] [--rounds 40]

What a change to `deploy` or to the records did to a model (`deploy` against
`deploy --no-separable`, two record libraries): on a shared machine the ratio of the
same build moves by up to 15% between runs of `scripts/bench_models.py`, while builds
timed in alternating rounds of one process see the same machine. Each round calls
every build and onnxruntime (on the first build's ONNX model, all optimizations,
spinning on) 3 times to warm up and 4 times timed, once the other's threads have
parked (`timing.wait_until_idle`: a fixed 0.1 s pause let TVM's spinning pool take
cores from onnxruntime, which then ran MobileNetV2 in 9.35 ms against 5.3), in an order
rotated each round; medians. Copies of one build still differ (by up to 2 ms on
ResNet-50): time two copies of each build where that matters."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from convgen.runtime.model import load_model
from convgen.runtime.timing import wait_until_idle
from convgen.runtime.verify import model_inputs, reference_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="deployed builds (`convgen deploy --out`)")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    models = [load_model(d) for d in args.dirs]
    inputs = model_inputs(models[0], seed=0)
    session = reference_session(models[0], spinning=True)
    calls: dict[str, Callable[[], Any]] = {
        d: (lambda m=m: m(**inputs)) for d, m in zip(args.dirs, models)}
    calls["onnxruntime"] = lambda: session.run(None, inputs)
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(args.rounds):
        # no build always runs right after onnxruntime's (in a fixed order the first
        # of two identical ResNet-50 builds ran 2-4 ms slower than the other)
        for name in names[r % len(names):] + names[:r % len(names)]:
            call = calls[name]
            wait_until_idle()  # the other's thread pool parked
            for _ in range(3):
                call()
            for _ in range(4):
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    ort = float(np.median(times["onnxruntime"]))
    for name, samples in times.items():
        ms = float(np.median(samples))
        print(f"{name:40s} {ms * 1e3:8.2f} ms  {ort / ms:5.2f}x onnxruntime")


if __name__ == "__main__":
    main()
