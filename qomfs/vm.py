"""Throwaway QEMUs and ``qom-fuse`` daemons: start one, wait for it, always clean up.

Shared by the test suite, ``scripts/bench`` and ``scripts/soak``; it never
imports pytest (a missing QEMU or FUSE raises :class:`Unavailable`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The directory that holds the ``qomfs`` package (the source tree's root
#: when qomfs runs from a checkout): a daemon started here imports the same
#: qomfs as its caller.
ROOT = Path(__file__).resolve().parent.parent
QEMU = os.environ.get("QOMFS_QEMU", "qemu-system-x86_64")
#: QEMU 11.1 in a chroot (made by scripts/qemu11-setup); paths given to it
#: are paths inside the chroot.
QEMU11_ROOT = Path(os.environ.get("QOMFS_QEMU11_ROOT", "/var/lib/qomfs/trixie"))
QEMU11 = [str(ROOT / "scripts" / "qemu11")]
#: The bare machine every issue talks about.
BARE_Q35 = ["-S", "-display", "none", "-nodefaults", "-machine", "q35,accel=tcg"]
STATS_XATTR = "user.qomfs.stats"
#: How long a VM's QMP sockets may take to appear, and a mount to come up.
VM_START_TIMEOUT = 30.0
MOUNT_TIMEOUT = 20.0


class Unavailable(RuntimeError):
    """What a VM or a mount needs is not installed here (the message says what)."""


def qemu_problem(qemu: str = QEMU) -> str | None:
    """Why ``qemu`` cannot be run here, or None."""
    if shutil.which(qemu) is None and not os.path.exists(qemu):
        return f"{qemu} is not installed (run scripts/install-deps)"
    return None


def qemu11_problem() -> str | None:
    """Why QEMU 11.1 (scripts/qemu11 and its chroot) cannot be run here, or None."""
    if not (QEMU11_ROOT / "usr/bin/qemu-system-x86_64").exists():
        return f"QEMU 11.1 chroot missing at {QEMU11_ROOT} (run scripts/qemu11-setup)"
    if not os.path.exists(QEMU11[0]):
        return f"{QEMU11[0]} is missing (it comes with qomfs' source tree)"
    return None


def fuse_problem() -> str | None:
    """Why a qomfs mount cannot work here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None and shutil.which("fusermount") is None:
        return "fusermount is not installed (run scripts/install-deps)"
    try:
        from qomfs import _fuse  # noqa: F401
    except (ImportError, OSError) as err:
        return f"no usable FUSE binding/library: {err}"
    return None


