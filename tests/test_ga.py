"""qemu-ga-client against the real qemu-ga, run on this host with a block list.

A qemu-ga started here acts on this machine, so every agent these tests start
blocks every command outside a small allow list of readers (computed from
``qemu-ga -b help``, so a writer that a newer agent adds is blocked too), and
the block list is checked through the agent's own guest-info before a test
sends anything that would change the host.  Expectations come from the host
itself or from raw JSON sent to the agent, never from the client under test.
A fake agent on a socket injects the faults the real one will not produce.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qomfs.ga import AgentClient, AgentCommandError, AgentTimeout
from qomfs.ga.client import LONG_TIMEOUTS, NO_REPLY, timeout_for
from qomfs.ga.main import main, read_file
from tests.harness import ROOT, missing, qemu_vm, wait_for

QGA = os.environ.get("QOMFS_QEMU_GA") or shutil.which("qemu-ga") or "/usr/sbin/qemu-ga"
SOCAT = shutil.which("socat") or "/usr/bin/socat"
ENV = {k: v for k, v in os.environ.items() if k != "QGA_CLIENT_ADDRESS"} | {"PYTHONPATH": str(ROOT)}

#: The only commands the host's agent may run: each reads and changes nothing.
READERS = re.compile(
    r"guest-(sync-delimited|sync|ping|info|get-.*|network-get-interfaces"
    r"|fsfreeze-status|file-read|file-close|exec-status|ssh-get-authorized-keys)"
)
#: For ``cat``: guest-file-open also creates and truncates files (modes w, a),
#: so only this agent has it, and the client opens with mode r.
FILE_READER = frozenset(
    {"guest-sync-delimited", "guest-sync", "guest-ping", "guest-info"}
    | {"guest-file-open", "guest-file-read", "guest-file-close"}
)
#: For ``exec``: guest-exec and what a client needs around it, nothing else.
EXECUTOR = frozenset(
    {"guest-sync-delimited", "guest-sync", "guest-ping", "guest-info"}
    | {"guest-exec", "guest-exec-status"}
)
#: The writers issue 16 names; each must be blocked wherever the agent has it.
WRITERS = frozenset(
    {
        "guest-shutdown",
        "guest-suspend-disk",
        "guest-suspend-ram",
        "guest-suspend-hybrid",
        "guest-fsfreeze-freeze",
        "guest-fsfreeze-freeze-list",
        "guest-fsfreeze-thaw",
        "guest-fstrim",
        "guest-set-time",
        "guest-set-user-password",
        "guest-set-vcpus",
        "guest-set-memory-blocks",
        "guest-file-write",
        "guest-exec",
        "guest-ssh-add-authorized-keys",
        "guest-ssh-remove-authorized-keys",
    }
)


def require_agent() -> None:
    if not os.access(QGA, os.X_OK):
        missing(f"{QGA} is not installed (qemu-guest-agent; run scripts/install-deps)")


def agent_rpcs() -> list[str]:
    """Every command this qemu-ga knows (``-b help``)."""
    out = subprocess.run([QGA, "-b", "help"], capture_output=True, text=True, timeout=30)
    rpcs = out.stdout.split()
    assert out.returncode == 0 and "guest-ping" in rpcs, out
    return rpcs


def agent_version() -> str:
    out = subprocess.run([QGA, "--version"], capture_output=True, text=True, timeout=30)
    found = re.search(r"QEMU Guest Agent (\S+)", out.stdout)
    assert found, out.stdout
    return found.group(1)


@dataclass
class Agent:
    """A qemu-ga on this host, listening on a unix socket."""

    sock: Path
    proc: subprocess.Popen[bytes]
    log: Path
    blocked: frozenset[str]

    @property
    def address(self) -> str:
        return str(self.sock)


@contextlib.contextmanager
def host_agent(
    workdir: Path, allow: Callable[[str], bool], exec_test: bool = False
) -> Iterator[Agent]:
    """qemu-ga in unix-listen mode, with every command that ``allow`` refuses blocked.

    Only the exec test (``exec_test``) may leave guest-exec open.
    """
    require_agent()
    rpcs = agent_rpcs()
    blocked = frozenset(r for r in rpcs if not allow(r))
    # Never without the block list: every writer this agent has is on it.
    must_block = WRITERS - {"guest-exec"} if exec_test else WRITERS
    assert blocked >= must_block & set(rpcs), sorted(must_block & set(rpcs) - blocked)
    workdir.mkdir(parents=True, exist_ok=True)
    state = workdir / "state"
    state.mkdir(exist_ok=True)
    sock, log = workdir / "qga.sock", workdir / "qga.log"
    cmd = [QGA, "-m", "unix-listen", "-p", str(sock), "-t", str(state)]
    cmd += ["-f", str(workdir / "qga.pid"), "-l", str(log), "-b", ",".join(sorted(blocked))]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: proc.poll() is not None or sock.exists(), 10, "qemu-ga's socket")
        assert proc.poll() is None, log.read_text() if log.exists() else "qemu-ga exited"
        yield Agent(sock, proc, log, blocked)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def raw_call(address: str, command: str, **arguments: Any) -> Any:
    """One command on a fresh connection, by hand: the tests' second opinion."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(address)
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        s.sendall(json.dumps(msg).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            data = s.recv(65536)
            assert data, "the agent closed the connection"
            buf += data
    reply = json.loads(buf)
    assert "return" in reply, reply
    return reply["return"]


def enabled(agent: Agent) -> dict[str, bool]:
    """guest-info's view of the agent: command -> enabled."""
    info = raw_call(agent.address, "guest-info")
    return {c["name"]: c["enabled"] for c in info["supported_commands"]}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """``qemu-ga-client ARGS`` in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "qomfs.ga", *args],
        capture_output=True,
        timeout=120,
        env=env or ENV,
        stdin=subprocess.DEVNULL,
    )


def one_error_line(res: subprocess.CompletedProcess[bytes], status: int = 1) -> str:
    """The run failed with ``status``, printed nothing, and said why in one line."""
    assert res.returncode == status, res
    assert res.stdout == b""
    lines = res.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qemu-ga-client: "), res.stderr
    assert b"Traceback" not in res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """The readers-only agent most tests share."""
    with host_agent(
        tmp_path_factory.mktemp("qga"), lambda r: READERS.fullmatch(r) is not None
    ) as a:
        yield a


@pytest.fixture(scope="module")
def file_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    with host_agent(tmp_path_factory.mktemp("qga-file"), FILE_READER.__contains__) as a:
        yield a


# --- the block lists ----------------------------------------------------------------


def test_every_writer_is_disabled_in_the_agent(agent: Agent) -> None:
    state = enabled(agent)
    present = WRITERS & set(state)
    assert "guest-shutdown" in present and "guest-fsfreeze-freeze" in present
    assert not any(state[w] for w in present), {w for w in present if state[w]}
    # What stays open reads only.
    assert all(READERS.fullmatch(name) for name, on in state.items() if on)
    assert state["guest-ping"] and state["guest-get-osinfo"]


def test_the_exec_agent_leaves_only_exec_open(tmp_path: Path) -> None:
    with host_agent(tmp_path, EXECUTOR.__contains__, exec_test=True) as a:
        state = enabled(a)
    assert {name for name, on in state.items() if on} == EXECUTOR & set(state)
    assert state["guest-exec"] and state["guest-exec-status"]


# --- upstream's commands -------------------------------------------------------------


def test_ping_answers_quietly(agent: Agent) -> None:
    res = cli("--address", agent.address, "ping")
    assert (res.returncode, res.stdout, res.stderr) == (0, b"", b"")
    res = cli("--address", agent.address, "ping", "3")
    assert (res.returncode, res.stdout, res.stderr) == (0, b"", b"")


def test_address_from_the_environment(agent: Agent) -> None:
    res = cli("hostname", env=ENV | {"QGA_CLIENT_ADDRESS": agent.address})
    assert res.returncode == 0, res
    assert res.stdout.decode() == socket.gethostname() + "\n"


def test_info_shows_the_agents_version_and_commands(agent: Agent) -> None:
    res = cli("--address", agent.address, "info")
    assert res.returncode == 0, res
    lines = res.stdout.decode().splitlines()
    assert lines[0] == f"version: {agent_version()}"
    assert lines[1] == "supported_commands:"
    state = enabled(agent)
    assert lines[2].startswith("\tenabled: ") and lines[3].startswith("\tdisabled: ")
    assert set(lines[2].removeprefix("\tenabled: ").split(", ")) == {
        n for n, on in state.items() if on
    }
    assert set(lines[3].removeprefix("\tdisabled: ").split(", ")) == {
        n for n, on in state.items() if not on
    }


def test_info_json_is_the_agents_reply(agent: Agent) -> None:
    res = cli("--address", agent.address, "--json", "info")
    assert res.returncode == 0, res
    assert json.loads(res.stdout) == raw_call(agent.address, "guest-info")


def test_cat_writes_the_files_bytes_unchanged(file_agent: Agent, tmp_path: Path) -> None:
    # Binary, not UTF-8, no final newline, and larger than one guest-file-read.
    data = bytes(range(256)) * 9000 + b"\xff\xfe last line without newline"
    path = tmp_path / "blob"
    path.write_bytes(data)
    res = cli("--address", file_agent.address, "cat", str(path))
    assert (res.returncode, res.stderr) == (0, b"")
    assert res.stdout == data
    small = tmp_path / "small"
    small.write_text("one\ntwo\n")
    res = cli("--address", file_agent.address, "cat", str(small))
    assert res.stdout == b"one\ntwo\n"  # not b'one\ntwo\n' as upstream prints
    res = cli("--address", file_agent.address, "--json", "cat", str(small))
    assert json.loads(res.stdout)["buf-b64"] == base64.b64encode(b"one\ntwo\n").decode()


def test_cat_of_a_missing_file_says_so(file_agent: Agent, tmp_path: Path) -> None:
    res = cli("--address", file_agent.address, "cat", str(tmp_path / "nope"))
    line = one_error_line(res)
    assert "guest-file-open" in line and str(tmp_path / "nope") in line
    assert file_agent.address in line and "No such file" in line


def test_fsfreeze_status(agent: Agent) -> None:
    res = cli("--address", agent.address, "fsfreeze", "status")
    assert (res.returncode, res.stdout) == (0, b"thawed\n"), res
    res = cli("--address", agent.address, "--json", "fsfreeze", "status")
    assert json.loads(res.stdout) == raw_call(agent.address, "guest-fsfreeze-status") == "thawed"


def test_ifconfig_lists_lo(agent: Agent) -> None:
    res = cli("--address", agent.address, "ifconfig")
    assert res.returncode == 0, res
    text = res.stdout.decode()
    assert "lo:\n\tinet 127.0.0.1  netmask 255.0.0.0\n" in text
    names = [line[:-1] for line in text.splitlines() if not line.startswith("\t")]
    assert sorted(names) == sorted(os.listdir("/sys/class/net"))


def test_blocked_commands_fail_with_a_clear_line(agent: Agent) -> None:
    state = enabled(agent)
    cases = {
        ("fsfreeze", "freeze"): "guest-fsfreeze-freeze",
        ("fsfreeze", "thaw"): "guest-fsfreeze-thaw",
        ("fstrim",): "guest-fstrim",
        ("shutdown",): "guest-shutdown",
        ("reboot",): "guest-shutdown",
        ("suspend", "ram"): "guest-suspend-ram",
        ("exec", "--", "true"): "guest-exec",
    }
    for args, rpc in cases.items():
        # Checked first: these would act on this host.
        assert state[rpc] is False, rpc
        line = one_error_line(cli("--address", agent.address, *args))
        assert line.startswith(f"qemu-ga-client: {rpc}: ") and "disabled" in line, line
        assert agent.address in line


# --- beyond upstream -------------------------------------------------------------


def test_osinfo_hostname_time_users_fsinfo(agent: Agent) -> None:
    res = cli("--address", agent.address, "osinfo")
    assert res.returncode == 0, res
    fields = dict(line.split(": ", 1) for line in res.stdout.decode().splitlines())
    assert fields["kernel-release"] == os.uname().release
    assert fields["machine"] == os.uname().machine
    release = dict(
        line.split("=", 1)
        for line in Path("/etc/os-release").read_text().splitlines()
        if "=" in line
    )
    assert fields["id"] == release["ID"].strip('"')

    res = cli("--address", agent.address, "hostname")
    assert res.stdout.decode() == socket.gethostname() + "\n"

    before = time.time()
    res = cli("--address", agent.address, "--json", "time")
    after = time.time()
    assert before - 1 <= json.loads(res.stdout) / 1e9 <= after + 1
    res = cli("--address", agent.address, "time")
    assert re.fullmatch(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6} UTC\n", res.stdout), res

    res = cli("--address", agent.address, "--json", "users")
    assert res.returncode == 0 and isinstance(json.loads(res.stdout), list), res
    res = cli("--address", agent.address, "--json", "fsinfo")
    mounts = {fs["mountpoint"] for fs in json.loads(res.stdout)}
    assert "/" in mounts
    res = cli("--address", agent.address, "fsinfo")
    assert any(line.startswith("/\t") for line in res.stdout.decode().splitlines()), res


def test_call_with_arguments_and_raw_json(agent: Agent) -> None:
    res = cli("--address", agent.address, "call", "guest-get-host-name")
    assert json.loads(res.stdout) == {"host-name": socket.gethostname()}
    res = cli("--address", agent.address, "call", "get-timezone")  # guest- is implied
    assert json.loads(res.stdout) == raw_call(agent.address, "guest-get-timezone")
    res = cli("--address", agent.address, "call", '{"execute": "guest-ping"}')
    assert (res.returncode, json.loads(res.stdout)) == (0, {})
    # key=value: the value is JSON (a number here); the agent refuses the handle.
    line = one_error_line(
        cli("--address", agent.address, "call", "guest-file-read", "handle=424242", "count=1")
    )
    assert "guest-file-read failed" in line and "handle" in line and "424242" in line


def test_exec_prints_output_and_exits_with_the_programs_status(tmp_path: Path) -> None:
    with host_agent(tmp_path, EXECUTOR.__contains__, exec_test=True) as a:
        res = cli("--address", a.address, "exec", "--", "echo", "hello", "world")
        assert (res.returncode, res.stdout, res.stderr) == (0, b"hello world\n", b"")
        script = "echo out; echo err >&2; exit 7"
        res = cli("--address", a.address, "exec", "--", "sh", "-c", script)
        assert (res.returncode, res.stdout, res.stderr) == (7, b"out\n", b"err\n")
        res = cli("--address", a.address, "--json", "exec", "--", "echo", "x")
        status = json.loads(res.stdout)
        assert status["exited"] is True and status["exitcode"] == 0
        assert base64.b64decode(status["out-data"]) == b"x\n"
        res = cli("--address", a.address, "exec", "--timeout", "0.5", "--", "sleep", "30")
        line = one_error_line(res)
        assert "sleep" in line and "0.5 s" in line
        # Everything else stays closed on this agent.
        line = one_error_line(cli("--address", a.address, "hostname"))
        assert "disabled" in line


# --- errors ----------------------------------------------------------------------


def test_bad_arguments_are_one_line_and_status_2(agent: Agent) -> None:
    for args in (
        ("fsfreeze", "bogus"),
        ("fsfreeze",),
        ("suspend", "sometimes"),
        ("ping", "soon"),
        ("cat",),
        ("exec",),
        ("fstrim", "lots"),
        ("call", "guest-ping", "novalue"),
        ("call", "{not json"),
        ("info", "extra"),
    ):
        line = one_error_line(cli("--address", agent.address, *args), status=2)
        assert line.startswith(f"qemu-ga-client: {args[0]}: "), line
    for args in (("--timeout", "0", "ping"), ("--timeout", "nan", "ping"), ("nosuch",)):
        res = cli("--address", agent.address, *args)
        assert res.returncode == 2 and b"Traceback" not in res.stderr, res
    res = cli("ping")  # no --address and no $QGA_CLIENT_ADDRESS
    assert res.returncode == 2 and b"QGA_CLIENT_ADDRESS" in res.stderr, res


def test_missing_and_refused_sockets(tmp_path: Path) -> None:
    line = one_error_line(cli("--address", str(tmp_path / "none.sock"), "ping"))
    assert str(tmp_path / "none.sock") in line and "no such socket" in line
    dead = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(dead))  # bound, never listening: connect() is refused
        line = one_error_line(cli("--address", str(dead), "ping"))
    assert str(dead) in line and "refused" in line
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        line = one_error_line(cli("--address", f"127.0.0.1:{port}", "ping"))
    assert f"tcp:127.0.0.1:{port}" in line and "refused" in line
    line = one_error_line(cli("--address", "localhost:qga", "ping"))
    assert line == "qemu-ga-client: localhost:qga: neither an existing socket path nor HOST:PORT"


def test_tcp_through_socat(agent: Agent) -> None:
    if not os.access(SOCAT, os.X_OK):
        missing("socat is not installed (run scripts/install-deps)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bridge = subprocess.Popen(
        [SOCAT, f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", f"UNIX-CONNECT:{agent.sock}"],
        stdin=subprocess.DEVNULL,
    )
    try:

        def listening() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, 10, "socat's listening socket")
        address = f"127.0.0.1:{port}"
        res = cli("--address", address, "ping")
        assert (res.returncode, res.stderr) == (0, b""), res
        res = cli("--address", address, "hostname")
        assert res.stdout.decode() == socket.gethostname() + "\n"
        res = cli("--address", address, "--json", "info")
        assert json.loads(res.stdout)["version"] == agent_version()
        line = one_error_line(cli("--address", address, "fstrim"))
        assert f"tcp:{address}" in line and "disabled" in line
    finally:
        bridge.terminate()
        bridge.wait(timeout=10)


def test_stale_replies_on_the_channel_are_not_taken(agent: Agent) -> None:
    """Replies nobody read (an earlier client's) are dropped by the sync."""
    with AgentClient(agent.address, timeout=5) as client:
        assert client._sock is not None
        # Commands whose replies the next command must not take for its own.
        client._sock.sendall(b'{"execute": "guest-get-host-name", "id": "old"}')
        client._sock.sendall(b'{"execute": "guest-sync-delimited", "arguments": {"id": 7}}')
        time.sleep(0.2)
        assert client.execute("guest-ping") == {}
        assert client.execute("guest-fsfreeze-status") == "thawed"
        assert client.sent == ["guest-sync-delimited", "guest-ping", "guest-fsfreeze-status"]


def test_a_vm_without_a_guest_fails_ping_within_the_timeout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = tmp_path / "qga.sock"
    channel = [
        "-chardev",
        f"socket,path={sock},server=on,wait=off,id=qga0",
        "-device",
        "virtio-serial",
        "-device",
        "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
    ]
    with qemu_vm(tmp_path, channel):
        wait_for(sock.exists, 10, "the agent channel's socket")
        for argv, timeout in ((["--timeout", "1.5", "ping"], 1.5), (["ping", "1"], 1.0)):
            start = time.monotonic()
            status = main(["--address", str(sock), *argv])
            elapsed = time.monotonic() - start
            err = capsys.readouterr().err
            assert status == 1
            assert err == (
                f"qemu-ga-client: no guest agent answered guest-sync on {sock} within "
                f"{timeout:g} s: is qemu-ga running in the guest?\n"
            )
            assert timeout <= elapsed <= timeout + 1


# --- a fake agent, for what the real one will not do ----------------------------------


Handler = Callable[[dict[str, Any], socket.socket], None]


class FakeAgent:
    """Speaks the agent's wire protocol on a unix socket; ``handler`` answers."""

    def __init__(self, path: Path, handler: Handler, greeting: bytes = b"") -> None:
        self.path = path
        self.handler = handler
        self.greeting = greeting
        self.received: list[dict[str, Any]] = []
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(self.greeting)
                self._talk(conn)

    def _talk(self, conn: socket.socket) -> None:
        decoder = json.JSONDecoder()
        buf = ""
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data.replace(b"\xff", b"").decode()
            while buf.strip():
                try:
                    msg, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                self.received.append(msg)
                try:
                    self.handler(msg, conn)
                except OSError:
                    return

    def close(self) -> None:
        self.listener.close()


def reply(conn: socket.socket, msg: dict[str, Any], value: Any) -> None:
    out: dict[str, Any] = {"return": value}
    if "id" in msg:
        out["id"] = msg["id"]
    conn.sendall(json.dumps(out).encode() + b"\n")


def sync_reply(conn: socket.socket, msg: dict[str, Any]) -> None:
    conn.sendall(b"\xff" + json.dumps({"return": msg["arguments"]["id"]}).encode() + b"\n")


@contextlib.contextmanager
def fake_agent(tmp_path: Path, handler: Handler, greeting: bytes = b"") -> Iterator[FakeAgent]:
    fake = FakeAgent(tmp_path / "fake.sock", handler, greeting)
    try:
        yield fake
    finally:
        fake.close()


def test_garbage_and_old_sentinels_before_the_sync_are_dropped(tmp_path: Path) -> None:
    answered = threading.Event()

    def handler(msg: dict[str, Any], conn: socket.socket) -> None:
        if msg["execute"] == "guest-sync-delimited":
            # An older client's sync answered first, then, a little later, ours.
            conn.sendall(b'\xff{"return": 1}\n{"return": "stale"}\n')
            time.sleep(0.3)
            answered.set()
            sync_reply(conn, msg)
        else:
            reply(conn, msg, {"host-name": "fake"})

    # Left on the channel before we came: replies, half a reply, a sync's reply.
    stale = b'{"return": {"host-name": "stale"}}\n{"return": "half a rep\xff{"return": 2}\n'
    with fake_agent(tmp_path, handler, greeting=stale) as fake:
        time.sleep(0.1)
        with AgentClient(str(fake.path), timeout=5) as client:
            client.sync()
            assert answered.is_set()  # not synced by another id's reply
            assert client.execute("guest-get-host-name") == {"host-name": "fake"}
            assert client.sent == ["guest-sync-delimited", "guest-get-host-name"]


def test_a_timed_out_command_is_followed_by_a_sync(tmp_path: Path) -> None:
    late: list[tuple[dict[str, Any], socket.socket]] = []

    def handler(msg: dict[str, Any], conn: socket.socket) -> None:
        if msg["execute"] == "guest-sync-delimited":
            # The late reply to the timed-out command comes before the sync's.
            for old, c in late:
                reply(c, old, "late")
            late.clear()
            sync_reply(conn, msg)
        elif msg["execute"] == "guest-get-host-name" and not any(
            m["execute"] == "guest-get-host-name" for m in fake.received[:-1]
        ):
            late.append((msg, conn))  # answered only later
        else:
            reply(conn, msg, "on time")

    with fake_agent(tmp_path, handler) as fake, AgentClient(str(fake.path), timeout=0.5) as client:
        with pytest.raises(AgentTimeout):
            client.execute("guest-get-host-name")
        assert not client.synced
        assert client.execute("guest-get-host-name") == "on time"
        assert client.sent == [
            "guest-sync-delimited",
            "guest-get-host-name",
            "guest-sync-delimited",
            "guest-get-host-name",
        ]


def test_fsfreeze_gets_60_seconds(tmp_path: Path) -> None:
    assert timeout_for("guest-fsfreeze-freeze", 5) == 60
    assert timeout_for("guest-fsfreeze-thaw", 5) == 60
    assert timeout_for("guest-ping", 5) == 5
    assert set(LONG_TIMEOUTS) >= {"guest-fsfreeze-freeze", "guest-fsfreeze-thaw"}

    def handler(msg: dict[str, Any], conn: socket.socket) -> None:
        if msg["execute"] == "guest-sync-delimited":
            sync_reply(conn, msg)
        else:
            time.sleep(1.5)  # longer than --timeout, far less than 60 s
            reply(conn, msg, 2)

    with fake_agent(tmp_path, handler) as fake:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = main(["--address", str(fake.path), "--timeout", "1", "fsfreeze", "freeze"])
        assert (status, out.getvalue()) == (0, "2 filesystems frozen\n")


@pytest.mark.parametrize("after", ["quiet", "close", "error"])
def test_commands_without_a_reply(tmp_path: Path, after: str) -> None:
    assert {"guest-shutdown", "guest-suspend-ram"} <= NO_REPLY

    def handler(msg: dict[str, Any], conn: socket.socket) -> None:
        if msg["execute"] == "guest-sync-delimited":
            sync_reply(conn, msg)
        elif after == "close":
            conn.shutdown(socket.SHUT_RDWR)
        elif after == "error":
            err = {"class": "GenericError", "desc": "shutdown failed"}
            conn.sendall(json.dumps({"error": err, "id": msg["id"]}).encode() + b"\n")

    with fake_agent(tmp_path, handler) as fake:
        res = cli("--address", str(fake.path), "--timeout", "0.5", "powerdown")
        if after == "error":
            line = one_error_line(res)
            assert "guest-shutdown failed" in line and "shutdown failed" in line
        else:
            assert (res.returncode, res.stdout, res.stderr) == (0, b"", b"")
        shutdowns = [m for m in fake.received if m["execute"] == "guest-shutdown"]
        assert [m["arguments"] for m in shutdowns] == [{"mode": "powerdown"}]


def test_an_error_reply_carries_its_class(tmp_path: Path) -> None:
    def handler(msg: dict[str, Any], conn: socket.socket) -> None:
        if msg["execute"] == "guest-sync-delimited":
            sync_reply(conn, msg)
        else:
            err = {"class": "CommandNotFound", "desc": "Command guest-x has been disabled"}
            conn.sendall(json.dumps({"error": err, "id": msg["id"]}).encode() + b"\n")

    with fake_agent(tmp_path, handler) as fake, AgentClient(str(fake.path)) as client:
        with pytest.raises(AgentCommandError) as exc:
            client.execute("guest-x", {"a": 1})
        assert (exc.value.error_class, exc.value.command, exc.value.arguments) == (
            "CommandNotFound",
            "guest-x",
            {"a": 1},
        )
        assert "disabled" in str(exc.value)


def test_a_failed_read_still_closes_the_file(file_agent: Agent, tmp_path: Path) -> None:
    # A directory opens for reading, and then every read of it fails (EISDIR).
    with AgentClient(file_agent.address) as client:
        with pytest.raises(AgentCommandError) as exc:
            read_file(client, str(tmp_path))
        assert exc.value.command == "guest-file-read"
        assert client.sent[-3:] == ["guest-file-open", "guest-file-read", "guest-file-close"]
    line = one_error_line(cli("--address", file_agent.address, "cat", str(tmp_path)))
    assert "guest-file-read failed" in line and "Is a directory" in line


def test_a_channel_that_closes_at_once(tmp_path: Path) -> None:
    # What socat does when the agent's socket behind it is gone.
    def handler(msg: dict[str, Any], conn: socket.socket) -> None:
        conn.shutdown(socket.SHUT_RDWR)

    with fake_agent(tmp_path, handler) as fake:
        line = one_error_line(cli("--address", str(fake.path), "hostname"))
    assert line == (
        f"qemu-ga-client: {fake.path}: the channel closed while waiting for "
        "guest-sync-delimited: is QEMU (or the agent) still running?"
    )
