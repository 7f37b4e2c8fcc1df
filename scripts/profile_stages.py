"""Where a model gains or loses against onnxruntime, stage by stage: the model cut
after each named tensor (`onnx.utils.extract_model`), each prefix deployed, every
prefix timed against onnxruntime on the same prefix in one process; a stage's time
is the difference between consecutive prefixes.

    python scripts/profile_stages.py MODEL.onnx TENSOR [TENSOR ...] [--target llvm:znver3]
        [--rounds 20]

`scripts/profile_model.py` compares single kernels with onnxruntime's profile of its
nodes, but its profiler adds tens of microseconds to every node: on MobileNetV2,
whose nodes take 10-300 us, it reported onnxruntime's Conv nodes at 8.9 ms against
a whole model of 5.5. Here both sides run as their users run them (deployed module;
onnxruntime with all optimizations, spinning on). Each prefix ends in a global
average pool of the cut tensor (`_pooled`), which both sides compute in their own
layout, so neither converts the tensor back. Cut at tensors between blocks (after
the Add of a residual block); the names are the ONNX model's.

A stage's ratio is a difference of two prefixes' medians, so it carries both their
noise: on MobileNetV2 (5 ms a call) two runs agreed to a few percent per stage, on
ResNet-50 (45 ms) the host's drift during a run moved its last two stages between
0.85x and 1.9x. Run it twice and trust what repeats."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an ONNX model")
    parser.add_argument("tensors", nargs="+", help="tensors to cut after, in graph order")
    parser.add_argument("--target", default="llvm", help="as deploy's (llvm:znver3: AVX2)")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    import onnx
    import onnx.utils

    from convgen.compiler.deploy import DeployOptions, deploy_artifact
    from convgen.compiler.targets import resolve_target
    from convgen.runtime.model import load_model
    from convgen.runtime.timing import time_host_rounds
    from convgen.runtime.verify import model_inputs, reference_session

    target = resolve_target(args.target)
    model = onnx.load(args.model)
    produced = {out for node in model.graph.node for out in node.output}
    unknown = [t for t in args.tensors if t not in produced]
    if unknown:
        raise SystemExit(f"tensors: {', '.join(unknown)} not produced by any node of "
                         f"{args.model}")
    initializers = {t.name for t in model.graph.initializer}
    graph_inputs = [i.name for i in model.graph.input if i.name not in initializers]
    cuts = [*args.tensors, None]  # None: the whole model
    calls: dict[tuple[str, str], Callable[[], Any]] = {}
    with tempfile.TemporaryDirectory(prefix="convgen-stages-") as tmp:
        for i, tensor in enumerate(cuts):
            src = Path(tmp) / f"prefix{i}.onnx"
            if tensor is None:
                onnx.save(model, src)
            else:
                onnx.utils.extract_model(args.model, str(src), graph_inputs, [tensor])
                onnx.save(_pooled(onnx.load(src)), src)
            path, _ = deploy_artifact(src, target, Path(tmp) / f"prefix{i}", DeployOptions())
            ours = load_model(path)
            inputs = model_inputs(ours, seed=0)
            session = reference_session(ours, spinning=True)
            name = tensor or "(whole model)"
            calls[("ours", name)] = lambda m=ours, x=inputs: m(**x)
            calls[("onnxruntime", name)] = lambda s=session, x=inputs: s.run(None, x)
            print(f"deployed the prefix to {name}", flush=True)

        # rounds of 3 warm-up calls and 4 timed ones, in a rotating order
        times = time_host_rounds(calls, repeats=4 * args.rounds, warmup=3,
                                 min_sample_ms=0.0, rounds=args.rounds)

    print(f"\n{target.key()}, medians of {4 * args.rounds}, ms")
    print(f"{'prefix to':24s} {'ours':>7s} {'ort':>7s}  ratio   stage: {'ours':>6s} "
          f"{'ort':>6s}  ratio")
    before = (0.0, 0.0)
    for tensor in cuts:
        name = tensor or "(whole model)"
        ours, ort = (times[(side, name)].median * 1e3 for side in ("ours", "onnxruntime"))
        stage = (ours - before[0], ort - before[1])
        print(f"{name:24s} {ours:7.2f} {ort:7.2f}  {ort / ours:4.2f}x         "
              f"{stage[0]:6.2f} {stage[1]:6.2f}  {stage[1] / stage[0]:4.2f}x")
        before = (ours, ort)


def _pooled(prefix: Any) -> Any:
    """The prefix with its output averaged over the pixels (GlobalAveragePool): both
    sides then read the cut tensor in their own layout and return a few channels'
    worth, where converting the whole tensor back to the model's layout (our
    transpose, onnxruntime's reorder out of NCHWc) would weigh on one side more than
    the other (ResNet-50 cut at 56x56x256: 3.2 MB)."""
    from onnx import helper

    graph = prefix.graph
    (out,) = graph.output
    dims = out.type.tensor_type.shape.dim
    pooled = f"{out.name}_pooled"
    graph.node.append(helper.make_node("GlobalAveragePool", [out.name], [pooled]))
    shape = [d.dim_value for d in dims[:2]] + [1] * (len(dims) - 2)
    graph.output.pop()
    graph.output.append(helper.make_tensor_value_info(pooled, out.type.tensor_type.elem_type,
                                                      shape))
    return prefix


if __name__ == "__main__":
    main()
