"""What this board is: its CPU architecture, its runtimes' versions, and whether its timings are real.

An emulated board (the agent under qemu-user on an x86 host, see scripts/arm-board.sh) computes
with the real ARM kernels, so its outputs are the board's, but its clock is the emulator's: a
latency measured there says nothing about the board. Every report that carries a latency also
carries ``latency_source`` (``"hardware"`` or ``"emulator"``), and the trial does not hold an
emulated board to its latency budget.

Emulation is recognised two ways, either one enough: the board's launcher says so
(``EDGEPACK_AGENT_EMULATOR``, set by the emulated board's python3 wrapper), or the kernel says
the machine is ARM while /proc/cpuinfo describes an x86 CPU (qemu-user passes the host's through).
"""
from __future__ import annotations

import os
import platform
from typing import Any

ENV_EMULATOR = "EDGEPACK_AGENT_EMULATOR"
HARDWARE, EMULATOR = "hardware", "emulator"
_X86_MARKS = ("vendor_id\t: GenuineIntel", "vendor_id\t: AuthenticAMD", "vendor_id\t: HygonGenuine")


def emulator() -> str | None:
    """The emulator this agent runs under (e.g. ``qemu-aarch64``), or None on real hardware."""
    env = os.environ.get(ENV_EMULATOR, "").strip()
    if env:
        return env[:64]
    m = platform.machine().lower()
    if m.startswith(("aarch64", "arm")):
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                head = f.read(4096)
        except OSError:
            return None
        if any(mark in head for mark in _X86_MARKS):
            return f"qemu-{m}"
    return None


def latency_source() -> str:
    return EMULATOR if emulator() else HARDWARE


def runtime_versions() -> dict[str, str | None]:
    """Installed runtime distributions and their versions (no import: cheap on a slow board)."""
    import importlib.metadata as md
    out: dict[str, str | None] = {}
    for rt, dist in (("onnxruntime", "onnxruntime"), ("litert", "ai-edge-litert"), ("openvino", "openvino")):
        try:
            out[rt] = md.version(dist)
        except md.PackageNotFoundError:
            out[rt] = None
    return out


def machine_info() -> dict[str, Any]:
    """``machine``, ``emulator`` and ``latency_source`` for the agent's reports."""
    emu = emulator()
    return {"machine": platform.machine(), "emulator": emu, "latency_source": EMULATOR if emu else HARDWARE}


__all__ = ["emulator", "latency_source", "machine_info", "runtime_versions", "HARDWARE", "EMULATOR", "ENV_EMULATOR"]
