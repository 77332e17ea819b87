"""Faults on a real QEMU and a real mount: nothing hangs, errors are prompt."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fakeqmp import FakeQMP, Tree
from tests.harness import ROOT, RawQMP, mounted, qemu_vm, qomfs_command, wait_for

#: Seconds a FUSE operation may take past the configured timeout (issue 13):
#: scheduling on a loaded machine.
SLACK = 2.0
#: qom-fuse's --timeout when none is given.
DEFAULT_TIMEOUT = 5.0


def timed_errno(func: object) -> tuple[int | None, float]:
    """Run ``func()``; return (errno or None, seconds it took)."""
    start = time.monotonic()
    try:
        func()  # type: ignore[operator]
    except OSError as err:
        return err.errno, time.monotonic() - start
    return None, time.monotonic() - start


def test_qemu_killed_mid_grep_then_back(tmp_path: Path) -> None:
    with qemu_vm(tmp_path) as vm, mounted(vm.socket, tmp_path / "mnt") as m:
        grep = subprocess.Popen(
            ["grep", "-r", ".", str(m.path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        time.sleep(0.3)
        vm.kill()
        # It finishes: no operation hangs.  (Its stderr is read as it goes:
        # one error line per file fills a pipe's 64 KiB and would block grep.)
        _, errors = grep.communicate(timeout=60)
        assert grep.returncode == 2 and b"Input/output error" in errors
        time.sleep(1.1)  # past the TTL, nothing is served from the cache
        for target in ("machine/type", "machine/q35/type", "objects"):
            code, took = timed_errno(lambda t=target: os.stat(m.path / t) and None)
            code2, took2 = timed_errno(lambda t=target: (m.path / t).read_bytes())
            assert code in (errno.EIO, errno.ENOTCONN), (target, code)
            assert code2 in (errno.EIO, errno.ENOTCONN, errno.EISDIR), (target, code2)
            assert took < DEFAULT_TIMEOUT + SLACK and took2 < DEFAULT_TIMEOUT + SLACK
        assert "connection lost" in m.logtext()

        # QEMU comes back on the same socket: the mount recovers by itself.
        with qemu_vm(tmp_path) as again:
            with again.qmp() as qmp:
                want = qmp.cmd("qom-get", path="/machine", property="type") + "\n"

            def works() -> bool:
                try:
                    return (m.path / "machine" / "type").read_text() == want
                except OSError:
                    return False

            wait_for(works, 10, "the mount to reconnect", interval=0.2)
            assert "reconnected" in m.logtext()


def test_listen_mode_is_race_free_and_survives_restarts(tmp_path: Path) -> None:
    sock = tmp_path / "listen.sock"
    client_mon = [
        "-chardev",
        f"socket,id=qomfs,path={sock},reconnect=1",
        "-mon",
        "chardev=qomfs,mode=control",
    ]
    with mounted(sock, tmp_path / "mnt", "--timeout", "2", listen=True) as m:
        assert sock.exists()  # the socket is there before QEMU starts
        code, took = timed_errno(lambda: (m.path / "machine").stat())
        assert code == errno.EIO and took < 2 + SLACK  # no QEMU yet: within the timeout
        for _ in range(2):  # QEMU, then another QEMU on the same socket
            with qemu_vm(tmp_path, client_mon) as vm:
                with vm.qmp() as qmp:
                    want = qmp.cmd("qom-get", path="/machine", property="type") + "\n"

                def works(w: str = want) -> bool:
                    try:
                        return (m.path / "machine" / "type").read_text() == w
                    except OSError:
                        return False

                wait_for(works, 10, "QEMU to connect to the listening socket", interval=0.2)
            time.sleep(1.1)
            code, took = timed_errno(lambda: (m.path / "machine" / "q35").stat())
            assert code == errno.EIO and took < 2 + SLACK


def test_sigstopped_qemu_times_out_serves_cache_and_recovers(tmp_path: Path) -> None:
    with (
        qemu_vm(tmp_path) as vm,
        mounted(vm.socket, tmp_path / "mnt", "--timeout", "1", "--ttl", "5") as m,
    ):
        cached = (m.path / "machine" / "type").read_text()
        os.kill(vm.proc.pid, signal.SIGSTOP)
        try:
            assert (m.path / "machine" / "type").read_text() == cached  # from the cache
            code, took = timed_errno(lambda: (m.path / "machine" / "graphics").read_bytes())
            assert code in (errno.ETIMEDOUT, errno.EIO), code
            assert 0.9 < took < 1 + SLACK
        finally:
            os.kill(vm.proc.pid, signal.SIGCONT)
        with vm.qmp() as qmp:
            graphics = qmp.cmd("qom-get", path="/machine", property="graphics")
        assert (m.path / "machine" / "graphics").read_text() == (
            "true\n" if graphics else "false\n"
        )


def test_kill_9_of_the_daemon_releases_the_mountpoint(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with qemu_vm(tmp_path) as vm:
        res = subprocess.run(
            [*qomfs_command(), "-s", str(vm.socket), str(mnt)],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert res.returncode == 0, res.stderr
        assert os.path.ismount(mnt)
        pids = subprocess.run(
            ["pgrep", "-f", f"qomfs -s {vm.socket} {mnt}"], capture_output=True, text=True
        ).stdout.split()
        assert len(pids) == 1, pids
        os.kill(int(pids[0]), signal.SIGKILL)
        wait_for(lambda: not os.path.ismount(mnt), 10, "auto_unmount to release the mountpoint")
        assert os.listdir(mnt) == []  # no "Transport endpoint is not connected"


@pytest.mark.parametrize("ttl", ["30"])
def test_device_deleted_drops_cache_and_new_objects_appear(tmp_path: Path, ttl: str) -> None:
    with qemu_vm(tmp_path, ["-device", "qemu-xhci,id=xhci"]) as vm:
        with vm.qmp() as qmp, mounted(vm.socket, tmp_path / "mnt", "--ttl", ttl) as m:
            peripheral = m.path / "machine" / "peripheral"
            qmp.cmd("device_add", driver="usb-kbd", id="kbd0")
            # A listing cached before the device came would hide it for 30 s,
            # so list only now: the device is there.
            assert "kbd0" in os.listdir(peripheral)
            assert (peripheral / "kbd0" / "realized").read_text() == "true\n"
            qmp.cmd("device_del", id="kbd0")
            # DEVICE_DELETED (no TTL wait: the TTL is 30 s) drops it at once.
            wait_for(lambda: "kbd0" not in os.listdir(peripheral), 1, "kbd0 to vanish")
            # The kernel may keep the name itself for its entry timeout (1 s).
            wait_for(lambda: not (peripheral / "kbd0").exists(), 1.5, "kbd0's dentry to go")
        with vm.qmp() as qmp, mounted(vm.socket, tmp_path / "mnt2", "--ttl", "1") as m:
            objects = m.path / "objects"
            assert "m1" not in os.listdir(objects)
            qmp.cmd("object-add", **{"qom-type": "memory-backend-ram", "id": "m1", "size": 1 << 20})
            wait_for(lambda: "m1" in os.listdir(objects), 3, "m1 to appear within the TTL")
            qmp.cmd("object-del", id="m1")
            wait_for(lambda: "m1" not in os.listdir(objects), 3, "m1 to vanish within the TTL")


def test_busy_monitor_does_not_hang_an_existing_client(tmp_path: Path) -> None:
    """A second client on qomfs's monitor waits; qomfs keeps working."""
    with qemu_vm(tmp_path) as vm, mounted(vm.socket, tmp_path / "mnt") as m:
        import socket as socketlib

        intruder = socketlib.socket(socketlib.AF_UNIX)
        intruder.connect(str(vm.socket))
        try:
            assert (m.path / "machine" / "type").read_text()
        finally:
            intruder.close()
        with RawQMP(vm.extra_sockets[0]) as qmp:
            assert qmp.cmd("qom-get", path="/machine", property="type")


