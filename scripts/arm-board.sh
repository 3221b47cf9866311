#!/usr/bin/env bash
# An emulated Raspberry Pi 4 (aarch64, Cortex-A72) on this machine, for the device agent: Debian's
# qemu-user-static runs Debian's arm64 Python 3.11 out of a folder (no VM, no root file system),
# with PyPI's aarch64 wheels of what the agent needs on its path. Registries only: Debian packages
# (apt-get download + dpkg -x) and PyPI wheels (pip download --platform ... --only-binary=:all:).
#
#   bash scripts/arm-board.sh          # build once (about 70 MB of downloads, ~1 min), then a smoke check
#   bash scripts/arm-board.sh --check  # only the smoke check
#
# Idempotent: the board lives in $EDGEPACK_ASSETS/arm-board-v1 (default ~/.cache/edgepack/assets-v1)
# and a second run only sees its .done.json. The board's interpreter is ROOT/../bin/python3, a
# shell wrapper that starts qemu; it sets argv[0] to itself, so the agent's trial child process
# (sys.executable) goes through qemu as well. EDGEPACK_ARM_BOARD=0 skips this script.
#
# Versions (aarch64, cp311), and why:
#   onnxruntime 1.22.1  newer aarch64 wheels (1.28) die with SIGSEGV at import under qemu 7.2
#                       (Debian 12's); 1.22.1 imports and runs INT8 QDQ models.
#   numpy 2.4.6, cryptography 48.0.0, backports-zstd 1.8.0: the host's pins (pyproject.toml).
#   ai-edge-litert 2.1.6: the newest aarch64 wheel whose Interpreter works under qemu 7.2; 2.2.0 and
#                       2.3.0 (the host's pin) import but die with SIGSEGV creating an interpreter.
#   the rest: their runtime dependencies, pinned so the board does not change under a test.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${EDGEPACK_ARM_BOARD:-1}" = "0" ]; then
  echo "[arm-board] skipped (EDGEPACK_ARM_BOARD=0): no emulated aarch64 board" >&2
  exit 0
fi
A=${EDGEPACK_ASSETS:-$HOME/.cache/edgepack/assets-v1}
D="$A/arm-board-v1"
QEMU=/usr/bin/qemu-aarch64-static
PIP=${PIP:-.venv/bin/python -m pip}
HOSTPY=${HOSTPY:-.venv/bin/python}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
log() { echo "[arm-board] $*" >&2; }

# Debian arm64 packages: Python 3.11 and the shared libraries it and the wheels load.
DEBS_ARM64="libc6 libgcc-s1 libstdc++6 zlib1g libffi8 libssl3 libexpat1 libbz2-1.0 liblzma5 libsqlite3-0
  libuuid1 libcrypt1 libncursesw6 libtinfo6 libreadline8 libdb5.3 libnsl2 libtirpc3 libgssapi-krb5-2 libkrb5-3
  libk5crypto3 libkrb5support0 libcom-err2 libkeyutils1 python3.11 python3.11-minimal libpython3.11-minimal
  libpython3.11-stdlib"
DEBS_ALL="media-types"
WHEELS="numpy==2.4.6 cryptography==48.0.0 cffi==2.1.1 pycparser==3.12 backports-zstd==1.8.0
  onnxruntime==1.22.1 coloredlogs==15.0.1 humanfriendly==10.0 flatbuffers==25.12.19 packaging==26.4
  protobuf==7.36.2 sympy==1.14.0 mpmath==1.3.0
  ai-edge-litert==2.1.6 backports-strenum==1.2.8 tqdm==4.70.1 typing-extensions==4.16.0"
PLATFORMS="--platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux_2_17_aarch64
  --platform manylinux2014_aarch64"

smoke() {
  # imports, a signature, a zstd round trip, one model in ORT and LiteRT vs the host (one JSON line)
  "$HOSTPY" scripts/arm_smoke.py "$D"
}

if [ "${1:-}" = "--check" ]; then
  smoke
  exit 0
fi

if [ -f "$D/.done.json" ] && [ -x "$QEMU" ] && [ -x "$D/bin/python3" ]; then
  log "present in $D ($(tr -d '\n' < "$D/.done.json" | cut -c1-160))"
  exit 0
