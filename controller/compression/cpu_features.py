"""Which int8 range to quantize to on this CPU: the reduce_range decision, with its reason.

On x86-64 with AVX2/AVX-512 but without VNNI, onnxruntime's u8·s8 kernels use
VPMADDUBSW, whose 16-bit intermediate sums can saturate; quantizing weights to 7 bits
(``reduce_range=True``) avoids that at a small accuracy cost. CPUs with VNNI
(``avx512_vnni`` or ``avx_vnni``) and ARM's dot-product kernels do not saturate, so
there the full 8-bit range is kept. The decision is recorded with the artifact so a
result can be traced back to the machine that produced it.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

VNNI_FLAGS = ("avx512_vnni", "avx_vnni")
X86_MACHINES = ("x86_64", "amd64", "i386", "i686")


@dataclass(frozen=True)
class RangeChoice:
    reduce_range: bool
    reason: str


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first CPU listed in /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def choose_reduce_range(machine: str, cpuinfo: str | None) -> RangeChoice:
    """Decide reduce_range from the machine name and the /proc/cpuinfo text (None = unreadable)."""
    if machine.lower() not in X86_MACHINES:
        return RangeChoice(False, f"{machine}: not x86, no VPMADDUBSW saturation")
    if cpuinfo is None:
        return RangeChoice(True, f"{machine}: /proc/cpuinfo unreadable, assuming no VNNI")
    present = sorted(cpu_flags(cpuinfo) & set(VNNI_FLAGS))
    if present:
        return RangeChoice(False, f"{machine} with {'+'.join(present)}: full 8-bit range")
    return RangeChoice(True, f"{machine} without VNNI: 7-bit weights avoid u8s8 saturation")


def host_reduce_range(cpuinfo_path: Path = Path("/proc/cpuinfo")) -> RangeChoice:
    """The reduce_range choice for the machine this process runs on."""
    try:
        text: str | None = cpuinfo_path.read_text()
    except OSError:
        text = None
    return choose_reduce_range(platform.machine(), text)
