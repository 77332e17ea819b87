"""qmp-shell and qmp-shell-wrap against real QEMU 7.2 (and 11.1 in its chroot):
piped from bash as scripts use it, and on a pseudo-terminal as people do."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    import pexpect
except ImportError:  # a test dependency: pip install -e '.[test]'
    pexpect = None

from qomfs.shell.schema import Schema
from tests.harness import QEMU, VM, missing, qemu11_vm, qemu_vm, require_qemu, wait_for

BIN = Path(sys.executable).parent
SHELL = BIN / "qmp-shell"
WRAP = BIN / "qmp-shell-wrap"
PROMPT = "(QEMU) "
TIMESTAMP = r"\[\d\d:\d\d:\d\d\.\d{6}\]"


@pytest.fixture(scope="module", autouse=True)
def installed() -> None:
    for tool in (SHELL, WRAP):
        if not tool.exists():
            pytest.fail(f"{tool} is missing: run .venv/bin/pip install -e .")


@pytest.fixture(scope="module")
def vm11(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VM]:
    with qemu11_vm(tmp_path_factory, "shell") as vm:
        yield vm


def bash(
    script: str, timeout: float = 60, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Any:
    """Run ``script`` in bash with the venv's tools first on PATH."""
    full = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}", **(env or {}))
    full.pop("QMP_SOCKET", None)
    full.update(env or {})
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=timeout, env=full, cwd=cwd
    )


def pipe(sock: Path | str, *lines: str, opts: str = "", env: dict[str, str] | None = None) -> Any:
    """``printf LINES | qmp-shell OPTS SOCK``."""
    text = "".join(line + "\n" for line in lines)
    return bash(
        f"printf %s {shlex.quote(text)} | qmp-shell {opts} {shlex.quote(str(sock))}", env=env
    )


def json_lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def replies(stdout: str) -> list[dict[str, Any]]:
    return [m for m in json_lines(stdout) if "event" not in m]


# --- piped: scripts ------------------------------------------------------------------


def test_replies_are_one_json_line_each_and_nothing_else(anyvm: VM) -> None:
    done = pipe(anyvm.socket, "query-status", "qom-get path=/machine property=type")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = json_lines(done.stdout)  # every line is JSON: no banner, no prompt
    assert lines[0]["return"]["status"] == "prelaunch"
    assert lines[0]["return"]["running"] is False
    assert lines[1]["return"].startswith("pc-q35-")
    assert len(lines) == 2


def test_pretty(vm: VM) -> None:
    done = pipe(vm.socket, "query-status", opts="-p")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["return"]["status"] == "prelaunch"
    assert len(done.stdout.splitlines()) > 3
    assert '\n    "return": {' in done.stdout


def test_hmp(anyvm: VM) -> None:
    done = pipe(anyvm.socket, "info status", opts="-H")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "VM status: paused (prelaunch)\n"


def test_hmp_unknown_command_fails(vm: VM) -> None:
    done = pipe(vm.socket, "nosuch", "info status", opts="-H")
    assert done.returncode == 1
    assert done.stdout == "unknown command: 'nosuch'\nVM status: paused (prelaunch)\n"


def test_dotted_keys_reach_qemu_nested(anyvm: VM) -> None:
    # Upstream nests the later driver=raw inside "file" and QEMU refuses it.
    line = "blockdev-add file.driver=null-co file.size=4096 driver=raw node-name=dotted0"
    done = pipe(anyvm.socket, line)
    assert done.returncode == 0, done.stdout + done.stderr
    assert replies(done.stdout) == [{"return": {}}]
    with anyvm.qmp() as qmp:
        try:
            nodes = {n["node-name"]: n for n in qmp.cmd("query-named-block-nodes")}
            node = nodes["dotted0"]
            assert node["drv"] == "raw"
            assert node["image"]["virtual-size"] == 4096
            assert json.loads(node["file"].removeprefix("json:")) == {
                "driver": "raw",
                "file": {"driver": "null-co", "size": 4096},
            }
        finally:
            qmp.cmd("blockdev-del", **{"node-name": "dotted0"})


