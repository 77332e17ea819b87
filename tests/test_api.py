"""The Python API (``qomfs.connect``) on real QEMUs: README's examples run as
written, every error is a QomfsError, calls from many threads get their own
answers, events come within their timeout, ``listen=True`` has no start race.

Expectations come from the VM's second monitor (the harness's RawQMP).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import qomfs
from qomfs.errors import (
    ConnectError,
    ConnectionLost,
    ExecuteError,
    InvalidValue,
    NotFound,
    QomfsError,
)
from tests.harness import QEMU, ROOT, VM, RawQMP, require_qemu
from tests.qemus import VERSIONS, any_qemu_vm

# README's "Python API" examples, verbatim (the lead pastes them from here).
EXAMPLE = """\
import qomfs

with qomfs.connect("/tmp/vm.sock") as vm:        # or "HOST:PORT"
    print(vm.get("/machine", "type"))            # pc-q35-7.2-machine
    vm.set("/machine", "graphics", False)
    for prop in vm.list("/machine/q35"):
        print(prop.name, prop.type)              # bus-number uint8 ...
    q35 = vm.tree("/machine/q35", depth=1)       # nested dicts, as qom-tree --format json
    print(sorted(q35["children"]))
    print(vm.execute("query-status")["status"])  # prelaunch
    vm.execute("cont")
    for event in vm.events(timeout=1):           # what QEMU sent, and more for 1 s
        print(event.name, event.data)            # RESUME {}
"""

EXAMPLE_LISTEN = """\
import subprocess
import qomfs

with qomfs.connect(listen=True) as vm:           # a private socket, QEMU connects to it
    qemu = subprocess.Popen(["qemu-system-x86_64", "-S", "-display", "none",
                             "-nodefaults", "-machine", "q35,accel=tcg",
                             "-qmp", f"unix:{vm.address}"])
    print(vm.get("/machine", "type"))            # waits for QEMU to connect
    vm.execute("quit")
    qemu.wait()
"""

ENV = os.environ | {"PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module", params=VERSIONS)
def qvm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VM]:
    with any_qemu_vm(request.param, tmp_path_factory.mktemp("vm"), "api") as machine:
        yield machine


@pytest.fixture(scope="module")
def raw(qvm: VM) -> Iterator[RawQMP]:
    with qvm.qmp() as q:
        yield q


def run_python(code: str) -> list[str]:
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=ENV
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    return res.stdout.splitlines()


def test_readme_example_runs_as_written(qvm: VM, raw: RawQMP) -> None:
    """The one change: the socket path is this VM's."""
    assert EXAMPLE.count('"/tmp/vm.sock"') == 1
    lines = run_python(EXAMPLE.replace('"/tmp/vm.sock"', repr(str(qvm.socket))))
    listed = raw.cmd("qom-list", path="/machine/q35")
    kids = sorted(p["name"] for p in listed if p["type"].startswith("child<"))
    want = [
        raw.cmd("qom-get", path="/machine", property="type"),
        *(f"{p['name']} {p['type']}" for p in listed),
        str(kids),
        "prelaunch",
    ]
    assert lines[: len(want)] == want
    assert "RESUME {}" in lines[len(want) :]
    assert raw.cmd("qom-get", path="/machine", property="graphics") is False
    assert raw.cmd("query-status")["status"] == "running"
    raw.cmd("stop")
    raw.cmd("qom-set", path="/machine", property="graphics", value=True)


def test_readme_listen_example_runs_as_written() -> None:
    require_qemu()
    if QEMU != "qemu-system-x86_64":
        pytest.skip(f"the example names qemu-system-x86_64, the tests use {QEMU}")
    lines = run_python(EXAMPLE_LISTEN)
    assert len(lines) == 1 and lines[0].startswith("pc-q35-")


