#!/usr/bin/env bash
# Regenerate the shipped CUDA records (sm_90) for the ResNet-50 suite, fp32 and
# fp16, batch 1 and 8. The GPU may be on another machine:
#   bash scripts/retune_cuda_records.sh emit DIR [N]  # here: candidates (no GPU needed)
#   convgen measure DIR                               # on the GPU machine (nvcc + tvm-ffi)
#   bash scripts/retune_cuda_records.sh ingest DIR    # here: results.json -> convgen/schedules/
# N caps the candidates per template and layer (the heuristic's first): the whole grid
# is about 40 per template, more nvcc time than a short GPU lease holds.
set -euo pipefail
cd "$(dirname "$0")/.."
step=${1:?emit or ingest}; dir=${2:?candidates folder}; cap=${3:-}
case $step in
  emit)
    for dtype in float32 float16; do
      convgen tune --target cuda:sm_90 --suite resnet50 --dtype "$dtype" \
        ${cap:+--trials "$cap"} --emit-candidates "$dir/$dtype"
    done ;;
  ingest)
    for dtype in float32 float16; do
      convgen tune --target cuda:sm_90 --ingest "$dir/$dtype" --library convgen/schedules
    done ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
