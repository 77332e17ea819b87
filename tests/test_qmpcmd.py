"""The one-shot ``qmp`` command: its output and argument rules without QEMU, its
connection and event wait on the fake monitor, and the issue's cases against real
QEMU 7.2 and 11.1 (checked through the VM's second monitor)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qomfs import qmpcmd
from qomfs.qmpcmd import argument_words, flatten, render
from tests.fakeqmp import FakeQMP, event
from tests.harness import VM, missing, qemu11_vm, qemu_vm
from tests.test_qemu11 import CHROOT, QEMU11

BIN = Path(sys.executable).parent
QMP = BIN / "qmp"


@pytest.fixture(scope="module", autouse=True)
def installed() -> None:
    if not QMP.exists():
        pytest.fail(f"{QMP} is missing: run .venv/bin/pip install -e .")


@pytest.fixture(scope="module")
def vm11(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VM]:
    with qemu11_vm(tmp_path_factory, "qmp") as vm:
        yield vm


def bash(script: str, env: dict[str, str] | None = None, timeout: float = 60) -> Any:
    """Run ``script`` in bash with the venv's tools first on PATH and no QMP variables."""
    full = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    full.pop("QMP_SOCKET", None)
    full.pop("QMP_PATH", None)
    full.update(env or {})
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=timeout, env=full
    )


def qmp(sock: Path | str, *args: str, env: dict[str, str] | None = None) -> Any:
    """``qmp -s SOCK ARGS...``."""
    line = " ".join(shlex.quote(a) for a in ["qmp", "-s", str(sock), *args])
    return bash(line, env=env)


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


# --- no QEMU ------------------------------------------------------------------------


def test_flatten_names_each_leaf() -> None:
    value = {"a": {"b": [{"c": 1}, {"c": None}]}, "s": "x y", "t": True, "e": {}}
    assert list(flatten(value)) == [
        ("a.b[0].c", 1),
        ("a.b[1].c", None),
        ("s", "x y"),
        ("t", True),
        ("e", {}),
    ]
    assert list(flatten([{"cpu-index": 0}, 5])) == [("item[0].cpu-index", 0), ("item[1]", 5)]
    assert list(flatten({})) == []
    assert list(flatten([])) == []


def test_render_strings_as_they_are_the_rest_as_json() -> None:
    value = {"status": "running", "running": False, "n": None, "s": "1.5", "f": 0.5}
    assert render(value, as_json=False, pretty=False) == (
        "status: running\nrunning: false\nn: null\ns: 1.5\nf: 0.5\n"
    )
    assert render({}, as_json=False, pretty=False) == ""
    assert render("pc-q35", as_json=False, pretty=False) == "pc-q35\n"
    hmp = "VM status: paused\r\nline 2\r\n"
    assert render(hmp, as_json=False, pretty=False) == "VM status: paused\nline 2\n"
    assert json.loads(render(hmp, as_json=True, pretty=False)) == hmp
    assert json.loads(render({}, as_json=True, pretty=False)) == {}
    out = render(value, as_json=False, pretty=True)
    assert json.loads(out) == value and "\n    " in out


def test_argument_words() -> None:
    words, wants_help = argument_words(["--a=1", "b.c=x", "--flag", "--d==e"])
    assert words == ["a=1", "b.c=x", "flag=true", "d==e"]
    assert not wants_help
    assert argument_words(["--x=1", "--help"]) == (["x=1"], True)
    for bad in ("plain", "-x", "-x=1", "--"):
        with pytest.raises(qmpcmd.UsageError):
            argument_words([bad])


def test_usage_errors_without_qemu(tmp_path: Path) -> None:
    r = bash("qmp query-status")
    assert r.returncode == 2 and one_line(r.stderr) == (
        "qmp: no QMP socket: give -s ADDR or set $QMP_SOCKET"
    )
    r = bash("qmp")
    assert r.returncode == 2 and "no COMMAND given" in r.stderr and "Traceback" not in r.stderr
    r = bash("qmp --timeout=-1 query-status")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = qmp(tmp_path / "none.sock", "query-status")
    assert r.returncode == 1
    assert one_line(r.stderr).startswith("qmp: cannot reach QEMU: ")


# --- the fake monitor: connections, commands, events --------------------------------

