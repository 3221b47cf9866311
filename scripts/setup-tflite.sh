#!/usr/bin/env bash
# The optional LiteRT converter environment for `edgepack quantize --format tflite`:
#   .venv-tflite       LiteRT's quantizer (ai-edge-quantizer, now also published as litert-quantizer),
#                      run by edgepack as a subprocess tool (edgepack/tflite/_aeq_tool.py). It pins
#                      ai-edge-litert 2.3.0 and scipy; no TensorFlow, no torch. About 1 minute.
#   --peer             also .venv-tflite-peer: TensorFlow (tensorflow-cpu) for the benchmark's peer,
#                      TensorFlow's own full-integer quantizer (scripts/bench_tflite.py). About 600 MB.
# Idempotent: a finished environment is kept. edgepack finds .venv-tflite beside the checkout, or
# the Python named by $EDGEPACK_TFLITE_PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

make_env() {  # make_env DIR STAMP PACKAGES...
  local dir=$1 stamp=$2; shift 2
  if [ -f "$dir/.edgepack-$stamp" ]; then return 0; fi
  echo "[setup-tflite] $dir: pip install $*" >&2
  rm -rf "$dir"
  "$PY" -m venv "$dir"
  "$dir/bin/python" -m pip install -q "$@"
  touch "$dir/.edgepack-$stamp"
}

make_env .venv-tflite aeq-0.10.0 ai-edge-quantizer==0.10.0 ai-edge-litert==2.3.0
.venv-tflite/bin/python -c 'import ai_edge_quantizer.quantizer' || { echo "[setup-tflite] .venv-tflite is broken: rm -rf .venv-tflite and re-run" >&2; exit 1; }
if [ "${1:-}" = "--peer" ]; then
  make_env .venv-tflite-peer tf-2.20.0 tensorflow-cpu==2.20.0
fi
echo "[setup-tflite] ready: $(.venv-tflite/bin/python -c 'import importlib.metadata as m; print("ai-edge-quantizer", m.version("ai-edge-quantizer"))')" >&2
