#!/usr/bin/env bash
# The llama.cpp peer of scripts/bench_llm.py (issue 15), never used by CI or the tests:
#   $LLAMA_VENV (default /work/venvs/llama)   llama-cpp-python built FROM SOURCE (pip --no-binary),
#   with llama.cpp's CPU backend compiled for this host (GGML_NATIVE: AVX2 here) and without the
#   multimodal library (LLAVA_BUILD=OFF: 140 compile steps instead of 193). Takes minutes
#   on 2 cores; run it under nice. The bench requantizes the stored GGUF with llama.cpp's own
#   quantizer through llama_cpp.llama_model_quantize (Q8_0, Q4_K_M, ...; --allow-requantize).
# Idempotent: a finished environment (stamp file) is kept.
set -euo pipefail
VENV=${LLAMA_VENV:-/work/venvs/llama}
VER=${LLAMA_CPP_PYTHON:-0.3.36}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ -f "$VENV/.edgepack-llama-$VER" ]; then
  echo "[setup-llama] $VENV ready (llama-cpp-python $VER)" >&2; exit 0
fi
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q numpy
echo "[setup-llama] building llama-cpp-python $VER from source (several minutes)" >&2
CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-2} CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DGGML_OPENMP=ON -DLLAVA_BUILD=OFF}" \
  "$VENV/bin/python" -m pip install -v --no-binary llama-cpp-python --no-cache-dir "llama-cpp-python==$VER" \
  > "$VENV.build.log" 2>&1 || { echo "[setup-llama] build failed, see $VENV.build.log" >&2; tail -20 "$VENV.build.log" >&2; exit 1; }
"$VENV/bin/python" -c 'import llama_cpp; print("llama_cpp", llama_cpp.__version__)'
touch "$VENV/.edgepack-llama-$VER"
echo "[setup-llama] ready: $VENV" >&2