SCHEMA = [
    {"name": "cont", "meta-type": "command", "arg-type": "0", "ret-type": "0"},
    {"name": "query-status", "meta-type": "command", "arg-type": "0", "ret-type": "1"},
    {"name": "0", "meta-type": "object", "members": []},
    {"name": "1", "meta-type": "object", "members": [{"name": "status", "type": "str"}]},
    {"name": "str", "meta-type": "builtin", "json-type": "string"},
    {"name": "int", "meta-type": "builtin", "json-type": "int"},
    {"name": "set-size", "meta-type": "command", "arg-type": "2", "ret-type": "0"},
    {"name": "2", "meta-type": "object", "members": [{"name": "size", "type": "int"}]},
    {"name": "RESUME", "meta-type": "event", "arg-type": "0"},
]


def fake_monitor(after_reply: bool) -> FakeQMP:
    """A fake with SCHEMA; ``cont`` answers, and sends RESUME in the same write
    right after its reply (``after_reply``) or never."""
    fake = FakeQMP(commands=["qmp_capabilities", "query-qmp-schema", "cont", "query-status"])
    fake.commands.append("set-size")

    def rewrite(msg: dict[str, Any], reply: dict[str, Any]) -> list[dict[str, Any] | bytes]:
        ident = {"id": msg["id"]} if "id" in msg else {}
        name = msg.get("execute")
        if name == "query-qmp-schema":
            return [{"return": SCHEMA, **ident}]
        if name == "query-status":
            return [{"return": {"status": "running"}, **ident}]
        if name == "set-size":
            return [{"return": {}, **ident}]
        if name == "cont":
            out = json.dumps({"return": {}, **ident}) + "\r\n"
            if after_reply:
                out += json.dumps(event("RESUME", {})) + "\r\n"
            return [out.encode()]
        return [reply]

    fake.rewrite = rewrite
    return fake


def test_one_connection_and_one_schema_per_call(capsys: pytest.CaptureFixture[str]) -> None:
    with fake_monitor(after_reply=False) as fake:
        assert qmpcmd.main(["-s", fake.path, "query-status"]) == 0
        assert capsys.readouterr().out == "status: running\n"
        assert fake.connections == 1
        assert fake.command_counts() == {
            "qmp_capabilities": 1,
            "query-qmp-schema": 1,
            "query-status": 1,
        }


def test_a_misfit_value_is_not_sent(capsys: pytest.CaptureFixture[str]) -> None:
    with fake_monitor(after_reply=False) as fake:
        assert qmpcmd.main(["-s", fake.path, "set-size", "--size=4k"]) == 2
        err = capsys.readouterr().err
        assert one_line(err) == "qmp: set-size: size: needs an integer (int), got '4k'"
        assert "set-size" not in fake.command_counts()
        assert qmpcmd.main(["-s", fake.path, "set-size", "--size=0x1000"]) == 0
        assert fake.requests[-1]["arguments"] == {"size": 4096}


def test_a_schema_that_is_no_list_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with fake_monitor(after_reply=False) as fake:
        rewrite = fake.rewrite
        assert rewrite is not None

        def bad_schema(msg: dict[str, Any], reply: dict[str, Any]) -> list[dict[str, Any] | bytes]:
            if msg.get("execute") == "query-qmp-schema":
                return [{"return": {}, "id": msg["id"]}]
            return rewrite(msg, reply)

        fake.rewrite = bad_schema
        assert qmpcmd.main(["-s", fake.path, "query-status"]) == 1
        assert one_line(capsys.readouterr().err).startswith("qmp: query-qmp-schema: ")


