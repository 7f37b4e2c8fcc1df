#!/usr/bin/env bash
# Prepare a GPU check: CUDA artifacts for the test case table (both modes) and a
# few benchmark layers, generated here with --defer-nvcc (no GPU or long nvcc
# runs needed), small CUDA models and zoo models (`deploy --target cuda`), TVM's
# runtime libraries and the tvm-ffi wheel for the GPU machine's Python.
#   bash scripts/gpu_check.sh DIR
#   KERNELS=0 ZOO=resnet18 bash scripts/gpu_check.sh DIR   # a zoo model alone
#   KERNELS=0 ZOO= TUNE=resnet18 bash scripts/gpu_check.sh DIR   # CUDA tuning candidates
#     for the layers deploy builds for a zoo model (`convgen tune --model`, TRIALS per
#     template, default 3); gpu_run.sh measures them into LOGDIR/tune-<model>.json,
#     and here `convgen tune --target cuda:sm_90 --ingest` takes the folder back with
#     that file as its results.json.
# then on the GPU machine (needs nvcc, numpy, onnx, onnxruntime, pytest; torch
# optional), from the repository root: bash scripts/gpu_run.sh DIR LOGDIR.
# A zoo model travels without its ONNX copy (a device call carries 64 MiB in all;
# ResNet-18's weights are 45 MB): gpu_run.sh rebuilds it there from the same seed.
set -euo pipefail
out=${1:?usage: gpu_check.sh DIR}
mkdir -p "$out/whl" "$out/lib" "$out/zoo"
KERNELS=${KERNELS:-1} ZOO=${ZOO-mobilenet_v2} python - "$out" <<'PY'
import os
import sys
from pathlib import Path

import onnx

from convgen import zoo
from convgen.compiler.deploy import DeployOptions, deploy_artifact
from convgen.compiler.targets import resolve_target

out = Path(sys.argv[1])
cuda = resolve_target("cuda")
for name in os.environ["ZOO"].split():
    onnx.save(zoo.build(name), out / f"{name}.onnx")
    deploy_artifact(out / f"{name}.onnx", cuda, out / "zoo" / name, DeployOptions(),
                    verify=False)
    (out / f"{name}.onnx").unlink()
    (out / "zoo" / name / f"{name}.onnx").unlink()
if os.environ["KERNELS"] == "0":
    sys.exit()
sys.path.insert(0, "tests")
from cases import CASE_TABLE
from convgen.compiler.build import build_artifact
from convgen.spec import make_spec

for row in CASE_TABLE:
    for mode in ("conv", "corr"):
        build_artifact(make_spec(mode=mode, **row), cuda, out / "cases", defer_nvcc=True)
from test_gpu import SPLIT_K  # device tensors in and out, split-K's workspace
for flags in SPLIT_K:
    build_artifact(make_spec(**flags), cuda, out / "cases", defer_nvcc=True)
layers = [  # C, HxW, K, kernel, stride, pad, groups (ResNet-50, batch 1)
    (64, 56, 64, 3, 1, 1, 1), (256, 56, 64, 1, 1, 0, 1), (128, 28, 128, 3, 1, 1, 1),
    (3, 224, 64, 7, 2, 3, 1), (256, 28, 256, 3, 1, 1, 256),
    (256, 14, 256, 3, 1, 1, 1), (512, 7, 512, 3, 1, 1, 1),  # small outputs (split-K)
]
for c, hw, k, r, s, p, g in layers:
    for mode, dtype in (("conv", "float32"), ("corr", "float32"), ("conv", "float16")):
        spec = make_spec(mode=mode, input=f"1x{c}x{hw}x{hw}", kernel=f"{k}x{c // g}x{r}x{r}",
                         stride=s, padding=p, groups=g, dtype=dtype)
        build_artifact(spec, cuda, out / "bench", defer_nvcc=True)
# small CUDA models (deploy --target cuda), from the deploy tests' graphs
from test_deploy import MODELS
from convgen.errors import ConvgenError
for name, make in MODELS.items():
    model, _ = make()
    onnx.save(model, out / f"{name}.onnx")
    try:
        deploy_artifact(out / f"{name}.onnx", cuda, out / "models" / name,
                        DeployOptions(mode="conv"), verify=False)
    except ConvgenError as err:
        print(f"{name}: not deployed for CUDA: {err}")
    (out / f"{name}.onnx").unlink()
PY
for name in ${TUNE:-}; do
  python -c "import onnx, sys; from convgen import zoo; onnx.save(zoo.build(sys.argv[1]), sys.argv[2])" \
    "$name" "$out/$name.onnx"
  convgen tune --model "$out/$name.onnx" --target cuda:sm_90 --trials "${TRIALS:-3}" \
    --emit-candidates "$out/tune/$name"
  rm "$out/$name.onnx"
done
tvm_lib=$(python -c "import tvm, os; print(os.path.join(os.path.dirname(tvm.__file__), 'lib'))")
cp "$tvm_lib/libtvm_runtime.so" "$tvm_lib/libtvm_runtime_cuda.so" "$out/lib/"
# the CUDA runtime TVM's CUDA part was linked against (13.x: driver 580 or newer)
cudart=$(ldd "$tvm_lib/libtvm_runtime_cuda.so" | awk '/libcudart/ {print $3}')
cp -L "$cudart" "$out/lib/"
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  -d "$out/whl" "apache-tvm-ffi==0.1.14.post1"
du -sh "$out"
