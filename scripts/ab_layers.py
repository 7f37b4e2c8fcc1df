"""Per layer, two deployed builds of one model against each other, alternating in one
process.

    python scripts/ab_layers.py DIR_A DIR_B [--rounds 20]

What a change did to each layer, where `scripts/ab_models.py` sees only the whole
model and `scripts/profile_model.py` compares one build with onnxruntime: on a shared
machine a layer that did not change moves between two profiles by as much as the
changes measured (ResNet-50's Winograd layers by 20% against onnxruntime's). Each
round runs each build 5 times, its functions timed by the Relax VM's instrument
(which adds about 15 us to each call), after a 0.1 s pause; medians. The builds'
function calls are matched by position, so they must call the same sequence (two
builds of one model by one `deploy` with different kernels, records or heuristics);
a function whose kernel spec changed shows both names. Run it both ways round
(`A B`, then `B A`): the build timed first in each round ran 3-4% faster on layers
that did not change (Zen 4)."""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs=2, help="two deployed builds (`convgen deploy --out`)")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    import tvm
    import tvm_ffi
    from tvm import relax

    from convgen.runtime.cores import use_all_cores
    from convgen.runtime.model import load_model
    from convgen.runtime.timing import vm_call_timer
    from convgen.runtime.verify import model_inputs

    use_all_cores()
    instrument, calls = vm_call_timer()

    runs = []
    for d in args.dirs:
        model = load_model(d)
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(model.module_path)), tvm.cpu())
        feed = [tvm.runtime.tensor(a) for a in model_inputs(model, seed=0).values()]
        for _ in range(5):
            vm["main"](*feed)
        vm.set_instrument(tvm_ffi.convert(instrument))
        runs.append((vm, feed))
    timed: list[list[list[tuple[str, float]]]] = [[] for _ in runs]
    for _ in range(args.rounds):
        for (vm, feed), out in zip(runs, timed, strict=True):
            for _ in range(5):
                calls.clear()
                vm["main"](*feed)
                out.append(list(calls))
            time.sleep(0.1)
    totals = [np.median([sum(t for _, t in run) for run in out]) * 1e3 for out in timed]
    for d, total in zip(args.dirs, totals, strict=True):
        print(f"{d}: {total:.3f} ms in its functions")
    a, b = (out[0] for out in timed)
    if [len(run) for run in timed[0]] != [len(a)] * len(timed[0]) or len(a) != len(b):
        raise SystemExit("the builds call different numbers of functions: not comparable")
    print(f"{'A ms':>8} {'B ms':>8}  A/B  function (A | B where they differ)")
    for j, ((name_a, _), (name_b, _)) in enumerate(zip(a, b, strict=True)):
        ms_a, ms_b = (np.median([run[j][1] for run in out]) * 1e3 for out in timed)
        names = name_a if name_a == name_b else f"{name_a} | {name_b}"
        print(f"{ms_a:8.3f} {ms_b:8.3f} {ms_a / ms_b:5.2f}  {names}")


if __name__ == "__main__":
    main()
