"""qom-get, qom-set, qom-list, qom-tree and qom, on real QEMUs.

Each tool runs as a subprocess through its real command line, on the VM's
first monitor; expectations come from the VM's second monitor through the
harness's independent RawQMP, never from the tools' own output.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qomfs import __version__
from qomfs.errors import NotFound
from qomfs.model import QOMTree
from qomfs.qmp import QMPClient
from qomfs.tools import main as qom_main
from qomfs.tools import main_get, main_list, main_set, main_tree, qom_tree
from qomfs.tree import Listing
from tests.harness import ROOT, VM, RawQMP, expected_text, missing, qemu_vm, walk_qmp

CHROOT = Path(os.environ.get("QOMFS_QEMU11_ROOT", "/var/lib/qomfs/trixie"))
QEMU11 = [str(ROOT / "scripts" / "qemu11")]
ENV = {k: v for k, v in os.environ.items() if k != "QMP_SOCKET"} | {"PYTHONPATH": str(ROOT)}

Block = tuple[str, list[tuple[str, str, str]]]  # path, [(name, value text, type)]


def run(
    main: str, *args: str, sock: Path | str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``qomfs.tools.<main>`` with ``args`` as its command line, in a subprocess."""
    code = f"import sys; from qomfs.tools import {main}; sys.exit({main}())"
    sock_args = ["-s", str(sock)] if sock is not None else []
    return subprocess.run(
        [sys.executable, "-c", code, *args, *sock_args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env or ENV,
        stdin=subprocess.DEVNULL,
    )


def one_error_line(res: subprocess.CompletedProcess[str], prog: str) -> str:
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: "), res.stderr
    return lines[0]


def raw_error(qmp: RawQMP, name: str, **args: Any) -> str:
    """QEMU's ``desc`` for a command that must fail."""
    with pytest.raises(RuntimeError) as exc:
        qmp.cmd(name, **args)
    return str(exc.value.args[1])


def dfs_order(tree: dict[str, list[dict[str, str]]], root: str) -> list[str]:
    """Object paths depth-first, children in qom-list order."""
    out = [root]
    for p in tree[root]:
        if p["type"].startswith("child<"):
            out += dfs_order(tree, root.rstrip("/") + "/" + p["name"])
    return out


def parse_tree(text: str) -> list[Block]:
    """qom-tree output -> blocks; asserts the shape of every line."""
    blocks: list[Block] = []
    current: Block | None = None
    for line in text.split("\n")[:-1]:
        if line == "":
            assert current is not None
            blocks.append(current)
            current = None
        elif line.startswith("  "):
            assert current is not None, line
            name, rest = line[2:].split(": ", 1)
            assert rest.endswith(")"), line
            value, type_ = rest[:-1].rsplit(" (", 1)
            current[1].append((name, value, type_))
        else:
            assert current is None, line
            current = (line, [])
    assert current is None and text.endswith("\n\n")
    return blocks


def moves_on_its_own(qmp: RawQMP, path: str, name: str, value: object) -> bool:
    """Whether the property's value changes within 2.5 s of reading ``value``."""
    for _ in range(25):
        if qmp.cmd("qom-get", path=path, property=name) != value:
            return True
        time.sleep(0.1)
    return False


def assert_tree_matches(
    blocks: list[Block], qmp: RawQMP, tree: dict[str, list[dict[str, str]]], root: str
) -> int:
    """Every object, property, type and value as QEMU says; returns unreadable count."""
    assert [path for path, _ in blocks] == dfs_order(tree, root)
    unreadable = 0
    for path, props in blocks:
        want = [p for p in tree[path] if not p["type"].startswith("child<")]
        assert [(n, t) for n, _, t in props] == [(p["name"], p["type"]) for p in want], path
        for name, text, _ in props:
            try:
                value = qmp.cmd("qom-get", path=path, property=name)
            except RuntimeError as err:
                assert text == f"<EXCEPTION: {err.args[1]}>", (path, name)
                unreadable += 1
                continue
            if text != expected_text(value)[:-1]:
                # Only a value that moves on its own (a clock) may differ; a
                # clock that ticks once a second may need that long to move.
                assert moves_on_its_own(qmp, path, name, value), (path, name, text)
    return unreadable


# --- QEMU 7.2: no qom-list-get --------------------------------------------------


@pytest.fixture(scope="module")
def raw(vm: VM) -> Iterator[RawQMP]:
    with vm.qmp() as qmp:
        yield qmp


@pytest.mark.parametrize(
    ("path_prop", "kind"),
    [
        ("/machine.type", str),
        ("/machine.graphics", bool),
        ("/machine/q35/ioapic.version", int),
        ("/machine.smp", dict),
        ("/machine/q35/pcie.0.type", str),  # the last '.' separates the property
    ],
)
def test_get(vm: VM, raw: RawQMP, path_prop: str, kind: type) -> None:
    path, prop = path_prop.rsplit(".", 1)
    value = raw.cmd("qom-get", path=path, property=prop)
    assert type(value) is kind
    res = run("main_get", path_prop, sock=vm.socket)
    assert (res.returncode, res.stderr) == (0, "")
    assert res.stdout == expected_text(value)


def test_set_bool_then_restore(vm: VM, raw: RawQMP) -> None:
    before = raw.cmd("qom-get", path="/machine", property="graphics")
    try:
        res = run("main_set", "/machine.graphics", "false", sock=vm.socket)
        assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
        assert raw.cmd("qom-get", path="/machine", property="graphics") is False
        res = run("main_set", "/machine.graphics", "on", sock=vm.socket)
        assert res.returncode == 0, res.stderr
        assert raw.cmd("qom-get", path="/machine", property="graphics") is True
    finally:
        raw.cmd("qom-set", path="/machine", property="graphics", value=before)


def test_set_text_that_is_not_of_the_type(vm: VM, raw: RawQMP) -> None:
    before = raw.cmd("qom-get", path="/machine", property="graphics")
    res = run("main_set", "/machine.graphics", "maybe", sock=vm.socket)
    assert res.returncode == 1
    line = one_error_line(res, "qom-set")
    assert "/machine/graphics" in line and "'maybe'" in line and "boolean" in line
    assert raw.cmd("qom-get", path="/machine", property="graphics") == before


def test_set_value_qemu_refuses(vm: VM, raw: RawQMP) -> None:
    before = raw.cmd("qom-get", path="/machine", property="acpi")
    desc = raw_error(raw, "qom-set", path="/machine", property="acpi", value="maybe")
    res = run("main_set", "/machine.acpi", "maybe", sock=vm.socket)
    assert res.returncode == 1
    assert desc in one_error_line(res, "qom-set")
    assert raw.cmd("qom-get", path="/machine", property="acpi") == before


def test_set_read_only(vm: VM, raw: RawQMP) -> None:
    before = raw.cmd("qom-get", path="/machine", property="type")
    res = run("main_set", "/machine.type", "x", sock=vm.socket)
    assert res.returncode == 1
    assert "not writable" in one_error_line(res, "qom-set")
    assert raw.cmd("qom-get", path="/machine", property="type") == before


def test_set_realized_false_needs_force(vm: VM, raw: RawQMP) -> None:
    assert raw.cmd("qom-get", path="/machine/q35/ioapic", property="realized") is True
    res = run("main_set", "/machine/q35/ioapic.realized", "false", sock=vm.socket)
    assert res.returncode == 1
    assert "--force" in one_error_line(res, "qom-set")
    assert raw.cmd("qom-get", path="/machine/q35/ioapic", property="realized") is True


@pytest.mark.parametrize(("path", "prop"), [("/machine", "nope"), ("/machine/nope", "type")])
def test_get_missing(vm: VM, raw: RawQMP, path: str, prop: str) -> None:
    desc = raw_error(raw, "qom-get", path=path, property=prop)
    res = run("main_get", f"{path}.{prop}", sock=vm.socket)
    assert res.returncode == 1
    assert desc in one_error_line(res, "qom-get")


def test_set_missing(vm: VM) -> None:
    res = run("main_set", "/machine/nope.type", "x", sock=vm.socket)
    assert res.returncode == 1
    assert "no such object" in one_error_line(res, "qom-set")


def test_usage_errors(vm: VM) -> None:
    for main, args in [("main_get", ["/machine"]), ("main_set", ["/machine/q35/pcie.0/x", "1"])]:
        res = run(main, *args, sock=vm.socket)
        assert res.returncode == 2
        assert "PATH.PROPERTY" in res.stderr and res.stdout == ""


@pytest.mark.parametrize("path", ["/machine", "/", None])
def test_list(vm: VM, raw: RawQMP, path: str | None) -> None:
    want = []
    for p in raw.cmd("qom-list", path=path or "/"):
        if p["type"].startswith("child<"):
            want.append(p["name"] + "/")
        elif p["type"].startswith("link<"):
            want.append("@" + p["name"] + "/")
        else:
            want.append(p["name"])
    assert any(w.startswith("@") for w in want) or path != "/machine"
    res = run("main_list", *([path] if path else []), sock=vm.socket)
    assert (res.returncode, res.stderr) == (0, "")
    assert res.stdout.splitlines() == want


def test_list_missing(vm: VM) -> None:
    res = run("main_list", "/nope", sock=vm.socket)
    assert res.returncode == 1
    assert "/nope: no such object" in one_error_line(res, "qom-list")


@pytest.mark.parametrize("root", ["/machine/q35", "/machine/unattached/device[0]"])
def test_tree(vm: VM, raw: RawQMP, root: str) -> None:
    tree = walk_qmp(raw, root)
    res = run("main_tree", root, sock=vm.socket)
    assert (res.returncode, res.stderr) == (0, "")
    unreadable = assert_tree_matches(parse_tree(res.stdout), raw, tree, root)
    if root.endswith("device[0]"):  # the CPU: legacy-memory has no getter
        assert unreadable >= 1


def test_tree_missing(vm: VM) -> None:
    res = run("main_tree", "/nope", sock=vm.socket)
    assert res.returncode == 1
    assert "/nope: no such object" in one_error_line(res, "qom-tree")


def test_qom_entry_point(vm: VM, raw: RawQMP) -> None:
    res = run("main", "get", "/machine.type", sock=vm.socket)
    assert (res.returncode, res.stderr) == (0, "")
    assert res.stdout == expected_text(raw.cmd("qom-get", path="/machine", property="type"))
    res = run("main", "fuse", "--help")
    assert res.returncode == 0 and "qom-fuse" in res.stdout and "MOUNTPOINT" in res.stdout.upper()
    res = run("main", "--help")
    assert res.returncode == 0
    assert all(c in res.stdout for c in ("get", "set", "list", "tree", "fuse"))
    res = run("main", "frobnicate")
    assert res.returncode == 2


def test_help_version_and_environment(vm: VM) -> None:
    for main in ("main_get", "main_set", "main_list", "main_tree"):
        res = run(main, "--help")
        assert res.returncode == 0 and "examples:" in res.stdout and "QMP_SOCKET" in res.stdout
        res = run(main, "-V")
        assert res.returncode == 0 and __version__ in res.stdout
    res = run("main_get", "/machine.type", env=ENV | {"QMP_SOCKET": str(vm.socket)})
    assert res.returncode == 0 and res.stdout.startswith("pc-q35-")


def test_no_socket(vm: VM) -> None:
    for main, args in [("main_get", ["/machine.type"]), ("main_tree", []), ("main_list", [])]:
        res = run(main, *args)
        assert res.returncode != 0
        assert "QMP_SOCKET" in res.stderr


def test_socket_that_does_not_exist(tmp_path: Path) -> None:
    res = run("main_list", "/", sock=tmp_path / "nope.sock")
    assert res.returncode == 1
    assert "no such socket" in one_error_line(res, "qom-list")


# --- QEMU 11.1: qom-list-get ----------------------------------------------------


@pytest.fixture(scope="module")
def vm11(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VM]:
    if not (CHROOT / "usr/bin/qemu-system-x86_64").exists():
        missing(f"QEMU 11.1 chroot missing at {CHROOT} (run scripts/qemu11-setup)")
    work = tmp_path_factory.mktemp("vm11")
    with qemu_vm(work, qemu=QEMU11, sock_dir=CHROOT / "tmp", name=f"tools{os.getpid()}") as vm:
        yield vm


@pytest.fixture
def client11(vm11: VM) -> Iterator[QMPClient]:
    with QMPClient(str(vm11.socket)) as client:
        assert client.has_command("qom-list-get")
        yield client


def test_tree_11_one_qom_list_get_per_level(client11: QMPClient, vm11: VM) -> None:
    with vm11.qmp() as qmp:
        tree = walk_qmp(qmp)
        batch = qmp.cmd("qom-list-get", paths=list(tree))
        no_value = sum(
            "value" not in p and not p["type"].startswith("child<")
            for obj in batch
            for p in obj["properties"]
        )
        depth = max(path.count("/") for path in tree if path != "/")
        before = client11.command_counts()
        text = "".join(line + "\n" for line in qom_tree(QOMTree(client11, ttl=0), "/"))
        after = client11.command_counts()
        spent = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        assert 1 <= spent.pop("qom-list-get") <= depth + 1
        assert spent.pop("qom-get", 0) == no_value  # only what the batch could not read
        assert spent == {}
        assert assert_tree_matches(parse_tree(text), qmp, tree, "/") == no_value


def test_tree_11_batch_and_no_batch_agree(vm11: VM) -> None:
    # /machine/q35 holds no clock, so both walks must print the same text.
    batched = run("main_tree", "/machine/q35", sock=vm11.socket)
    plain = run("main_tree", "--no-batch", "/machine/q35", sock=vm11.socket)
    assert batched.returncode == plain.returncode == 0
    assert batched.stdout == plain.stdout and batched.stdout.count("\n\n") > 50


def spent_on(client: QMPClient, work: Callable[[], object]) -> dict[str, int]:
    before = client.command_counts()
    work()
    after = client.command_counts()
    return {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}


def test_tree_11_level_with_a_vanished_object(client11: QMPClient) -> None:
    """qom-tree's levels come through the model's one fallback: a path gone
    fails the batch, so each is asked alone, and qom-list says why."""
    tree = QOMTree(client11, ttl=0)
    got: list[tuple[Listing, dict[str, Any]]] = []
    level = ["/machine", "/machine/nope", "/chardevs"]
    spent = spent_on(client11, lambda: got.extend(tree.list_get(level, gone_ok=True)))
    assert [listing.path for listing, _ in got] == ["/machine", "/chardevs"]
    assert "type" in got[0][0].properties
    assert got[0][1]["type"].startswith("pc-q35-")
    assert spent == {"qom-list-get": 1 + len(level), "qom-list": 1}


def test_tree_11_root_that_is_no_object(client11: QMPClient) -> None:
    tree = QOMTree(client11, ttl=0)
    with pytest.raises(NotFound):
        list(qom_tree(tree, "/nope"))
    # One qom-list-get refused, then qom-list for QEMU's reason (the same
    # path was once asked alone a second time).

    def list_it() -> None:
        with pytest.raises(NotFound):
            tree.list_get(["/nope"])

    spent = spent_on(client11, list_it)
    assert spent == {"qom-list-get": 1, "qom-list": 1}


# --- --timeout: the same checks and words as qom-fuse's ---------------------------


def usage_error(capsys: pytest.CaptureFixture[str], entry: Callable[[], int]) -> str:
    """The one line an entry point that exits 2 prints last, after "error: "."""
    with pytest.raises(SystemExit) as exc:
        entry()
    assert exc.value.code == 2
    line = capsys.readouterr().err.splitlines()[-1]
    prog, sep, message = line.partition(": error: ")
    assert sep and prog, line
    return message


#: Each tool's entry point, with arguments after the timeout.
TOOLS: dict[str, tuple[Callable[[list[str]], int], list[str]]] = {
    "qom-get": (main_get, ["/machine.type"]),
    "qom-set": (main_set, ["/machine.graphics", "false"]),
    "qom-list": (main_list, ["/machine"]),
    "qom-tree": (main_tree, ["/machine"]),
    "qom get": (lambda args: qom_main(["get", *args]), ["/machine.type"]),
}


@pytest.mark.parametrize("value", ["nan", "0", "-1", "1e7", "inf", "soon"])
@pytest.mark.parametrize("tool", list(TOOLS))
def test_bad_timeout_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], value: str, tool: str
) -> None:
    from qomfs import cli

    fuse = usage_error(capsys, lambda: cli.main(["--timeout", value, "-s", "/x", "/mnt"]))
    assert fuse.startswith("argument --timeout: ")
    assert "a timeout is" in fuse or "not a number" in fuse
    entry, rest = TOOLS[tool]
    args = ["-s", "/nonexistent.sock", "--timeout", value, *rest]
    assert usage_error(capsys, lambda: entry(args)) == fuse


def test_good_timeout_goes_on_to_connect(capsys: pytest.CaptureFixture[str]) -> None:
    assert main_get(["-s", "/nonexistent.sock", "--timeout", "0.5", "/machine.type"]) == 1
    assert capsys.readouterr().err.startswith("qom-get: ")
