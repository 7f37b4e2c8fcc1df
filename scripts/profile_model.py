"""Per layer, a deployed model's convgen kernels against onnxruntime's own profile of
its nodes, in one process.

    python scripts/profile_model.py DIR [--rounds 8]

Our side: the Relax VM's instrument around every function call (it adds about 15 us to
each call, which weighs on layers of tens of microseconds: compare whole builds with
`scripts/ab_models.py`). onnxruntime's side: its profiler's kernel times
(`enable_profiling`, spinning on: off, every node pays a thread-pool wake-up), on the
same ONNX model with all optimizations. The two alternate in blocks of 10 runs;
medians. Kernels are matched to onnxruntime's Conv/Gemm nodes in graph order; a
depthwise-separable pair (`ModelLayer.pair`) is matched to both of its nodes. The
other functions (pooling, transposes, ...) are summed by name after the table.

Each kernel's rate counts its layers' multiply-adds as a direct convolution computes
them (a Winograd layer's rate is effective, and can pass the peak), against the FMA
peak measured for the width of the model's vectors (AVX2 code: 256-bit). The summary
gives the whole model's time at that peak: no kernel of direct arithmetic runs
faster, so it bounds what any layer-by-layer speed-up can reach."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from typing import Any

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="a deployed model (`convgen deploy --out`)")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()

    import tvm
    import tvm_ffi
    from tvm import relax

    from convgen.runtime.cores import available_cores, use_all_cores
    from convgen.runtime.model import load_model
    from convgen.runtime.timing import measure_cpu_peak, vm_call_timer
    from convgen.runtime.verify import model_inputs, reference_session

    use_all_cores()
    model = load_model(args.dir)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(model.module_path)), tvm.cpu())
    inputs = model_inputs(model, seed=0)
    feed = [tvm.runtime.tensor(a) for a in inputs.values()]
    profiled = reference_session(model, spinning=True, profiling=True)

    instrument, calls = vm_call_timer()

    for _ in range(5):
        vm["main"](*feed)
        profiled.run(None, inputs)
    vm.set_instrument(tvm_ffi.convert(instrument))
    ours: list[list[tuple[str, float]]] = []
    for _ in range(args.rounds):
        for _ in range(10):
            calls.clear()
            vm["main"](*feed)
            ours.append(list(calls))
        time.sleep(0.2)
        for _ in range(10):
            profiled.run(None, inputs)
        time.sleep(0.2)
    trace = profiled.end_profiling()
    with open(trace) as f:
        events = json.load(f)
    os.remove(trace)
    theirs: dict[str, list[float]] = defaultdict(list)
    order: list[str] = []
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"].get("op_name", "")
            if "Conv" in op or "Gemm" in op:
                node = e["name"][: -len("_kernel_time")]
                if node not in theirs:
                    order.append(node)
                theirs[node].append(e["dur"] / 1e6)
    names = [name for name, _ in ours[0]]
    medians = [float(np.median([run[i][1] for run in ours])) * 1e3 for i in range(len(names))]
    kernels = [name for name in names if name.startswith("convgen_")]
    ours_ms = [ms for name, ms in zip(names, medians) if name.startswith("convgen_")]
    layers_per_call = [1 + any(layer.pair and layer.kernel == k for layer in model.manifest.layers)
                       for k in kernels]
    # the layers behind each call (a pair: two), taken in graph order among those of
    # its kernel: the VM's order of independent calls (a block's projection shortcut
    # and its first 1 x 1 layer) need not be the graph's
    by_kernel: dict[str, list[Any]] = defaultdict(list)
    for layer in model.manifest.layers:
        by_kernel[layer.kernel].append(layer)
    flops = []
    for kernel, n in zip(kernels, layers_per_call):
        group, by_kernel[kernel] = by_kernel[kernel][:n], by_kernel[kernel][n:]
        flops.append(sum(layer.spec.flops for layer in group) if len(group) == n else 0)
    peak = measure_cpu_peak(available_cores(), model.manifest.target.vector_bits)
    print(f"{'ours ms':>8} {'ort ms':>8} {'ratio':>6} {'GF/s':>6} {'%peak':>6}  kernel")
    node = 0
    for kernel, ms, n, f in zip(kernels, ours_ms, layers_per_call, flops):
        ort_ms = sum(float(np.median(theirs[order[node + i]])) * 1e3 for i in range(n)
                     if node + i < len(order))
        node += n
        rate = f / ms / 1e6
        pct = f"{100 * rate / peak:5.0f}%" if peak and f else "     -"
        print(f"{ms:8.3f} {ort_ms:8.3f} {ort_ms / ms:6.2f} {rate:6.0f} {pct}  "
              f"{kernel[len('convgen_'):]}")
    print(f"total: ours {sum(ours_ms):.3f} ms, onnxruntime's Conv/Gemm nodes "
          f"{sum(float(np.median(v)) for v in theirs.values()) * 1e3:.3f} ms")
    if peak:
        pointwise = sum(layer.spec.flops for layer in model.manifest.layers
                        if all(r == 1 for r in layer.spec.kernel_size))
        print(f"{model.manifest.target.key}, FMA peak {peak:.0f} GFLOP/s on {available_cores()} "
              f"threads: the model's {model.manifest.flops / 1e9:.3f} GFLOP of direct "
              f"arithmetic take {model.manifest.flops / peak / 1e6:.3f} ms at the peak; its "
              f"1 x 1 layers' {pointwise / 1e9:.3f} GFLOP {pointwise / peak / 1e6:.3f} ms")
    others: dict[str, float] = defaultdict(float)
    for name, ms in zip(names, medians):
        if not name.startswith("convgen_"):
            others[name] += ms
    print(f"our other functions: {sum(others.values()):.3f} ms in {len(others)}; the largest:")
    for name, ms in sorted(others.items(), key=lambda item: -item[1])[:6]:
        print(f"{ms:8.3f}  {name}")


if __name__ == "__main__":
    main()
