#!/usr/bin/env bash
# Regenerate the shipped CPU records in convgen/schedules/ for this machine's CPU:
# every layer of the ResNet-50 suite in both layouts, float32. One record serves
# both modes on CPU (conv's flip is packed into the weights), kept under corr.
# Run on a quiet machine (nothing else using the cores): the records keep the
# fastest candidate measured, so noise picks a worse one. Resumable: rerun
# after an interruption and only the unmeasured candidates are timed.
#   bash scripts/retune_records.sh [extra convgen tune flags, e.g. --method both]
set -euo pipefail
cd "$(dirname "$0")/.."
convgen tune --target llvm --suite resnet50 --mode corr --library convgen/schedules \
  --work-dir "${CONVGEN_TUNE_WORK:-$HOME/.cache/convgen/tune}" "$@"