def test_every_error_is_a_qomfs_error(qvm: VM, tmp_path: Path) -> None:
    with qomfs.connect(str(qvm.socket)) as vm:
        with pytest.raises(NotFound):
            vm.get("/machine/nope", "type")
        with pytest.raises(NotFound):
            vm.list("/machine/nope")
        with pytest.raises(InvalidValue) as bad:
            vm.set("/machine", "graphics", "yes")  # a string for a bool
        assert isinstance(bad.value.cause, ExecuteError)
        with pytest.raises(ExecuteError) as unknown:
            vm.execute("no-such-command")
        assert unknown.value.error_class == "CommandNotFound"
        with pytest.raises(ExecuteError) as wrong:
            vm.execute("qom-get", path="/machine", property="nope")
        assert wrong.value.error_class == "GenericError"
    with pytest.raises(ConnectError):
        qomfs.connect(str(tmp_path / "no.sock"))
    for err in (NotFound, InvalidValue, ExecuteError, ConnectError, ConnectionLost):
        assert issubclass(err, QomfsError) and issubclass(err, qomfs.QomfsError)


def test_threads_get_their_own_answers(qvm: VM, raw: RawQMP) -> None:
    """8 threads on one VM, each reading other properties: every answer is its own."""
    paths = [p["name"] for p in raw.cmd("qom-list", path="/machine") if p["type"] == "bool"]
    want = {name: raw.cmd("qom-get", path="/machine", property=name) for name in paths}
    problems: list[str] = []
    with qomfs.connect(str(qvm.socket)) as vm:

        def reader(k: int) -> None:
            for i in range(60):
                name = paths[(i + k) % len(paths)]
                got = vm.get("/machine", name)
                if got != want[name]:
                    problems.append(f"{name}: {got!r} != {want[name]!r}")
                typ = vm.execute("qom-get", path="/machine", property="type")
                if not str(typ).startswith("pc-q35-"):
                    problems.append(f"type: {typ!r}")

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert vm.client.command_counts().get("qom-get", 0) == 8 * 60 * 2
    assert problems == []


def test_events_wait_at_most_their_timeout(qvm: VM, raw: RawQMP) -> None:
    with qomfs.connect(str(qvm.socket)) as vm:
        start = time.monotonic()
        assert list(vm.events(timeout=0.3)) == []  # nothing happens: ends after 0.3 s
        assert time.monotonic() - start >= 0.3
        raw.cmd("cont")
        raw.cmd("stop")
        names: list[str] = []
        for event in vm.events(timeout=5):
            if event.name in ("RESUME", "STOP"):
                names.append(event.name)
            if len(names) == 2:
                break  # (the generator would wait out its 5 s for more)
        assert names == ["RESUME", "STOP"]


def test_tree_matches_qom_list(qvm: VM, raw: RawQMP) -> None:
    with qomfs.connect(str(qvm.socket)) as vm:
        top = vm.tree("/machine/q35", depth=1)
    assert top["type"] == raw.cmd("qom-get", path="/machine/q35", property="type")
    listed = raw.cmd("qom-list", path="/machine/q35")
    assert sorted(top["properties"]) == sorted(
        p["name"] for p in listed if not p["type"].startswith("child<")
    )
    for name, child in top["children"].items():
        assert child["type"] == raw.cmd("qom-get", path=child["path"], property="type"), name


def test_listen_without_qemu_waits_its_connect_timeout() -> None:
    with qomfs.connect(listen=True, connect_timeout=0.5) as vm:
        sock = vm.address
        assert os.path.exists(sock) and os.stat(sock).st_mode & 0o077 == 0
        start = time.monotonic()
        with pytest.raises(ConnectionLost):
            vm.get("/machine", "type")
        assert 0.5 <= time.monotonic() - start < 5
    assert not os.path.exists(os.path.dirname(sock))  # the private directory is gone


def test_usage_errors() -> None:
    with pytest.raises(ValueError):
        qomfs.connect()
    with pytest.raises(ValueError):
        qomfs.connect("/tmp/x.sock", listen=True)
    with pytest.raises(AttributeError):
        _ = qomfs.no_such_name  # type: ignore[attr-defined]
