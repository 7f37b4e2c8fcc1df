"""Deploy the model zoo (torchvision's ResNet-18, ResNet-50, MobileNetV2 with random
weights, `convgen.zoo`) and time each end to end against onnxruntime.

    python scripts/bench_models.py [--out benchmarks/cpu_<key>_models.json] [--repeats 30]
        [--target llvm:znver3] [--batch 8]

(AVX2 code against onnxruntime's AVX2 kernels on an AVX-512 machine: put
`scripts/ort_avx2.py`'s copy of onnxruntime on PYTHONPATH.)

Prints the markdown table (`convgen bench DIR` for each model, one process each
model, alternating rounds) and writes the raw results as JSON. Records for the
models' layers come from the shipped library (`convgen tune --model` adds them)."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime

from convgen import zoo
from convgen.compiler.deploy import DeployOptions, deploy_artifact
from convgen.compiler.targets import resolve_target
from convgen.runtime.bench import bench_model, format_model_table
from convgen.runtime.model import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON file for the raw results")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--models", nargs="*", default=list(zoo.MODELS))
    parser.add_argument("--target", default="llvm", help="as deploy's (llvm:znver3: AVX2)")
    parser.add_argument("--batch", type=int, default=1, help="the models' batch size")
    args = parser.parse_args()
    target = resolve_target(args.target)
    results, rows = [], []
    with tempfile.TemporaryDirectory(prefix="convgen-models-") as tmp:
        for name in args.models:
            src = Path(tmp) / f"{name}.onnx"
            onnx.save(zoo.build(name, batch=args.batch), src)
            start = time.perf_counter()
            path, manifest = deploy_artifact(src, target, Path(tmp) / name, DeployOptions())
            seconds = time.perf_counter() - start
            result = bench_model(load_model(path), repeats=args.repeats)
            result.notes += [f"deploy {seconds:.1f} s", manifest.verification.lines()[0]]
            results.append(result)
            rows.append({**result.to_dict(), "target_key": target.key(),
                         "deploy_seconds": round(seconds, 1),
                         "verification": manifest.verification.to_dict()})
            print(f"{name}: deployed in {seconds:.1f} s; {manifest.verification.lines()[0]}",
                  flush=True)
    print("\n".join(format_model_table(results)))
    print(f"target {target.key()}, batch {args.batch}, threads {results[0].threads}, "
          f"medians of {args.repeats}; "
          f"onnxruntime {onnxruntime.__version__} from {Path(onnxruntime.__file__).parent}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