def test_values_json_or_string(vm: VM) -> None:
    """``value='"1.5"'`` forces a string; 'false' unquoted is a boolean."""
    with vm.qmp() as qmp:
        before = qmp.cmd("qom-get", path="/machine", property="graphics")
    lines = [
        "qom-set path=/machine property=graphics value=false",
        "qom-set path=/machine property=graphics value='\"false\"'",  # a string: refused
    ]
    done = pipe(vm.socket, *lines)
    try:
        got = replies(done.stdout)
        assert got[0] == {"return": {}}
        assert got[1]["error"]["class"] == "GenericError"
        assert "expected: boolean" in got[1]["error"]["desc"]
        assert done.returncode == 1
        with vm.qmp() as qmp:
            assert qmp.cmd("qom-get", path="/machine", property="graphics") is False
    finally:
        with vm.qmp() as qmp:
            qmp.cmd("qom-set", path="/machine", property="graphics", value=before)


def test_raw_json_lines(anyvm: VM) -> None:
    lines = [
        '{"execute": "query-status", "id": "abc"}',
        '{"execute": "qom-get", "arguments": {"path": "/machine", "property": "type"}}',
    ]
    done = pipe(anyvm.socket, *lines)
    assert done.returncode == 0, done.stdout + done.stderr
    got = replies(done.stdout)
    assert got[0]["id"] == "abc" and got[0]["return"]["status"] == "prelaunch"
    assert set(got[1]) == {"return"} and got[1]["return"].startswith("pc-q35-")


def test_transaction(anyvm: VM) -> None:
    lines = [
        "blockdev-add driver=null-co node-name=tx0",
        "transaction(",
        "block-dirty-bitmap-add node=tx0 name=b0",
        "block-dirty-bitmap-add node=tx0 name=b1 granularity=65536",
        ")",
    ]
    done = pipe(anyvm.socket, *lines)
    assert done.returncode == 0, done.stdout + done.stderr
    assert replies(done.stdout) == [{"return": {}}, {"return": {}}]  # one reply for the block
    with anyvm.qmp() as qmp:
        nodes = {n["node-name"]: n for n in qmp.cmd("query-named-block-nodes")}
        bitmaps = {b["name"]: b["granularity"] for b in nodes["tx0"]["dirty-bitmaps"]}
        qmp.cmd("blockdev-del", **{"node-name": "tx0"})
    assert bitmaps["b1"] == 65536 and set(bitmaps) == {"b0", "b1"}


def test_exit_status_and_bad_lines(vm: VM) -> None:
    ok = pipe(vm.socket, "query-status", "query-name")
    assert ok.returncode == 0

    failed = pipe(vm.socket, "nosuch-command", "query-name")
    assert failed.returncode == 1
    got = replies(failed.stdout)
    assert got[0]["error"]["class"] == "CommandNotFound"
    assert "return" in got[1]  # the shell went on
    assert failed.stderr == ""

    bad = pipe(vm.socket, "qom-get path=/machine property", "query-name", "a=1", "x k='oops")
    assert bad.returncode == 1
    assert len(replies(bad.stdout)) == 1  # only query-name was sent
    errors = bad.stderr.splitlines()
    assert errors == [
        "qmp-shell: line 1: expected key=value, got 'property'",
        "qmp-shell: line 3: expected a command name first, got 'a=1'",
        "qmp-shell: line 4: unterminated ' in \"k='oops\"",
    ]


def test_events_are_json_objects_with_their_event_key(vm: VM) -> None:
    # POWERDOWN: an event that leaves a paused (-S) VM as it is
    done = pipe(vm.socket, "system_powerdown", "query-name")
    assert done.returncode == 0, done.stderr
    lines = json_lines(done.stdout)
    events = [m for m in lines if "event" in m]
    assert [e["event"] for e in events] == ["POWERDOWN"]
    assert set(events[0]["timestamp"]) == {"seconds", "microseconds"}
    assert abs(events[0]["timestamp"]["seconds"] - time.time()) < 600
    assert len(replies(done.stdout)) == 2


def test_help_from_the_schema(vm: VM) -> None:
    done = pipe(vm.socket, "help qom-set", "help blockdev-add driver=null-co")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:4] == ["qom-set", "  path      str", "  property  str", "  value     any"]
    assert re.search(r"^  size +int  \(optional\)$", done.stdout, re.M)
    listing = pipe(vm.socket, "help")
    assert {"qom-get", "query-status", "blockdev-add"} <= set(listing.stdout.split())
    unknown = pipe(vm.socket, "help nosuch")
    assert unknown.returncode == 1
    assert unknown.stderr == "qmp-shell: line 1: help: QEMU has no command named 'nosuch'\n"


