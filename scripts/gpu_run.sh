#!/usr/bin/env bash
# The GPU machine's half of a GPU check prepared by scripts/gpu_check.sh DIR. Run
# from the repository root there; every step's output goes to LOGDIR/<step>.log,
# each step under its own time limit, in order of what matters most: the models
# (verified against onnxruntime, timed against PyTorch eager on the GPU), tuning
# candidates, the case table (tests/test_gpu.py), then the benchmark layers
# against cuDNN.
#   bash scripts/gpu_run.sh DIR LOGDIR
set -uo pipefail
dir=${1:?usage: gpu_run.sh DIR LOGDIR}
logs=${2:?usage: gpu_run.sh DIR LOGDIR}
mkdir -p "$logs"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$dir"/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export CONVGEN_TVM_RUNTIME=$dir/lib/libtvm_runtime.so
export LD_LIBRARY_PATH=$dir/lib:${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$logs/gpu.log"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  timeout "$limit" "$@" > "$logs/$name.log" 2>&1
  echo "== $name rc=$? ($(tail -n 3 "$logs/$name.log" | tr '\n' ' '))"
}

for m in "$dir"/zoo/*/; do  # the zoo's ONNX copies, rebuilt from the same seed
  [ -d "$m" ] || continue
  n=$(basename "$m")
  python3 -c "import onnx, sys; from convgen import zoo; onnx.save(zoo.build(sys.argv[1]), sys.argv[2])" \
    "$n" "$m/$n.onnx"
done
for m in "$dir"/models/*/ "$dir"/zoo/*/; do
  [ -d "$m" ] || continue
  step "verify-$(basename "$m")" 120 python3 -m convgen.cli verify "$m"
done
for m in "$dir"/zoo/*/ "$dir"/models/residual_block/; do
  [ -d "$m" ] || continue
  step "bench-$(basename "$m")" 120 python3 -m convgen.cli bench "$m"
done
for t in "$dir"/tune/*/; do  # CUDA tuning candidates: results.json comes back in LOGDIR
  [ -d "$t" ] || continue
  step "measure-$(basename "$t")" 300 python3 -m convgen.cli measure "$t"
  cp "$t/results.json" "$logs/tune-$(basename "$t").json" 2>/dev/null
done
if [ -d "$dir/cases" ]; then
  step compile-cases 240 python3 -m convgen.cli compile "$dir/cases"
  CONVGEN_PREBUILT=$dir/cases step test-gpu 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
fi
if [ -d "$dir/bench" ]; then
  step compile-bench 240 python3 -m convgen.cli compile "$dir/bench"
  step verify-bench 120 python3 -m convgen.cli verify "$dir/bench"
  step bench-kernels 300 python3 -m convgen.cli bench "$dir/bench" --json
fi