fi

if [ ! -x "$QEMU" ]; then
  log "apt-get install qemu-user-static"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends qemu-user-static >/dev/null
fi
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  log "dpkg --add-architecture arm64; apt-get update"
  $SUDO dpkg --add-architecture arm64
  $SUDO apt-get update -qq
fi
if ! apt-cache show python3.11:arm64 >/dev/null 2>&1; then
  $SUDO apt-get update -qq
fi

mkdir -p "$A"
T=$(mktemp -d "$A/.arm-board-XXXXXX")
trap 'rm -rf "$T"' EXIT
mkdir -p "$T/debs" "$T/board/root" "$T/board/bin" "$T/wheels"
log "apt-get download: python3.11 and its libraries (arm64)"
# apt's sandbox user must be able to write the download folder
chmod 777 "$T/debs"
(cd "$T/debs" && apt-get download -q $(for p in $DEBS_ARM64; do echo "$p:arm64"; done) $DEBS_ALL >/dev/null 2>"$T/apt.log") \
  || { cat "$T/apt.log" >&2; log "apt-get download failed"; exit 1; }
for d in "$T"/debs/*.deb; do dpkg -x "$d" "$T/board/root"; done
R="$T/board/root"
# Debian's site directories: empty in the board, so qemu never maps them to the host's x86 ones
mkdir -p "$R/usr/lib/python3/dist-packages" "$R/usr/local/lib/python3.11/dist-packages"
# byte-compile the standard library once on the host (same 3.11 bytecode) instead of on every start
"$HOSTPY" -m compileall -q -j 0 "$R/usr/lib/python3.11" >/dev/null 2>&1 || true

log "pip download: aarch64 wheels ($(echo $WHEELS | wc -w) pinned)"
$PIP download -q --no-deps --only-binary=:all: $PLATFORMS --python-version 3.11 -d "$T/wheels" $WHEELS 2> >(grep -v '^WARNING: Location' >&2)
$PIP install -q --no-index --no-deps --only-binary=:all: $PLATFORMS --python-version 3.11 --no-compile \
  --target "$T/board/site" "$T"/wheels/*.whl 2> >(grep -v '^WARNING: Location' >&2)
rm -rf "$T/board/site/bin"
"$HOSTPY" -m compileall -q -j 0 "$T/board/site" >/dev/null 2>&1 || true

# the board's interpreter: qemu with the folder as its library root; the environment is the board's
cat > "$T/board/bin/python3" <<'EOF'
#!/bin/sh
# The emulated board's python3 (written by scripts/arm-board.sh): Debian's arm64 Python 3.11 under
# qemu-user, Cortex-A72 (a Raspberry Pi 4). argv[0] is this script, so sys.executable (the agent's
# trial child) comes back here. -S: no site directories (they could map to the host's x86 ones).
D=$(cd "$(dirname "$0")/.." && pwd)
exec env -u PYTHONHOME -u PYTHONSTARTUP -u PYTHONSAFEPATH PYTHONPATH="$D/site" PYTHONNOUSERSITE=1 \
  QEMU_CPU=cortex-a72 QEMU_LD_PREFIX="$D/root" EDGEPACK_AGENT_EMULATOR=qemu-aarch64 \
  /usr/bin/qemu-aarch64-static -0 "$0" "$D/root/usr/bin/python3.11" -S "$@"
EOF
chmod +x "$T/board/bin/python3"
rm -rf "$D"
mv "$T/board" "$D"

log "smoke check"
if ! info=$(smoke); then
  mv "$D" "$D.failed-$(date +%s)"
  log "smoke check failed: the emulated board is not usable (left in $D.failed-*)"
  exit 1
fi
qv=$(dpkg-query -W -f '${Version}' qemu-user-static)
echo "$info" | "$HOSTPY" -c "import json,sys; d=json.load(sys.stdin); d['qemu']='$qv'; d['cpu']='cortex-a72'; print(json.dumps(d))" > "$D/.done.json"
log "ready: $D ($(cat "$D/.done.json"))"
