#!/usr/bin/env bash
# The main job on the shipped default, end to end on the embedded local board:
#   1. quantize the real EfficientNet-Lite0 for rpi4-2gb within its budget (label-free held-out
#      images: top-1 agreement with FP32 >= the target's min_agreement, 97 %; the labelled
#      ImageNet samples' top-1 is reported beside it) (100 calibration images; selection on the
#      calibration pool; final figures on held-out natural images whose source photos were never
#      seen in calibration);
#   2. sign a release bundle with golden inputs for the board's health check (keys are made once
#      under out/keys: a 2-of-3 root and one release key);
#   3. bootstrap the local board (the agent as a subprocess, state under .edgepack/) and, when
#      scripts/arm-board.sh built it, the emulated Raspberry Pi 4 rpi4-emu (the agent zipapp under
#      qemu-aarch64, real ARM kernels; its timings are never judged), and push;
#   4. write the fleet report (out/fleet.html).
# Run it again to push the next release: the board already holds the previous one and gets a delta.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
EP=.venv/bin/edgepack
A=$(.venv/bin/python -c 'from edgepack.assets import assets_dir; print(assets_dir())')
mkdir -p out

echo "== 1/4 quantize" >&2
rc=0
$EP quantize "$A/models/efficientnet-lite0.onnx" --target rpi4-2gb \
  --calib "$A/images/natural-calib" --calib-size 100 \
  --search "$A/images/natural-calib" --eval "$A/images/natural-eval" --top1-eval "$A/images/imagenet" \
  -o out/efficientnet-lite0-int8.onnx "$@" || rc=$?
[ "$rc" -eq 0 ] || [ "$rc" -eq 4 ] || exit "$rc"   # 4: budget missed, the best model was still written
budget_missed=$rc
if [ "$budget_missed" -eq 4 ]; then
  echo "!! the quantized model MISSED its accuracy budget (see out/efficientnet-lite0-int8.json)." >&2
  if [ "${EDGEPACK_STRICT:-0}" = 1 ]; then echo "!! EDGEPACK_STRICT=1: not pushing it" >&2; exit 4; fi
  echo "!! pushing it anyway (push --accept-budget-miss) so the pipeline runs end to end; the main job exits 4 at the end" >&2
fi

echo "== 2/4 bundle" >&2
K=out/keys
if [ ! -f "$K/release-keys.json" ]; then
  $EP keys init-root "$K" >/dev/null
  $EP keys new-release-key "$K/release-1.key" >/dev/null
  $EP keys sign-release-keys --root "$K/root.json" --root-key "$K/root-1.key" --root-key "$K/root-2.key" \
    --key "$K/release-1.key.pub" --version 1 -o "$K/release-keys.json" >/dev/null
fi
prev=$(ls out/releases/*.bundle 2>/dev/null | sed 's/.*r\([0-9]*\)\.bundle/\1/' | sort -n | tail -1 || true)
rel=$(( ${prev:-0} + 1 ))
mkdir -p out/releases
$EP bundle out/efficientnet-lite0-int8.onnx --name efficientnet-lite0 --release "$rel" --version "1.0.$rel" \
  --target rpi4-2gb --key "$K/release-1.key" --release-keys "$K/release-keys.json" --root "$K/root.json" \
  --golden out/efficientnet-lite0-int8.golden.npz --quantize-report out/efficientnet-lite0-int8.json \
  -o "out/releases/r$rel.bundle"
if [ -n "${prev:-}" ]; then
  # a delta against the previous release, used when the board holds it
  $EP delta "out/releases/r$prev.bundle" "out/releases/r$rel.bundle" --key "$K/release-1.key" \
    --release-keys "$K/release-keys.json" --root "$K/root.json" -o "out/releases/r$prev-r$rel.delta.bundle" || true
fi

echo "== 3/4 push to the default boards (local; rpi4-emu, the emulated Pi 4, when set-up built it)" >&2
# bootstrap when a default board has no state yet (the emulated board may appear after a first run)
.venv/bin/python -c 'import os, sys; from edgepack.fleet import Fleet; sys.exit(any(not os.path.isdir(b.state) for b in Fleet.default().boards))' \
  || $EP fleet bootstrap --trust-root "$K/root.json"
delta_args=()
[ -f "out/releases/r${prev:-x}-r$rel.delta.bundle" ] && delta_args=(--delta "out/releases/r$prev-r$rel.delta.bundle")
# a board whose trial fails (e.g. the emulated Pi 4's ARM kernels disagree with the host's golden
# outputs) is rolled back there; the report is still written, then the push's exit code returned
# the bundle carries the quantize report: push refuses a budget-missing release (exit 4) unless
# told to accept it, which the main job does only after saying so above
accept_args=()
[ "$budget_missed" -eq 4 ] && accept_args=(--accept-budget-miss)
push_rc=0
$EP push "out/releases/r$rel.bundle" "${delta_args[@]}" "${accept_args[@]}" || push_rc=$?

echo "== 4/4 report" >&2
$EP fleet check --runs 20 || true
$EP report --html out/fleet.html
echo "done: out/efficientnet-lite0-int8.onnx, out/releases/r$rel.bundle, out/fleet.html" >&2
[ "$push_rc" -eq 0 ] || exit "$push_rc"
if [ "$budget_missed" -eq 4 ]; then
  echo "!! accuracy budget NOT met by the pushed model (out/efficientnet-lite0-int8.json): exit 4" >&2
  exit 4
fi