def wait_for(
    predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02
) -> None:
    """Poll ``predicate`` until it is true; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class RawQMP:
    """A minimal, blocking QMP client that shares no code with :mod:`qomfs.qmp`.

    The second opinion: tests compare qomfs against it, and the bench times
    it as the floor of a plain client.  Single-threaded; ``cmd`` raises
    RuntimeError(class, desc) for an error reply.
    """

    def __init__(self, path: str | Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""
        self.decoder = json.JSONDecoder()
        self.greeting = self._recv()
        self.count = 0
        self.cmd("qmp_capabilities")

    def _recv(self) -> dict[str, Any]:
        while True:
            text = self.buf.decode("utf-8", "replace").lstrip()
            if text:
                try:
                    obj, end = self.decoder.raw_decode(text)
                except json.JSONDecodeError:
                    pass
                else:
                    self.buf = text[end:].encode()
                    return obj  # type: ignore[no-any-return]
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("QMP socket closed")
            self.buf += data

    def cmd(self, name: str, **args: Any) -> Any:
        """Run a command; return its value or raise RuntimeError(class, desc)."""
        msg: dict[str, Any] = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode())
        self.count += 1
        while True:
            reply = self._recv()
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(reply["error"]["class"], reply["error"]["desc"])
            return reply["return"]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawQMP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def big_vm_args() -> list[str]:
    """A VM of ~5,000 objects; accepted by QEMU 7.2 and 11.1 with -S -nodefaults.

    16 CPUs; 12 PCIe root ports: 8 hold a NIC each, 4 hold a pcie-pci-bridge
    with 6 NICs behind it (32 NICs); 2,000 unused 1 MiB RAM backends.  It
    takes ~9 s to greet on QMP: connect with a long timeout.
    """
    args = ["-smp", "16", "-m", "4G"]
    for i in range(1, 13):
        args += ["-device", f"pcie-root-port,id=rp{i},chassis={i},bus=pcie.0"]
    for i in range(1, 9):
        nic = "e1000e" if i % 2 else "virtio-net-pci"
        args += ["-device", f"{nic},id=nic{i},bus=rp{i}"]
    for b in range(1, 5):
        args += ["-device", f"pcie-pci-bridge,id=br{b},bus=rp{8 + b}"]
        for slot in range(1, 7):
            nic = "e1000" if slot % 2 else "virtio-net-pci"
            args += ["-device", f"{nic},id=br{b}nic{slot},bus=br{b},addr={slot}"]
    for i in range(2000):
        args += ["-object", f"memory-backend-ram,id=m{i},size=1M"]
    return args


@dataclass
class VM:
    """A throwaway QEMU with its own QMP socket, and a second one for a raw client."""

    socket: Path
    proc: subprocess.Popen[bytes]
    log: Path
    extra_sockets: list[Path] = field(default_factory=list)

    def qmp(self, timeout: float = 10.0) -> RawQMP:
        """A raw QMP connection on the VM's second monitor (not the one qomfs uses)."""
        return RawQMP(self.extra_sockets[0], timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def qemu_vm(
    workdir: Path,
    extra: Sequence[str] = (),
    qemu: Sequence[str] | None = None,
    sock_dir: Path | None = None,
    name: str = "vm",
) -> Iterator[VM]:
    """Start a bare q35 (plus ``extra``) with two QMP monitors; kill it on exit.

    The first monitor is for qomfs, the second for a raw client.
    ``sock_dir`` is where the sockets appear on the host (a chroot's /tmp
    for a QEMU inside a chroot: then the paths given to QEMU are its /tmp).
    Raises Unavailable when the QEMU is not installed, RuntimeError when it
    exits at once (with the tail of its log).
    """
    cmd = list(qemu or [QEMU])
    problem = qemu_problem(cmd[0])
    if problem:
        raise Unavailable(problem)
    host_dir = sock_dir or workdir
    host_dir.mkdir(parents=True, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    qemu_dir = Path("/tmp") if sock_dir else workdir
    main_sock, test_sock = f"{name}.qmp", f"{name}-test.qmp"
    for s in (main_sock, test_sock):
        with contextlib.suppress(FileNotFoundError):
            (host_dir / s).unlink()
    log = workdir / f"{name}.log"
    args = [
        *cmd,
        *BARE_Q35,
        "-qmp",
        f"unix:{qemu_dir / main_sock},server=on,wait=off",
        "-qmp",
        f"unix:{qemu_dir / test_sock},server=on,wait=off",
        *extra,
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    vm = VM(host_dir / main_sock, proc, log, [host_dir / test_sock])
    try:
        socks = (vm.socket, *vm.extra_sockets)
        wait_for(
            lambda: proc.poll() is not None or all(p.exists() for p in socks),
            VM_START_TIMEOUT,
            "QEMU's QMP sockets",
        )
        if proc.poll() is not None:
            raise RuntimeError(f"QEMU exited {proc.returncode}: {log.read_text()[-2000:]}")
        yield vm
    finally:
        vm.kill()
        if sock_dir is not None:
            # A killed QEMU leaves its sockets; in a shared directory (the
            # chroot's /tmp) they would pile up run after run.
            for s in (main_sock, test_sock):
                with contextlib.suppress(FileNotFoundError):
                    (host_dir / s).unlink()


def qemu11_vm(
    workdir: Path, extra: Sequence[str] = (), name: str = "vm11"
) -> contextlib.AbstractContextManager[VM]:
    """:func:`qemu_vm` on QEMU 11.1 in its chroot; Unavailable when it is not set up.

    ``name`` should be unique on the machine: the sockets go to the
    chroot's shared /tmp.
    """
    problem = qemu11_problem()
    if problem:
        raise Unavailable(problem)
    return qemu_vm(workdir, extra, qemu=QEMU11, sock_dir=QEMU11_ROOT / "tmp", name=name)


def proc_status_kib(pid: int, key: str) -> int:
    """A ``/proc/PID/status`` field in KiB (``VmRSS``, ``VmHWM``), or 0 if absent."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


@dataclass
class Mount:
    """A running ``qom-fuse -f`` and its mountpoint."""

    path: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def stats(self) -> dict[str, Any]:
        """The daemon's counters (QMP commands by name, total, RSS)."""
        return json.loads(os.getxattr(self.path, STATS_XATTR))  # type: ignore[no-any-return]

    def commands(self) -> int:
        return int(self.stats()["total"])

    def settled_commands(self, quiet: float = 0.2, limit: float = 10.0) -> int:
        """The command total once the daemon's read-ahead has gone quiet."""
        total, deadline = self.commands(), time.monotonic() + limit
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = self.commands()
            if now == total:
                break
            total = now
        return total

    def rss_kib(self) -> int:
        """The daemon's resident memory now (VmRSS)."""
        return proc_status_kib(self.proc.pid, "VmRSS")

    def hwm_kib(self) -> int:
        """The daemon's peak resident memory so far (VmHWM)."""
        return proc_status_kib(self.proc.pid, "VmHWM")

    def logtext(self) -> str:
        return self.log.read_text(errors="replace")


def use_venv(script: str) -> None:
    """Re-run ``script`` (with the same arguments) under the source tree's
    ``.venv`` when this Python has no FUSE binding: the daemons it starts run
    with ``sys.executable`` and must be able to mount."""
    venv = ROOT / ".venv" / "bin" / "python"
    if Path(sys.executable) == venv or not venv.exists():
        return
    if importlib.util.find_spec("mfusepy") or importlib.util.find_spec("fuse"):
        return
    os.execv(venv, [str(venv), script, *sys.argv[1:]])


def qomfs_command() -> list[str]:
    """How to run ``qom-fuse`` with this interpreter and this qomfs."""
    return [sys.executable, "-m", "qomfs"]


def unmount(path: Path) -> None:
    tool = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount"
    subprocess.run([tool, "-u", "-z", str(path)], capture_output=True, timeout=30)


@contextlib.contextmanager
def mounted(
    socket_path: Path | str,
    mountpoint: Path,
    *args: str,
    env: dict[str, str] | None = None,
    check_exit: bool = True,
    listen: bool = False,
) -> Iterator[Mount]:
    """Run ``qom-fuse -f -v`` in a subprocess; yield once the mount is up.

    On exit: unmount, wait for the daemon, and (``check_exit``) raise
    AssertionError unless it exited 0.  Raises Unavailable when FUSE is not
    usable here, RuntimeError when the daemon exits before mounting.
    """
    problem = fuse_problem()
    if problem:
        raise Unavailable(problem)
    mountpoint.mkdir(parents=True, exist_ok=True)
    log = mountpoint.parent / f"{mountpoint.name}.log"
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    how = "--listen" if listen else "-s"
    cmd = [*qomfs_command(), "-f", "-v", how, str(socket_path), str(mountpoint), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env)
    m = Mount(mountpoint, proc, log)
    try:
        wait_for(
            lambda: proc.poll() is not None or os.path.ismount(mountpoint),
            MOUNT_TIMEOUT,
            f"the mount on {mountpoint}",
        )
        if proc.poll() is not None:
            raise RuntimeError(f"qom-fuse exited {proc.returncode}: {m.logtext()[-2000:]}")
        yield m
    finally:
        if proc.poll() is None:
            unmount(mountpoint)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
                unmount(mountpoint)
                raise
    if check_exit and proc.returncode != 0:
        raise AssertionError(f"qom-fuse exited {proc.returncode}:\n{m.logtext()[-3000:]}")
