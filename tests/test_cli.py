"""qom-fuse as a command: detaching, failing early and clearly, signals, options."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.harness import (
    ROOT,
    VM,
    Mount,
    RawQMP,
    mounted,
    qemu_vm,
    qomfs_command,
    require_fuse,
    unmount,
    wait_for,
)

ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def qom_fuse(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*qomfs_command(), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env or ENV,
        stdin=subprocess.DEVNULL,
    )


def daemon_pids(mountpoint: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"qomfs.*{mountpoint}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_background_mount_is_ready_on_return(vm: VM, workdir: Path) -> None:
    require_fuse()
    mnt = workdir / "mnt"
    mnt.mkdir()
    res = qom_fuse("-s", str(vm.socket), str(mnt))
    try:
        assert res.returncode == 0, res.stderr
        assert os.path.ismount(mnt)  # no waiting: it returned once ready
        with vm.qmp() as qmp:
            want = qmp.cmd("qom-get", path="/machine", property="type")
        assert (mnt / "machine" / "type").read_text() == want + "\n"
        assert daemon_pids(mnt)
    finally:
        unmount(mnt)
    wait_for(lambda: not daemon_pids(mnt), 10, "the daemon to exit after fusermount -u")


def test_qmp_socket_environment_variable(vm: VM, workdir: Path) -> None:
    require_fuse()
    mnt = workdir / "mnt"
    mnt.mkdir()
    res = qom_fuse(str(mnt), env=dict(ENV, QMP_SOCKET=str(vm.socket)))
    try:
        assert res.returncode == 0, res.stderr
        assert "machine" in os.listdir(mnt)
    finally:
        unmount(mnt)


def _assert_fails(args: list[str], mnt: Path, words: str) -> None:
    start = time.monotonic()
    res = qom_fuse(*args)
    assert res.returncode != 0
    assert words in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr  # one clear line
    assert not os.path.ismount(mnt)
    assert time.monotonic() - start < 15


def test_no_such_socket(workdir: Path) -> None:
    mnt = workdir / "mnt"
    mnt.mkdir()
    _assert_fails(["-s", str(workdir / "nope.sock"), str(mnt)], mnt, "no such socket")


def test_socket_nobody_listens_on(workdir: Path) -> None:
    mnt = workdir / "mnt"
    mnt.mkdir()
    path = workdir / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens
    _assert_fails(["-s", str(path), str(mnt)], mnt, "connection refused")


def test_peer_that_is_not_qmp(workdir: Path) -> None:
    mnt = workdir / "mnt"
    mnt.mkdir()
    path = workdir / "http.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        time.sleep(2)
        conn.close()

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    _assert_fails(["-s", str(path), str(mnt)], mnt, "does not speak QMP")
    server.close()


def test_busy_monitor(vm: VM, workdir: Path) -> None:
    mnt = workdir / "mnt"
    mnt.mkdir()
    with RawQMP(vm.socket):  # the monitor now serves this client only
        _assert_fails(
            ["--connect-timeout", "1", "-s", str(vm.socket), str(mnt)], mnt, "another client"
        )


def test_bad_mountpoints(vm: VM, workdir: Path, mnt: Mount) -> None:
    f = workdir / "file"
    f.write_text("x")
    _assert_fails(["-s", str(vm.socket), str(f)], f, "not a directory")
    _assert_fails(["-s", str(vm.socket), str(workdir / "missing")], workdir, "not a directory")
    res = qom_fuse("-s", str(vm.socket), str(mnt.path))
    assert res.returncode != 0 and "already a mount point" in res.stderr


def test_no_socket_given(workdir: Path) -> None:
    env = {k: v for k, v in ENV.items() if k != "QMP_SOCKET"}
    res = qom_fuse(str(workdir), env=env)
    assert res.returncode != 0 and "QMP_SOCKET" in res.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--ttl", "nan"],
        ["--ttl", "-1"],
        ["--timeout", "0"],
        ["--connect-timeout", "-2"],
        ["--timeout", "inf"],
        ["-o", "ttl=nan"],
        ["-o", "timeout=0"],
    ],
)
def test_bad_seconds(workdir: Path, args: list[str]) -> None:
    """A TTL or timeout that is no number of seconds is refused before QEMU
    is asked anything, naming the value."""
    mnt = workdir / "mnt"
    mnt.mkdir()
    res = qom_fuse("-s", str(workdir / "nope.sock"), *args, str(mnt))
    assert res.returncode == (2 if args[0].startswith("--") else 1), res.stderr
    value = args[1].split("=")[-1]
    assert f"'{value}'" in res.stderr.splitlines()[-1], res.stderr
    assert "no such socket" not in res.stderr  # (refused before it looks)
    assert not os.path.ismount(mnt)


def test_ttl_inf_is_a_snapshot(workdir: Path) -> None:
    """--ttl inf: what has been read is never asked again, even once the
    kernel's own one-second caches have expired."""
    with qemu_vm(workdir) as own, mounted(own.socket, workdir / "mnt", "--ttl", "inf") as m:
        names = sorted(p.name for p in (m.path / "machine").iterdir())
        value = (m.path / "machine" / "type").read_text()
        before = m.stats()["total"]
        time.sleep(1.2)
        assert sorted(p.name for p in (m.path / "machine").iterdir()) == names
        assert (m.path / "machine" / "type").read_text() == value
        assert m.stats()["total"] == before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(tmp_path_factory: pytest.TempPathFactory, sig: int) -> None:
    # A VM of its own: the module's VM monitor is held by the shared mount.
    work = tmp_path_factory.mktemp("sig")
    with qemu_vm(work) as own, mounted(own.socket, work / "mnt", check_exit=False) as m:
        m.proc.send_signal(sig)
        m.proc.wait(timeout=10)
        assert m.proc.returncode == 0, m.logtext()
        assert not os.path.ismount(m.path)