# --- a misbehaving monitor under a real mount (issue 13, item 4) -----------------

FAULT_TREE: Tree = {
    "/": [{"name": "machine", "type": "child<pc-q35-7.2-machine>"}],
    "/machine": [
        {"name": "label", "type": "string", "value": "first"},
        *({"name": f"p{i}", "type": "string", "value": f"v{i}"} for i in range(8)),
    ],
}


def bounded_errno(func: Callable[[], object], limit: float) -> tuple[int | None, float]:
    """``timed_errno(func)`` on a thread; fails the test if it still runs
    after ``limit`` seconds (the operation hangs)."""
    out: list[tuple[int | None, float]] = []
    worker = threading.Thread(target=lambda: out.append(timed_errno(func)), daemon=True)
    worker.start()
    worker.join(limit + 5)
    assert out, f"the operation still hangs after {limit + 5:g} s"
    return out[0]


def write_value(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def test_a_monitor_that_stops_reading_or_sends_garbage(tmp_path: Path) -> None:
    """Every operation answers EIO or ETIMEDOUT within timeout + 2 s, even
    when the socket buffer is full; the mount works again once the monitor
    behaves."""
    timeout = 1.0
    limit = timeout + SLACK
    with (
        FakeQMP(FAULT_TREE) as fake,
        mounted(
            fake.path,
            tmp_path / "mnt",
            *("--timeout", str(timeout), "--connect-timeout", str(timeout)),
            *("--ttl", "30", "--no-readahead"),
        ) as m,
    ):
        machine = m.path / "machine"
        assert (machine / "label").read_text() == "first\n"
        fake.stop_reading()  # a stopped QEMU: nothing read, nothing answered
        # Values of 60 KB: a few of them fill the socket buffers, and a send
        # then blocks until its timeout.
        for i in range(6):
            code, took = bounded_errno(
                lambda i=i: write_value(machine / "label", "y" * 60_000), limit
            )
            assert code in (errno.EIO, errno.ETIMEDOUT), (i, code)
            assert took < 2 * limit, (i, took)  # a write and its flush, each bounded
        for name in ("p1", "p2"):
            code, took = bounded_errno(lambda n=name: (machine / n).read_bytes(), limit)
            assert code in (errno.EIO, errno.ETIMEDOUT) and took < limit, (name, code, took)

        fake.reading = True
        fake.rewrite = lambda msg, reply: [b"[1, 2]\r\n"]  # garbage for every command
        for name in ("p3", "p4"):
            code, took = bounded_errno(lambda n=name: (machine / n).read_bytes(), limit)
            assert code in (errno.EIO, errno.ETIMEDOUT) and took < limit, (name, code, took)

        fake.rewrite = None  # a good monitor again

        def works() -> bool:
            try:
                return (machine / "p5").read_text() == "v5\n"
            except OSError:
                return False

        wait_for(works, 10, "the mount to work again", interval=0.2)
        assert "connection lost" in m.logtext()
