"""Shell completion, driven the way bash drives it: argcomplete's environment
protocol (``_ARGCOMPLETE=1``, ``COMP_LINE``, ``COMP_POINT``, the answer on fd 8)
and, once, bash itself running the function ``register-python-argcomplete``
installs.  QOM paths are checked against a live VM's tree as its second monitor
lists it; options against each command's ``--help``.
"""

from __future__ import annotations

import argparse
import os
import re
import runpy
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ROOT, VM, RawQMP, missing
from tests.qemus import VERSIONS, any_qemu_vm

BIN = Path(sys.executable).parent  # the venv's console scripts
PARSERS = runpy.run_path(str(ROOT / "docs" / "man" / "parsers.py"))
SCRIPTS = sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
ENV = {k: v for k, v in os.environ.items() if k != "QMP_SOCKET"} | {
    "PYTHONPATH": str(ROOT),
    "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
}


@pytest.fixture(scope="module", params=VERSIONS)
def qvm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VM]:
    with any_qemu_vm(request.param, tmp_path_factory.mktemp("vm"), "cmp") as machine:
        yield machine


@pytest.fixture(scope="module")
def raw(qvm: VM) -> Iterator[RawQMP]:
    with qvm.qmp() as q:
        yield q


def script(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        missing(f"{path} is not installed (pip install -e .)")
    return path


def complete(line: str, env: dict[str, str] | None = None) -> list[str]:
    """What the command named first in ``line`` offers for a <TAB> at its end.

    As bash's hook runs it: fd 8 is where the answer goes (the shell's stdout
    here), stdout and stderr are muted, stdin is /dev/null."""
    prog = script(line.split()[0])
    res = subprocess.run(
        ["bash", "-c", '"$0" 8>&1 9>/dev/null 1>/dev/null 2>&1 </dev/null', str(prog)],
        capture_output=True,
        text=True,
        timeout=60,
        env=(env or ENV)
        | {
            "_ARGCOMPLETE": "1",
            "_ARGCOMPLETE_SHELL": "bash",
            "_ARGCOMPLETE_SUPPRESS_SPACE": "1",
            "COMP_LINE": line,
            "COMP_POINT": str(len(line)),
        },
    )
    assert res.returncode == 0, (line, res.stdout, res.stderr)
    return [c for c in res.stdout.split("\013") if c]


def unquote(word: str) -> str:
    """bash's view of a completion: argcomplete escapes [ ] and friends."""
    return re.sub(r"\\(.)", r"\1", word)


def children(raw: RawQMP, path: str) -> list[str]:
    return [p["name"] for p in raw.cmd("qom-list", path=path) if p["type"].startswith("child<")]


@pytest.mark.parametrize("prog", SCRIPTS)
def test_every_commands_options_complete(prog: str) -> None:
    """``PROG --<TAB>`` offers exactly the long options of the command's parser
    (the one its man page is made from, docs/man/parsers.py)."""
    parser = PARSERS["PAGES"][prog]()
    want = {
        option
        for action in parser._actions
        if action.help != argparse.SUPPRESS
        for option in action.option_strings
        if option.startswith("--")
    }
    assert "--help" in want
    got = set(complete(f"{prog} --"))
    assert got == want, prog


def test_qom_tree_format_choices() -> None:
    assert complete("qom-tree --format ") == ["text", "json", "dot", "svg", "png"]


def test_qom_completes_its_commands() -> None:
    assert set(complete("qom ")) >= {"fuse", "get", "list", "set", "tree"}
    assert complete("qom tree --fo") == ["--format"]
    assert complete("qom  fuse --tt") == ["--ttl"]


def test_paths_from_the_live_tree(qvm: VM, raw: RawQMP) -> None:
    sock = str(qvm.socket)
    root_kids = children(raw, "/")
    assert sorted(map(unquote, complete(f"qom-list -s {sock} /"))) == sorted(
        f"/{c}/" for c in root_kids
    )
    # objects: PATH/ to go down, and for qom-get PATH. to name a property
    machine = children(raw, "/machine")
    got = sorted(map(unquote, complete(f"qom-get -s {sock} /machine/p")))
    want = sorted(f"/machine/{c}{end}" for c in machine if c.startswith("p") for end in "/.")
    assert got == want and want
    # the properties of an object, a name with a '.' in it included (pcie.0)
    for obj in ("/machine/q35", "/machine/q35/pcie.0"):
        props = [p["name"] for p in raw.cmd("qom-list", path=obj)]
        got = sorted(map(unquote, complete(f"qom-get -s {sock} {obj}.")))
        assert got == sorted(f"{obj}.{p}" for p in props if p not in children(raw, obj)), obj
    # qom get is qom-get
    assert sorted(map(unquote, complete(f"qom get -s {sock} /machine/p"))) == want
    # names with [ ] come back escaped for bash
    got = complete(f"qom-set -s {sock} /machine/unattached/device")
    assert any("\\[" in word for word in got)


def test_socket_from_the_environment(qvm: VM, raw: RawQMP) -> None:
    env = ENV | {"QMP_SOCKET": str(qvm.socket)}
    got = sorted(map(unquote, complete("qom-tree /m", env=env)))
    assert got == sorted(f"/{c}/" for c in children(raw, "/") if c.startswith("m"))
    # no socket at all, or one nobody serves: options only, no paths, no hang
    assert complete("qom-get /m") == []
    assert complete("qom-get -s /nonexistent.sock /m") == []


def test_bash_runs_the_registered_hook(qvm: VM, raw: RawQMP) -> None:
    """The function ``eval "$(register-python-argcomplete qom-get)"`` defines,
    called as bash calls it on <TAB>, fills COMPREPLY from the live tree."""
    register = BIN / "register-python-argcomplete"
    if not register.exists() or shutil.which("bash") is None:
        missing("argcomplete's register-python-argcomplete is not installed")
    line = f"qom-get -s {qvm.socket} /machine/q35/pcie.0.ty"
    code = f"""
        eval "$({register} qom-get)"
        COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}; COMP_TYPE=9
        COMP_WORDS=(qom-get -s '{qvm.socket}' /machine/q35/pcie.0.ty); COMP_CWORD=3
        _python_argcomplete qom-get /machine/q35/pcie.0.ty '{qvm.socket}'
        printf '%s\\n' "${{COMPREPLY[@]}}"
    """
    res = subprocess.run(["bash", "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert res.returncode == 0, res.stderr
    props = [p["name"] for p in raw.cmd("qom-list", path="/machine/q35/pcie.0")]
    want = [f"/machine/q35/pcie.0.{p}" for p in props if p.startswith("ty")]
    assert [w.strip() for w in res.stdout.splitlines()] == want
