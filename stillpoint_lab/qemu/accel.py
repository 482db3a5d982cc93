"""How QEMU runs guest code on this machine: KVM only where the CPU really has VT-x/AMD-V.

`/dev/kvm` alone proves nothing: the CI machines have kvm-pvm (a software KVM for hosts
without VMX/SVM) on which `-accel kvm -cpu host` aborts and a stock Debian kernel hangs
(../../../shared/LAB-QEMU.md §0). So KVM is used only when `/proc/cpuinfo` lists `vmx` or
`svm` and /dev/kvm opens; otherwise TCG with a bounded translation cache (`tb-size=128`:
without it a 1 GiB guest's QEMU takes 1.4-2.2 GB RSS) and the plain `qemu64` CPU: with
`max`, QEMU 7.2's TCG offers AVX2, glibc picks its AVX2 string and memory routines, and
TCG emulates them slowly. Measured on the lab's Debian guest, idle machine: boot to SSH 47 s
with `max`, 24 s with `qemu64`; an application-consistent incremental backup 26 s and 11.5 s.
STILLPOINT_LAB_TCG_CPU overrides the model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
KVM_DEV = Path("/dev/kvm")
TCG_ARGV = ["-accel", "tcg,tb-size=128", "-cpu", "qemu64"]
KVM_ARGV = ["-accel", "kvm", "-cpu", "host"]


def cpu_has_virt(cpuinfo: str) -> bool:
    """Whether a /proc/cpuinfo text shows hardware virtualisation (vmx or svm flags)."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and re.search(r"\b(vmx|svm)\b", line):
            return True
    return False


def kvm_usable(cpuinfo_path: Path = CPUINFO, kvm_dev: Path = KVM_DEV) -> bool:
    try:
        text = cpuinfo_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return cpu_has_virt(text) and os.access(kvm_dev, os.R_OK | os.W_OK)


def accel_argv(*, force: str | None = None) -> list[str]:
    """QEMU's -accel/-cpu arguments for this machine (`force`: "kvm" or "tcg")."""
    choice = force or os.environ.get("STILLPOINT_LAB_ACCEL") or (
        "kvm" if kvm_usable() else "tcg")
    if choice == "kvm":
        return list(KVM_ARGV)
    cpu = os.environ.get("STILLPOINT_LAB_TCG_CPU")
    return [*TCG_ARGV[:-1], cpu] if cpu else list(TCG_ARGV)
