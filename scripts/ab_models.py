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
from collections.abc import Callable
from typing import Any

from convgen.runtime.model import load_model
from convgen.runtime.timing import time_host_rounds
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
    # rounds of 3 warm-up calls and 4 timed ones each, in a rotating order, each
    # once the other's thread pool has parked (`timing.time_host_rounds`)
    times = time_host_rounds(calls, repeats=4 * args.rounds, warmup=3, min_sample_ms=0.0,
                             rounds=args.rounds)
    ort = times["onnxruntime"].median
    for name, timing in times.items():
        print(f"{name:40s} {timing.median * 1e3:8.2f} ms  {ort / timing.median:5.2f}x "
              "onnxruntime")


if __name__ == "__main__":
    main()