def test_the_schema_reader_knows_every_command(anyvm: VM) -> None:
    """Every command of the real schema: its help lists each argument, and each
    union variant adds its own (read independently from the raw schema)."""
    with anyvm.qmp() as qmp:
        entries = qmp.cmd("query-qmp-schema")
    schema = Schema(entries)
    by_name = {e["name"]: e for e in entries}
    commands = [e["name"] for e in entries if e["meta-type"] == "command"]
    assert sorted(commands) == schema.commands and len(commands) > 150
    variants_seen = 0
    for name in commands:
        arg = by_name[by_name[name]["arg-type"]]
        text = schema.help(name)
        assert text.splitlines()[0].split()[0] == name
        for member in arg.get("members", []):
            assert re.search(rf"^  {re.escape(member['name'])} ", text, re.M), (name, member)
        for variant in arg.get("variants", []):
            chosen = schema.help(name, {arg["tag"]: variant["case"]})
            for member in by_name[variant["type"]].get("members", []):
                assert re.search(rf"^  {re.escape(member['name'])} ", chosen, re.M)
            variants_seen += 1
    assert variants_seen > 30  # blockdev-add alone has dozens


def test_verbose_echoes_what_is_sent(vm: VM) -> None:
    done = pipe(vm.socket, "qom-list path=/", opts="-v")
    lines = json_lines(done.stdout)
    assert lines[0] == {"execute": "qom-list", "arguments": {"path": "/"}}
    assert "return" in lines[1]


def test_logfile(vm: VM, tmp_path: Path) -> None:
    log = tmp_path / "qmp.log"
    done = pipe(vm.socket, "query-name", "system_powerdown", "nosuch", opts=f"-l {log}")
    assert done.returncode == 1
    records = json_lines(log.read_text())
    commands = [r for r in records if "execute" in r]
    assert [r["execute"] for r in commands] == ["query-name", "system_powerdown", "nosuch"]
    assert "return" in commands[0] and commands[2]["error"]["class"] == "CommandNotFound"
    assert [r["event"] for r in records if "event" in r] == ["POWERDOWN"]


def test_skip_negotiation(vm: VM) -> None:
    # -N sends nothing of its own: a command before qmp_capabilities is refused
    early = pipe(vm.socket, "query-name", opts="-N")
    assert replies(early.stdout)[0]["error"]["class"] == "CommandNotFound"
    done = pipe(vm.socket, "qmp_capabilities", "query-name", opts="-N")
    assert done.returncode == 0, done.stdout + done.stderr
    assert replies(done.stdout) == [{"return": {}}, {"return": {}}]


def test_skip_negotiation_help_after_qmp_capabilities(vm: VM) -> None:
    done = pipe(vm.socket, "help query-name", "qmp_capabilities", "help query-name", opts="-N")
    assert done.returncode == 1  # the first help could not ask QEMU yet
    assert done.stderr == "qmp-shell: line 1: help: QEMU did not answer query-qmp-schema\n"
    lines = done.stdout.splitlines()
    assert lines[:3] == ['{"return": {}}', "query-name", "  (no arguments)"]


def test_output_closed_early_is_no_traceback(vm: VM) -> None:
    script = f"yes query-qmp-schema | head -50 | qmp-shell {vm.socket} | head -c 100"
    done = bash(f"{script}; echo status ${{PIPESTATUS[2]}}")
    assert done.stdout.endswith("status 1\n")  # after 100 bytes with no newline
    assert done.stderr == ""


def test_qmp_socket_variable(vm: VM) -> None:
    done = bash("echo query-status | qmp-shell", env={"QMP_SOCKET": str(vm.socket)})
    assert done.returncode == 0, done.stderr
    assert replies(done.stdout)[0]["return"]["status"] == "prelaunch"


def test_no_socket_is_a_usage_error() -> None:
    done = bash("qmp-shell </dev/null")
    assert done.returncode == 2
    assert "give SOCKET or set QMP_SOCKET" in done.stderr