def test_read_only_mount_refuses_writes_before_qmp(vm: VM, workdir: Path) -> None:
    with qemu_vm(workdir / "ro") as own, mounted(own.socket, workdir / "mnt", "-o", "ro") as m:
        before = m.stats()["commands"]
        res = subprocess.run(
            ["bash", "-c", f"echo false > {m.path}/machine/graphics"],
            capture_output=True,
            text=True,
        )
        assert res.returncode != 0 and "Read-only file system" in res.stderr
        assert m.stats()["commands"].get("qom-set", 0) == before.get("qom-set", 0) == 0
        with own.qmp() as qmp:
            assert qmp.cmd("qom-get", path="/machine", property="graphics") is True


def test_ttl_zero_always_asks(workdir: Path) -> None:
    with qemu_vm(workdir) as own, mounted(own.socket, workdir / "mnt", "--ttl", "0") as m:
        path = m.path / "machine" / "type"
        path.read_text()
        before = m.stats()["commands"].get("qom-get", 0)
        for _ in range(5):
            path.read_text()
        assert m.stats()["commands"]["qom-get"] - before == 5


@pytest.mark.parametrize("how", [("--no-readahead",), ("-o", "no_readahead")])
def test_no_readahead(workdir: Path, how: tuple[str, ...]) -> None:
    """Reads in a row cost one command each, and nothing more is fetched."""
    with qemu_vm(workdir) as own, mounted(own.socket, workdir / "mnt", *how) as m:
        d = m.path / "machine"
        # scandir's types come with the listing: no stat, so no size fetched.
        names = sorted(e.name for e in os.scandir(d) if e.is_file(follow_symlinks=False))
        before = m.stats()["commands"].get("qom-get", 0)
        for name in names[:4]:  # neighbours, sorted: a walk, were read-ahead on
            with contextlib.suppress(OSError):
                (d / name).read_bytes()
        time.sleep(0.3)
        assert m.stats()["commands"]["qom-get"] - before == 4


def test_tcp_and_pretty_monitors(workdir: Path) -> None:
    """host:port sockets, and a pretty=on monitor's multi-line JSON."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    pretty = workdir / "pretty.sock"
    extra = [
        "-qmp",
        f"tcp:127.0.0.1:{port},server=on,wait=off",
        "-chardev",
        f"socket,id=pp,path={pretty},server=on,wait=off",
        "-mon",
        "chardev=pp,mode=control,pretty=on",
    ]
    with qemu_vm(workdir, extra) as own:
        wait_for(pretty.exists, 10, "the pretty monitor")
        with own.qmp() as qmp:
            want = qmp.cmd("qom-get", path="/machine", property="type") + "\n"
        with mounted(f"127.0.0.1:{port}", workdir / "tcp") as m:
            assert (m.path / "machine" / "type").read_text() == want
        with mounted(pretty, workdir / "pp") as m:
            assert (m.path / "machine" / "type").read_text() == want
            assert len(os.listdir(m.path / "machine" / "unattached")) > 10
