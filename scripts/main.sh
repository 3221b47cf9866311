#!/usr/bin/env bash
# The main job on the shipped default: quantize the real EfficientNet-Lite0 for the default
# board (rpi4-2gb) within its 1-point budget, calibrated on 100 offline natural images, ranked
# on the calibration pool and judged on held-out images never seen in calibration.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
A=$(.venv/bin/python -c 'from edgepack.assets import assets_dir; print(assets_dir())')
mkdir -p out
.venv/bin/edgepack quantize "$A/models/efficientnet-lite0.onnx" --target rpi4-2gb \
  --calib "$A/images/natural-calib" --calib-size 100 \
  --search "$A/images/natural-calib" --eval "$A/images/natural-eval" \
  -o out/efficientnet-lite0-int8.onnx "$@"