def test_unreachable_socket(tmp_path: Path) -> None:
    done = pipe(tmp_path / "none.sock", "query-status")
    assert done.returncode == 1
    assert done.stderr.startswith("qmp-shell: ") and len(done.stderr.splitlines()) == 1
    assert "no such socket" in done.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_host_port(tmp_path: Path) -> None:
    port = free_port()
    extra = ["-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off"]
    with qemu_vm(tmp_path, extra=extra):
        wait_for(lambda: _listening(port), 20, f"QEMU on port {port}")
        done = pipe(f"127.0.0.1:{port}", "query-status")
    assert done.returncode == 0, done.stderr
    assert replies(done.stdout)[0]["return"]["status"] == "prelaunch"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_pretty_on_monitor(tmp_path: Path) -> None:
    sock = tmp_path / "pretty.qmp"
    extra = [
        "-chardev",
        f"socket,id=pretty,path={sock},server=on,wait=off",
        "-mon",
        "chardev=pretty,mode=control,pretty=on",
    ]
    with qemu_vm(tmp_path, extra=extra):
        wait_for(sock.exists, 20, "the pretty=on monitor")
        done = pipe(sock, "query-status", "qom-list path=/")
        hmp = pipe(sock, "info status", opts="-H")
    assert done.returncode == 0, done.stderr
    got = replies(done.stdout)
    assert got[0]["return"]["status"] == "prelaunch"
    assert {p["name"] for p in got[1]["return"]} >= {"machine", "objects"}
    assert hmp.stdout == "VM status: paused (prelaunch)\n"


