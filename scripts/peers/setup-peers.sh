#!/usr/bin/env bash
# Build one virtual environment per quantization peer, beside (never inside) edgepack's .venv:
#   .venv-nncf   NNCF (ONNX backend) with the onnx / onnxruntime it is run with here
#   .venv-aimet  AIMET-ONNX (needs torch; the CPU wheel, never a CUDA build)
# Idempotent: a venv whose stamp matches the pins below is left alone. PyPI only.
# A peer that cannot be installed leaves its exact pip error in .venv-<peer>.error, which
# scripts/bench_peers.py copies into bench-results/peers.json.
#
#   bash scripts/peers/setup-peers.sh [nncf|aimet ...]
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3.11}

# Pins (bump together, then rerun this script; bench_peers.py records what it found).
NNCF_PINS=(nncf==3.4.0 onnx==1.19.1 onnxruntime==1.23.2 numpy==2.2.6)
# aimet-onnx 2.42.0 is cp310-abi3 (Python >= 3.10), needs onnxruntime>=1.19 and torch;
# torch is pinned to the CPU wheel so pip never pulls a multi-GB CUDA build.
AIMET_PINS=(aimet-onnx==2.42.0 torch==2.13.0+cpu onnx==1.19.1 onnxruntime==1.23.2 numpy==2.2.6)

build() {  # build NAME PINS...
  local name=$1; shift
  local venv=.venv-$name stamp=".venv-$name/.edgepack-pins" want="$*"
  if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
    echo "[peers] $venv: present ($want)" >&2; return 0
  fi
  rm -rf "$venv" ".venv-$name.error"
  echo "[peers] $venv: installing $want" >&2
  "$PY" -m venv "$venv" || { echo "venv creation failed" > ".venv-$name.error"; return 1; }
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  local log; log=$(mktemp)
  if ! "$venv/bin/python" -m pip install -q "$@" >"$log" 2>&1; then
    grep -v 'is ignored: it is neither' "$log" | tail -40 > ".venv-$name.error"
    echo "[peers] $venv: pip install FAILED; error kept in .venv-$name.error:" >&2
    cat ".venv-$name.error" >&2; rm -f "$log"; return 1
  fi
  rm -f "$log"
  "$venv/bin/python" -m pip freeze > "$venv/.edgepack-freeze.txt" 2>/dev/null
  echo "$want" > "$stamp"
  echo "[peers] $venv: ready" >&2
}

rc=0
peers=("$@"); [[ ${#peers[@]} -eq 0 ]] && peers=(nncf aimet)
for p in "${peers[@]}"; do
  case $p in
    nncf)  build nncf "${NNCF_PINS[@]}" || rc=1 ;;
    aimet) build aimet "${AIMET_PINS[@]}" || rc=1 ;;
    *) echo "[peers] unknown peer $p (nncf, aimet)" >&2; exit 2 ;;
  esac
done
exit $rc
