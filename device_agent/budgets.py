"""What a release may cost on this board, checked before a byte is written: storage, free disk,
RAM (from the model's size), a runtime that loads it, and a delta's base. Also the agent's own
memory figures (RSS now and peak), which the trial and bench report."""
from __future__ import annotations

import os
import resource
from pathlib import Path

from .agent_errors import BudgetExceeded, Incompatible
from .bundle import VerifiedManifest
from .runtime import choose_runtime
from .slots import Slots
from .state import BoardConfig

MiB = 1 << 20
RUNTIME_BASE_RAM_MB = 48.0  # runtime + agent baseline assumed by the RAM budget check (measured: docs/agent.md)
RAM_MODEL_FACTOR = 1.25     # weights are held once plus arena/prepacking headroom


def rss_mb() -> float:
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB
    except (OSError, ValueError, IndexError):
        return 0.0


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that across exec from the
    parent, so a small agent started by a big process would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def check_before_write(vm: VerifiedManifest, cfg: BoardConfig, slots: Slots, active: str | None, free: int) -> None:
    """Everything that can be refused before a byte is written."""
    m = vm.manifest
    total = sum(f.length for f in m.files)
    kept = slot_bytes(slots, active)
    if total + kept > cfg.storage_mb * MiB:
        raise BudgetExceeded(f"release {m.release} needs {total / MiB:.1f} MiB; with the active release "
                             f"({kept / MiB:.1f} MiB) that exceeds the board's storage budget {cfg.storage_mb} MiB")
    scratch = Slots.other(active) if active else "a"
    free = free + slot_bytes(slots, scratch)
    if total + 64 * 1024 > free:
        raise BudgetExceeded(f"release {m.release} needs {total / MiB:.2f} MiB but only {free / MiB:.2f} MiB "
                             f"is free on the board's state directory; nothing was written")
    models = [f for f in m.files if f.role == "model"]
    if not models:
        raise Incompatible(f"bundle release {m.release} carries no model file")
    biggest = max(f.length for f in models)
    need = biggest / MiB * RAM_MODEL_FACTOR + RUNTIME_BASE_RAM_MB
    if need > cfg.ram_budget_mb:
        raise BudgetExceeded(f"model needs about {need:.0f} MiB of RAM ({biggest / MiB:.1f} MiB weights x "
                             f"{RAM_MODEL_FACTOR} + {RUNTIME_BASE_RAM_MB:.0f} MiB runtime), the board's budget "
                             f"is {cfg.ram_budget_mb} MiB")
    for f in models:
        choose_runtime(Path(f.path), cfg.runtimes)
    if vm.kind == "delta":
        info = slots.info(active) if active else None
        if info is None or info.release != m.base_release or info.content_sha256 != m.base_content_sha256:
            raise Incompatible(f"delta bundle is against release {m.base_release}, this board runs "
                               f"{info.release if info else 'nothing'}; send the full bundle")

def slot_bytes(slots: Slots, slot: str | None) -> int:
    info = slots.info(slot) if slot else None
    return sum(int(f["length"]) for f in info.files) if info else 0

def free_bytes(path: Path) -> int:
    s = os.statvfs(path)
    return s.f_bavail * s.f_frsize