@contextlib.contextmanager
def running_shell(sock: Path, *opts: str) -> Iterator[subprocess.Popen[str]]:
    """qmp-shell on a pipe we write to line by line."""
    proc = subprocess.Popen(
        [str(SHELL), *opts, str(sock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                f.close()


def say(proc: subprocess.Popen[str], line: str) -> dict[str, Any]:
    """Send a line; the next reply (events skipped)."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    while True:
        out = proc.stdout.readline()
        assert out, "qmp-shell ended"
        msg = json.loads(out)
        if "event" not in msg:
            return msg  # type: ignore[no-any-return]


def test_qemu_gone_for_good_exits_1(tmp_path: Path) -> None:
    with qemu_vm(tmp_path) as vm, running_shell(vm.socket) as proc:
        assert "return" in say(proc, "query-name")
        vm.kill()
        vm.socket.unlink()  # gone, and nothing to reconnect to
        assert proc.stdin is not None
        proc.stdin.write("query-name\nquery-status\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 1
        assert proc.stderr is not None
        errors = proc.stderr.read().splitlines()
    # The shell may see the loss at once (one line) or only when it sends
    # the first command (one more): either way the shell gives up at the
    # first command that cannot reconnect, and says why.
    assert 1 <= len(errors) <= 2, errors
    if len(errors) == 2:
        assert errors[0].startswith("qmp-shell: line 2: QEMU is gone: ")
        assert "the next command reconnects" in errors[0]
    assert errors[-1].startswith("qmp-shell: QEMU is gone and does not come back: ")
    assert "no such socket" in errors[-1]


def test_timeout_reports_and_goes_on(tmp_path: Path) -> None:
    with qemu_vm(tmp_path) as vm, running_shell(vm.socket, "--timeout", "1") as proc:
        assert say(proc, "query-name") == {"return": {}}
        vm.proc.send_signal(signal.SIGSTOP)
        try:
            assert proc.stdin is not None and proc.stderr is not None
            proc.stdin.write("query-status\n")
            proc.stdin.flush()
            assert (
                proc.stderr.readline()
                == "qmp-shell: line 2: no reply to 'query-status' within 1 s\n"
            )
        finally:
            vm.proc.send_signal(signal.SIGCONT)
        # the late reply is dropped; the next command gets its own
        assert say(proc, "query-name") == {"return": {}}
        proc.stdin.close()
        proc.stdin = None
        assert proc.wait(timeout=20) == 1


def test_reconnects_when_qemu_comes_back(tmp_path: Path) -> None:
    with qemu_vm(tmp_path, extra=["-name", "first"]) as vm, running_shell(vm.socket) as proc:
        assert say(proc, "query-name") == {"return": {"name": "first"}}
        vm.kill()
        with qemu_vm(tmp_path, extra=["-name", "second"]):
            # A first command may see the old connection die; the next one
            # reaches the new QEMU on the same socket.
            reply = say(proc, "query-name")
            if reply != {"return": {"name": "second"}}:
                reply = say(proc, "query-name")
            assert reply == {"return": {"name": "second"}}
            assert proc.stdin is not None
            proc.stdin.close()
            proc.stdin = None
            assert proc.wait(timeout=20) in (0, 1)


# --- on a terminal -------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


def terminal(program: Path, args: list[str], home: Path) -> Any:
    """``program`` on a pseudo-terminal, HOME pointed at ``home``."""
    if pexpect is None:
        missing("pexpect is not installed (pip install -e '.[test]')")
    env = dict(os.environ, HOME=str(home), TERM="xterm", INPUTRC="/dev/null")
    env.pop("QMP_SOCKET", None)
    return pexpect.spawn(
        str(program), args, env=env, encoding="utf-8", timeout=20, dimensions=(40, 200)
    )


def spawn(home: Path, *args: str) -> Any:
    """qmp-shell ARGS on a terminal, at its first prompt."""
    child = terminal(SHELL, list(args), home)
    child.expect_exact(PROMPT)
    return child


@contextlib.contextmanager
def interactive(home: Path, *args: str) -> Iterator[Any]:
    """A shell on a terminal; ended with Ctrl-D, and killed if that fails,
    so that the next test finds the monitor free."""
    child = spawn(home, *args)
    try:
        yield child
    finally:
        with contextlib.suppress(pexpect.ExceptionPexpect, OSError):
            if child.isalive():
                child.sendeof()
                child.expect(pexpect.EOF, timeout=5)
        child.close(force=True)


def test_prompt_and_banner(anyvm: VM, home: Path) -> None:
    with interactive(home, str(anyvm.socket)) as sh:
        assert "Welcome to the QMP low-level shell!" in sh.before
        assert re.search(r"Connected to QEMU \d+\.\d+\.\d+", sh.before)
        sh.sendline("query-status")
        sh.expect_exact('"status": "prelaunch"')
        sh.expect_exact(PROMPT)
        sh.sendeof()
        sh.expect(pexpect.EOF)
    sh.close()
    assert sh.exitstatus == 0


def test_completes_command_names(anyvm: VM, home: Path) -> None:
    with interactive(home, str(anyvm.socket)) as sh:
        sh.send("qom-g\t")
        sh.expect_exact("qom-get ")
        sh.send("path=/machine property=type\r")
        sh.expect_exact('{"return": "pc-q35-')


def test_completes_qom_paths_and_properties(anyvm: VM, home: Path) -> None:
    with interactive(home, str(anyvm.socket)) as sh:
        sh.send("qom-get path=/mach\t")
        sh.expect_exact("qom-get path=/machine/")
        sh.send(" property=ty\t")
        sh.expect_exact("property=type ")
        sh.send("\r")
        sh.expect_exact('{"return": "pc-q35-')


def test_completes_argument_names_from_the_schema(anyvm: VM, home: Path) -> None:
    with interactive(home, str(anyvm.socket)) as sh:
        # (each expect sees only what the terminal shows after the last one)
        sh.send("blockdev-add node-n\t")
        sh.expect_exact("blockdev-add node-name=")
        sh.send("c0 dri\t")
        sh.expect_exact("c0 driver=")
        sh.send("null-c\t")  # an enum value
        sh.expect_exact("null-co ")
        sh.send("si\t")  # the variant null-co selects
        sh.expect_exact("size=")
        sh.send("512\r")
        sh.expect_exact('{"return": {}}')
        sh.sendline("blockdev-del node-name=c0")
        sh.expect_exact('{"return": {}}')


def test_completes_hmp_commands(vm: VM, home: Path) -> None:
    with interactive(home, "-H", str(vm.socket)) as sh:
        assert "Welcome to the HMP shell!" in sh.before
        sh.send("info statu\t")
        sh.expect_exact("info status ")
        sh.send("\r")
        sh.expect_exact("VM status: paused (prelaunch)")


def test_history_survives_a_restart(vm: VM, home: Path) -> None:
    with interactive(home, str(vm.socket)) as sh:
        sh.sendline("query-name")
        sh.expect_exact('{"return": {}}')
        sh.expect_exact(PROMPT)
    history = home / ".qmp-shell_history"
    assert "query-name" in history.read_text().splitlines()
    with interactive(home, str(vm.socket)) as sh:
        sh.send("\x1b[A")  # up arrow: the last line of the last run
        sh.expect_exact("query-name")
        sh.send("\r")
        sh.expect_exact('{"return": {}}')


def test_an_event_shows_while_the_shell_waits(anyvm: VM, home: Path) -> None:
    with interactive(home, str(anyvm.socket)) as sh:
        sh.send("query-na")  # half typed, waiting at the prompt
        time.sleep(0.3)
        with anyvm.qmp() as qmp:
            qmp.cmd("system_powerdown")
        sh.expect(TIMESTAMP + " POWERDOWN")
        sh.expect_exact(PROMPT + "query-na")  # the prompt and the line come back
        sh.send("me\r")
        sh.expect_exact('{"return": {')


def test_help_interactive(vm: VM, home: Path) -> None:
    with interactive(home, str(vm.socket)) as sh:
        sh.sendline("help qom-get")
        sh.expect_exact("  path      str")
        sh.expect_exact("  property  str")


def test_transaction_prompt(vm: VM, home: Path) -> None:
    with interactive(home, str(vm.socket)) as sh:
        sh.sendline("transaction(")
        sh.expect_exact("TRANS> ")
        sh.send("abo\t")
        sh.expect_exact("abort ")
        sh.send("\r")
        sh.expect_exact("TRANS> ")
        sh.sendline(")")
        # the abort action makes QEMU refuse the whole transaction
        sh.expect_exact("Transaction aborted using Abort action")
        sh.expect_exact(PROMPT)


def test_interactive_qemu_gone(tmp_path: Path, home: Path) -> None:
    with qemu_vm(tmp_path) as vm:
        sh = spawn(home, str(vm.socket))
        try:
            vm.kill()
            vm.socket.unlink()
            sh.expect_exact("QEMU closed the connection; the next command reconnects")
            sh.sendline("query-name")
            sh.expect_exact("QEMU is gone and does not come back")
            sh.expect(pexpect.EOF)
        finally:
            sh.close(force=True)
    assert sh.exitstatus == 1


# --- qmp-shell-wrap ------------------------------------------------------------------


def qemu_pids(tag: str) -> list[int]:
    """QEMU processes with ``tag`` in their command line (not the wrapper)."""
    found = subprocess.run(["pgrep", "-f", tag], capture_output=True, text=True)
    pids = []
    for pid in found.stdout.split():
        with contextlib.suppress(OSError):
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            if argv0.decode().endswith(Path(QEMU).name):
                pids.append(int(pid))
    return pids


def wrap(tmp_path: Path, lines: str, *qemu_args: str, tag: str) -> Any:
    require_qemu()
    tmp, cwd = tmp_path / "tmp", tmp_path / "cwd"
    tmp.mkdir(exist_ok=True)
    cwd.mkdir(exist_ok=True)
    cmd = " ".join(shlex.quote(a) for a in [QEMU, *qemu_args, "-name", tag])
    script = f"printf {shlex.quote(lines)} | qmp-shell-wrap {cmd}"
    done = bash(script, env={"TMPDIR": str(tmp)}, cwd=cwd)
    assert list(cwd.iterdir()) == []  # upstream leaves its socket in the current directory
    return done


def test_wrap_runs_the_shell_and_ends_qemu(tmp_path: Path) -> None:
    tag = f"wraptest{os.getpid()}a"
    bare = ["-S", "-display", "none", "-nodefaults", "-machine", "none"]
    done = wrap(tmp_path, "query-status\\n", *bare, tag=tag)
    assert done.returncode == 0, done.stderr
    assert replies(done.stdout) == [
        {"return": {"status": "prelaunch", "singlestep": False, "running": False}}
    ]
    assert done.stderr == ""
    assert qemu_pids(tag) == []  # no QEMU left
    assert list((tmp_path / "tmp").iterdir()) == []  # socket and directory removed


def test_wrap_reports_qemu_that_fails_to_start(tmp_path: Path) -> None:
    tag = f"wraptest{os.getpid()}b"
    done = wrap(tmp_path, "query-status\\n", "-display", "none", "-machine", "nosuch", tag=tag)
    assert done.returncode == 1
    assert done.stderr.startswith("qmp-shell-wrap: QEMU exited with status 1 before it connected")
    assert "unsupported machine type" in done.stderr  # QEMU's own words
    assert list((tmp_path / "tmp").iterdir()) == []


def test_wrap_reports_qemu_gone_first(tmp_path: Path) -> None:
    tag = f"wraptest{os.getpid()}c"
    bare = ["-S", "-display", "none", "-nodefaults", "-machine", "none"]
    done = wrap(tmp_path, "quit\\nquery-status\\n", *bare, tag=tag)
    assert done.returncode == 1
    assert replies(done.stdout) == [{"return": {}}]
    assert done.stderr == "qmp-shell: QEMU exited with status 0\n"
    assert qemu_pids(tag) == []


def test_wrap_ends_qemu_on_sigterm(tmp_path: Path) -> None:
    require_qemu()
    tag = f"wraptest{os.getpid()}d"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    cmd = [str(WRAP), QEMU, "-S", "-display", "none", "-nodefaults", "-machine", "none"]
    proc = subprocess.Popen(
        [*cmd, "-name", tag],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, TMPDIR=str(tmp)),
    )
    try:
        assert say(proc, "query-name") == {"return": {"name": tag}}
        assert len(qemu_pids(tag)) == 1
        (private,) = tmp.iterdir()
        assert private.stat().st_mode & 0o777 == 0o700
        assert (private / "qmp.sock").is_socket()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                f.close()
    assert qemu_pids(tag) == []
    assert list(tmp.iterdir()) == []


def test_wrap_killed_takes_qemu_along(tmp_path: Path) -> None:
    """A QEMU whose monitor loses its peer runs on: the wrapper's death must end it."""
    require_qemu()
    tag = f"wraptest{os.getpid()}g"
    cmd = [str(WRAP), QEMU, "-S", "-display", "none", "-nodefaults", "-machine", "none"]
    proc = subprocess.Popen(
        [*cmd, "-name", tag],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, TMPDIR=str(tmp_path)),
    )
    try:
        assert say(proc, "query-name") == {"return": {"name": tag}}
        (pid,) = qemu_pids(tag)
        proc.kill()
        proc.wait(timeout=10)
        wait_for(
            lambda: not Path(f"/proc/{pid}").exists() or qemu_pids(tag) == [], 10, "QEMU's end"
        )
    finally:
        for leftover in qemu_pids(tag):
            os.kill(leftover, signal.SIGKILL)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                f.close()


def test_wrap_interactive(tmp_path: Path, home: Path) -> None:
    require_qemu()
    tag = f"wraptest{os.getpid()}e"
    args = [QEMU, "-S", "-display", "none", "-nodefaults", "-machine", "none", "-name", tag]
    sh = terminal(WRAP, args, home)
    try:
        sh.expect_exact(PROMPT)
        sh.sendline("query-name")
        sh.expect_exact(f'{{"return": {{"name": "{tag}"}}}}')
        sh.expect_exact(PROMPT)
        sh.sendeof()
        sh.expect(pexpect.EOF)
    finally:
        sh.close(force=True)
    assert sh.exitstatus == 0
    assert qemu_pids(tag) == []


def test_wrap_interactive_reports_qemu_killed_at_the_prompt(tmp_path: Path, home: Path) -> None:
    require_qemu()
    tag = f"wraptest{os.getpid()}f"
    args = [QEMU, "-S", "-display", "none", "-nodefaults", "-machine", "none", "-name", tag]
    sh = terminal(WRAP, args, home)
    try:
        sh.expect_exact(PROMPT)
        sh.send("query-")  # the shell waits for the rest of the line
        (pid,) = qemu_pids(tag)
        os.kill(pid, signal.SIGKILL)
        sh.expect_exact("qmp-shell: QEMU was killed by SIGKILL")
        sh.expect(pexpect.EOF)
    finally:
        sh.close(force=True)
    assert sh.exitstatus == 1
    assert "SIGKILL" not in sh.before  # said once


def test_ctrl_c_drops_the_line_or_the_transaction(vm: VM, home: Path) -> None:
    with interactive(home, str(vm.socket)) as sh:
        sh.send("query-")
        time.sleep(0.2)
        sh.send("\x03")
        sh.expect_exact(PROMPT)
        sh.sendline("transaction(")
        sh.expect_exact("TRANS> ")
        sh.send("\x03")
        sh.expect_exact("(transaction dropped)")
        sh.expect_exact(PROMPT)
        sh.sendline("query-name")
        sh.expect_exact('{"return": {}}')
