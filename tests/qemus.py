"""The QEMUs the integration suite runs on: the host's 7.2 (Debian 12), Debian
13's own 10.0 and trixie-backports' 11.1 (the first with ``qom-list-get``),
the last two in chroots (scripts/qemu10-setup, scripts/qemu11-setup).

A test module parametrizes a fixture over :data:`VERSIONS` and starts its VM
with :func:`any_qemu_vm`; a missing QEMU fails in CI and skips elsewhere.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from tests.harness import QEMU, ROOT, VM, missing, qemu_vm

VERSIONS = ["7.2", "10.0", "11.1"]
QEMU10_ROOT = Path(os.environ.get("QOMFS_QEMU10_ROOT", "/var/lib/qomfs/trixie10"))
QEMU11_ROOT = Path(os.environ.get("QOMFS_QEMU11_ROOT", "/var/lib/qomfs/trixie"))
CHROOTS = {
    "10.0": (QEMU10_ROOT, [str(ROOT / "scripts" / "qemu10")], "scripts/qemu10-setup"),
    "11.1": (QEMU11_ROOT, [str(ROOT / "scripts" / "qemu11")], "scripts/qemu11-setup"),
}


def any_qemu_vm(version: str, workdir: Path, name: str) -> contextlib.AbstractContextManager[VM]:
    """A bare q35 (two monitors, as :func:`tests.harness.qemu_vm`) on QEMU ``version``.

    ``name`` names the sockets; in a chroot's shared /tmp it gets the pid.
    """
    if version == "7.2":
        return qemu_vm(workdir, qemu=[QEMU], name=name)
    root, cmd, setup = CHROOTS[version]
    if not (root / "usr/bin/qemu-system-x86_64").exists():
        missing(f"QEMU {version} chroot missing at {root} (run {setup})")
    return qemu_vm(workdir, qemu=cmd, sock_dir=root / "tmp", name=f"{name}{os.getpid()}")