def test_wait_takes_an_event_sent_with_the_reply(capsys: pytest.CaptureFixture[str]) -> None:
    with fake_monitor(after_reply=True) as fake:
        assert qmpcmd.main(["-s", fake.path, "--json", "--wait", "RESUME", "cont"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert json.loads(lines[0]) == {}
        assert json.loads(lines[1])["event"] == "RESUME"
        assert len(lines) == 2


def test_wait_times_out_within_its_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    with fake_monitor(after_reply=False) as fake:
        start = time.monotonic()
        status = qmpcmd.main(["-s", fake.path, "--timeout", "1", "--wait", "RESUME", "cont"])
        elapsed = time.monotonic() - start
        assert status == 1
        assert 1.0 <= elapsed < 2.0
        err = capsys.readouterr().err
        assert one_line(err) == "qmp: no RESUME event within 1 s"


# --- real QEMU ----------------------------------------------------------------------


def test_query_status_and_the_ways_to_name_the_socket(anyvm: VM) -> None:
    sock = str(anyvm.socket)
    r = qmp(sock, "query-status")
    assert r.returncode == 0, r.stderr
    assert "status: prelaunch" in r.stdout.splitlines()
    assert "running: false" in r.stdout.splitlines()
    for script, env in (
        ("qmp query-status", {"QMP_SOCKET": sock}),
        ("qmp query-status", {"QMP_PATH": sock}),
        (f"qmp --path={shlex.quote(sock)} query-status", {}),
        ("qmp query-status", {"QMP_SOCKET": sock, "QMP_PATH": "/nonexistent"}),
    ):
        r = bash(script, env=env)
        assert r.returncode == 0, (script, env, r.stderr)
        assert "status: prelaunch" in r.stdout.splitlines()


def test_bool_argument_reaches_qemu_as_false(anyvm: VM) -> None:
    with anyvm.qmp() as mon:
        mon.cmd("qom-set", path="/machine", property="graphics", value=True)
        r = qmp(anyvm.socket, "qom-set", "--path=/machine", "--property=graphics", "--value=false")
        assert r.returncode == 0, r.stderr
        assert r.stdout == ""  # an empty return prints nothing
        assert mon.cmd("qom-get", path="/machine", property="graphics") is False
        r = qmp(anyvm.socket, "qom-set", "path=/machine", "property=graphics", "--value")
        assert r.returncode == 0, r.stderr
        assert mon.cmd("qom-get", path="/machine", property="graphics") is True


def _node(mon: Any, name: str) -> dict[str, Any] | None:
    nodes = mon.cmd("query-named-block-nodes")
    return next((n for n in nodes if n["node-name"] == name), None)


def test_int_argument_makes_a_node_of_that_size(anyvm: VM) -> None:
    with anyvm.qmp() as mon:
        r = qmp(anyvm.socket, "blockdev-add", "--driver=null-co", "--node-name=n1", "--size=4096")
        assert r.returncode == 0, r.stderr
        try:
            node = _node(mon, "n1")
            assert node is not None and node["image"]["virtual-size"] == 4096
        finally:
            mon.cmd("blockdev-del", **{"node-name": "n1"})
        # dotted keys nest, key=value and --key=value mix
        r = qmp(
            anyvm.socket,
            "blockdev-add",
            "driver=raw",
            "--node-name=r1",
            "file.driver=null-co",
            "--file.size=8192",
            "--read-only",
        )
        assert r.returncode == 0, r.stderr
        try:
            node = _node(mon, "r1")
            assert node is not None and node["image"]["virtual-size"] == 8192 and node["ro"]
        finally:
            mon.cmd("blockdev-del", **{"node-name": "r1"})


def test_str_argument_stays_a_string(anyvm: VM) -> None:
    with anyvm.qmp() as mon:
        # QEMU refuses a number for data ("Invalid parameter type ... expected: string")
        r = qmp(anyvm.socket, "object-add", "--qom-type=secret", "--id=s42", "--data=42")
        assert r.returncode == 0, r.stderr
        try:
            objects = {p["name"] for p in mon.cmd("qom-list", path="/objects")}
            assert "s42" in objects
        finally:
            mon.cmd("object-del", id="s42")


def test_a_misfit_value_is_refused_before_sending(anyvm: VM) -> None:
    with anyvm.qmp() as mon:
        r = qmp(anyvm.socket, "blockdev-add", "--driver=null-co", "--node-name=bad", "--size=abc")
        assert r.returncode == 2
        line = one_line(r.stderr)
        assert "size" in line and "integer" in line, line
        r = qmp(anyvm.socket, "blockdev-add", "driver=null-co", "node-name=bad", "read-only=maybe")
        assert r.returncode == 2
        line = one_line(r.stderr)
        assert "read-only" in line and "boolean" in line, line
        assert _node(mon, "bad") is None


def test_flattened_list_and_json_output(anyvm: VM) -> None:
    r = qmp(anyvm.socket, "query-cpus-fast")
    assert r.returncode == 0, r.stderr
    assert "item[0].cpu-index: 0" in r.stdout.splitlines()
    r_json = qmp(anyvm.socket, "--json", "query-cpus-fast")
    r_pretty = qmp(anyvm.socket, "-p", "query-cpus-fast")
    assert len(r_json.stdout.splitlines()) == 1
    cpus = json.loads(r_json.stdout)
    assert cpus[0]["cpu-index"] == 0
    assert json.loads(r_pretty.stdout) == cpus
    assert len(r_pretty.stdout.splitlines()) > 1
    with anyvm.qmp() as mon:
        assert cpus == mon.cmd("query-cpus-fast")


def test_qemu_error_is_one_line_and_status_1(anyvm: VM) -> None:
    r = qmp(anyvm.socket, "qom-get", "--path=/machine/nope", "--property=type")
    assert r.returncode == 1
    assert r.stdout == ""
    assert one_line(r.stderr) == "qmp: DeviceNotFound: Device '/machine/nope' not found"


def test_help_from_the_schema(anyvm: VM) -> None:
    r = qmp(anyvm.socket, "help")
    assert r.returncode == 0, r.stderr
    names = r.stdout.splitlines()
    assert "qom-set" in names and "query-status" in names
    r = qmp(anyvm.socket, "help", "qom-set")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "qom-set"
    assert any(line.split() == ["value", "any"] for line in r.stdout.splitlines())
    assert qmp(anyvm.socket, "qom-set", "--help").stdout == r.stdout
    r = qmp(anyvm.socket, "help", "blockdev-add", "driver=null-co")
    assert any(line.split()[:1] == ["size"] for line in r.stdout.splitlines()), r.stdout
    r = qmp(anyvm.socket, "help", "nosuch")
    assert r.returncode == 2 and one_line(r.stderr)


def test_dispatch_to_qmp_program_on_path(anyvm: VM, tmp_path: Path) -> None:
    script = tmp_path / "qmp-hello"
    script.write_text('#!/bin/sh\necho "socket=$QMP_SOCKET args=$*"\nexit 3\n')
    script.chmod(0o755)
    path = f"{tmp_path}:{BIN}:{os.environ.get('PATH', '')}"
    r = qmp(anyvm.socket, "hello", "a", "--b=c", env={"PATH": path})
    assert r.returncode == 3, r.stderr
    assert r.stdout == f"socket={anyvm.socket} args=a --b=c\n"
    r = bash("qmp hello x", env={"PATH": path, "QMP_PATH": str(anyvm.socket)})
    assert r.stdout == f"socket={anyvm.socket} args=x\n"
    r = qmp(anyvm.socket, "nosuchthing", env={"PATH": path})
    assert r.returncode == 2
    assert one_line(r.stderr) == "qmp: no QMP command or qmp-COMMAND program named nosuchthing"


def test_qmp_shell_runs_as_qmp_shell(vm: VM) -> None:
    r = bash(f"echo query-status | qmp -s {shlex.quote(str(vm.socket))} shell")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["return"]["status"] in ("prelaunch", "paused", "running")


@pytest.mark.parametrize("version", ["7.2", "11.1"])
def test_wait_for_resume_after_cont(version: str, tmp_path: Path) -> None:
    if version == "11.1":
        if not (CHROOT / "usr/bin/qemu-system-x86_64").exists():
            missing(f"QEMU 11.1 chroot missing at {CHROOT} (run scripts/qemu11-setup)")
        ctx = qemu_vm(tmp_path, qemu=QEMU11, sock_dir=CHROOT / "tmp", name=f"qmpw{os.getpid()}")
    else:
        ctx = qemu_vm(tmp_path)
    with ctx as machine:
        r = qmp(machine.socket, "--wait", "RESUME", "cont")
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == "event: RESUME", r.stdout
        assert any(line.startswith("timestamp.seconds: ") for line in lines)
        r = qmp(machine.socket, "--json", "--wait", "stop,resume", "stop")
        assert r.returncode == 0, r.stderr
        out = r.stdout.splitlines()
        assert json.loads(out[0]) == {} and json.loads(out[1])["event"] == "STOP"
        # nothing comes: exit 1, one line, within the timeout (+1 s for the call itself)
        start = time.monotonic()
        r = qmp(machine.socket, "--timeout", "1", "--wait", "RESUME", "query-status")
        assert r.returncode == 1
        # bounded by the timeout (+3 s: a loaded machine starts Python slowly)
        assert time.monotonic() - start < 1 + 3
        assert one_line(r.stderr) == "qmp: no RESUME event within 1 s"
