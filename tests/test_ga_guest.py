"""qemu-ga-client end to end: a real Linux guest under TCG runs qemu-ga on virtio-serial.

The guest is Debian's kernel and an initramfs that ``scripts/ga-guest`` builds
from busybox and the host's qemu-ga (whose block list in the guest leaves
guest-exec and guest-file-open open for this test).  The client talks to it
through the VM's chardev socket, exactly as a user would.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ROOT, missing, qemu_vm
from tests.test_ga import cli, one_error_line, require_agent

#: Boot to a listening agent takes about 7 s here under TCG; the bound is for
#: a loaded machine.
BOOT_BOUND = 180.0


def build_guest(out: Path) -> tuple[Path, Path, str]:
    """The kernel, the initramfs, and the kernel's release (from its file name)."""
    require_agent()
    res = subprocess.run(
        [str(ROOT / "scripts" / "ga-guest"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if res.returncode != 0:
        missing(f"scripts/ga-guest could not build the guest: {res.stderr.strip()}")
    kernel, initrd = (Path(p) for p in res.stdout.split())
    found = re.search(r"^ga-guest: kernel (\S+)$", res.stderr, re.M)
    assert found, res.stderr
    return kernel, initrd, found.group(1)


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A booted guest: (the agent channel's socket, the guest kernel's release)."""
    work = tmp_path_factory.mktemp("ga-guest")
    kernel, initrd, release = build_guest(work / "guest")
    sock = work / "qga.sock"
    extra = [
        "-m",
        "256",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        "console=ttyS0 panic=-1 quiet",
        "-no-reboot",
        "-serial",
        f"file:{work / 'console.log'}",
        "-chardev",
        f"socket,path={sock},server=on,wait=off,id=qga0",
        "-device",
        "virtio-serial",
        "-device",
        "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
    ]
    with qemu_vm(work, extra) as vm:
        with vm.qmp() as qmp:
            qmp.cmd("cont")  # the harness starts every VM stopped (-S)
        deadline = time.monotonic() + BOOT_BOUND
        while True:
            res = cli("--address", str(sock), "--timeout", "2", "ping")
            if res.returncode == 0:
                break
            console = (work / "console.log").read_text(errors="replace")
            assert vm.proc.poll() is None, f"the guest died:\n{console[-3000:]}"
            assert time.monotonic() < deadline, f"no agent in the guest:\n{console[-3000:]}"
        yield str(sock), release


def test_ping_info_cat_exec_in_a_real_guest(guest: tuple[str, str]) -> None:
    sock, release = guest
    res = cli("--address", sock, "ping")
    assert (res.returncode, res.stdout, res.stderr) == (0, b"", b"")

    res = cli("--address", sock, "info")
    assert res.returncode == 0, res
    lines = res.stdout.decode().splitlines()
    assert lines[0].startswith("version: ")
    enabled = lines[2].removeprefix("\tenabled: ").split(", ")
    assert "guest-exec" in enabled and "guest-file-open" in enabled
    assert "guest-shutdown" in lines[3]  # blocked in the guest too

    res = cli("--address", sock, "cat", "/proc/version")
    assert res.returncode == 0, res
    assert res.stdout.startswith(f"Linux version {release} ".encode())
    assert res.stdout.endswith(b"\n") and not res.stdout.startswith(b"b'")

    res = cli("--address", sock, "exec", "--", "uname", "-r")
    assert (res.returncode, res.stdout, res.stderr) == (0, f"{release}\n".encode(), b"")
    res = cli("--address", sock, "exec", "--", "sh", "-c", "echo no >&2; exit 3")
    assert (res.returncode, res.stdout, res.stderr) == (3, b"", b"no\n")

    res = cli("--address", sock, "osinfo")
    assert f"kernel-release: {release}\n".encode() in res.stdout
    res = cli("--address", sock, "hostname")
    assert res.stdout == b"ga-guest\n"

    line = one_error_line(cli("--address", sock, "fsfreeze", "freeze"))
    assert "disabled" in line and sock in line
