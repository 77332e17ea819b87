"""Real QEMUs and real mounts for tests and benchmarks.

A missing QEMU or FUSE fails the test in CI (``CI`` set) and skips it, with
the reason, on a developer's machine.  Every wait is bounded; every VM is
killed and every mount unmounted in cleanup.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
QEMU = os.environ.get("QOMFS_QEMU", "qemu-system-x86_64")
#: The bare machine every issue talks about.
BARE_Q35 = ["-S", "-display", "none", "-nodefaults", "-machine", "q35,accel=tcg"]
STATS_XATTR = "user.qomfs.stats"


def missing(reason: str) -> None:
    """Fail in CI, skip elsewhere, and say why."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"CI needs this: {reason}")
    pytest.skip(reason)


def require_qemu(qemu: str = QEMU) -> None:
    if shutil.which(qemu) is None and not os.path.exists(qemu):
        missing(f"{qemu} is not installed (run scripts/install-deps)")


def require_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        missing("/dev/fuse is missing")
    if shutil.which("fusermount3") is None and shutil.which("fusermount") is None:
        missing("fusermount is not installed (run scripts/install-deps)")
    try:
        from qomfs import _fuse  # noqa: F401
    except (ImportError, OSError) as err:
        missing(f"no usable FUSE binding/library: {err}")


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class RawQMP:
    """A minimal, independent QMP client: the test's second opinion.

    Deliberately not qomfs's own client, so tests compare qomfs against
    something that shares none of its code.  Single-threaded.
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


@dataclass
class VM:
    """A QEMU started by a test, with its own QMP socket."""

    socket: Path
    proc: subprocess.Popen[bytes]
    log: Path
    extra_sockets: list[Path] = field(default_factory=list)

    def qmp(self) -> RawQMP:
        """A raw QMP connection on the VM's second (test-only) monitor."""
        return RawQMP(self.extra_sockets[0])

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
    """Start a QEMU with two QMP monitors: one for qomfs, one for the test.

    ``sock_dir`` is where the sockets appear on the host (a chroot's /tmp for
    a QEMU inside a chroot: then the paths given to QEMU are its /tmp).
    """
    cmd = list(qemu or [QEMU])
    require_qemu(cmd[0])
    host_dir = sock_dir or workdir
    host_dir.mkdir(parents=True, exist_ok=True)
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
            30,
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

    def logtext(self) -> str:
        return self.log.read_text(errors="replace")


def qomfs_command() -> list[str]:
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

    On exit: unmount, wait for the daemon, and assert it exited 0.
    """
    require_fuse()
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
            20,
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
    if check_exit:
        assert proc.returncode == 0, f"qom-fuse exited {proc.returncode}:\n{m.logtext()[-3000:]}"


def walk_qmp(qmp: RawQMP, root: str = "/") -> dict[str, list[dict[str, str]]]:
    """Every object path of the tree -> its qom-list, by plain QMP."""
    out: dict[str, list[dict[str, str]]] = {}
    todo = [root]
    while todo:
        path = todo.pop()
        props = qmp.cmd("qom-list", path=path)
        out[path] = props
        for p in props:
            if p["type"].startswith("child<"):
                todo.append(path.rstrip("/") + "/" + p["name"])
    return out


def expected_text(value: Any) -> str:
    """The documented text format, written independently of qomfs.values."""
    if value is True:
        return "true\n"
    if value is False:
        return "false\n"
    if isinstance(value, str):
        return value + "\n"
    if isinstance(value, int):
        return f"{value}\n"
    return json.dumps(value) + "\n"


def fs_path(mnt: Mount, qom_path: str) -> Path:
    return mnt.path / qom_path.lstrip("/")


def assert_mount_matches(mnt: Mount, qmp: RawQMP, tree: dict[str, list[dict[str, str]]]) -> None:
    """Every object, property and link of ``tree`` is in the mount, right.

    Values come from ``qmp`` (an independent client); a value that differs
    is read again from QEMU and must have moved on its own (rtc-time).
    """
    import pytest

    assert len(tree) > 200  # a bare q35 has ~250 objects
    checked = {"dir": 0, "link": 0, "file": 0, "unreadable": 0}
    for obj, props in tree.items():
        d = fs_path(mnt, obj)
        assert sorted(os.listdir(d)) == sorted(p["name"] for p in props), obj
        for p in props:
            path = d / p["name"]
            qom = posixpath.join(obj, p["name"])
            st = os.lstat(path)
            if p["type"].startswith("child<"):
                assert stat.S_ISDIR(st.st_mode), qom
                checked["dir"] += 1
                continue
            try:
                value = qmp.cmd("qom-get", path=obj, property=p["name"])
            except RuntimeError as err:
                with pytest.raises(OSError) as exc:
                    path.read_bytes()
                want = errno.EACCES if "not readable" in err.args[1] else errno.EIO
                assert exc.value.errno == want, (qom, err.args)
                checked["unreadable"] += 1
                continue
            if p["type"].startswith("link<"):
                assert stat.S_ISLNK(st.st_mode), qom
                target = os.readlink(path)
                if value:
                    assert target == posixpath.relpath(value, obj), qom
                    assert os.path.realpath(path) == str(fs_path(mnt, value)), qom
                else:
                    assert target == "(unset)"
                    assert not os.path.exists(path)  # dangling, by design
                checked["link"] += 1
                continue
            assert stat.S_ISREG(st.st_mode), qom
            text = path.read_text()
            if text != expected_text(value):
                # A few values move on their own (rtc-time, date), and the
                # mount may show one up to its TTL old: such a value must be
                # seen to change in QEMU itself within a second.
                time.sleep(1.1)
                again = qmp.cmd("qom-get", path=obj, property=p["name"])
                assert again != value, (qom, text, value)
            checked["file"] += 1
    assert checked["dir"] == len(tree) - 1
    assert checked["link"] > 200 and checked["file"] > 1000, checked
    assert checked["unreadable"] >= 1, checked
