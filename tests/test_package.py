"""``python -m build`` makes an sdist and a wheel; the wheel, installed with its
dependencies into a fresh virtualenv, gives every console script, each of
which answers --help and --version, and a typed ``qomfs`` package."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from qomfs import __version__
from tests.harness import ROOT
from tests.packaging import dists, install_wheel

SCRIPTS = sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtualenv with the wheel and its dependencies installed."""
    where = tmp_path_factory.mktemp("venv") / "v"
    install_wheel(where, dists().wheel, deps=True, timeout=600)
    yield where


def run(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A program of the venv, away from the source tree (cwd and environment)."""
    return subprocess.run(
        list(args),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=venv,
        env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(venv), "LC_ALL": "C.UTF-8"},
        stdin=subprocess.DEVNULL,
    )


def test_the_sdist_holds_what_a_build_needs() -> None:
    with tarfile.open(dists().sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for need in (
        "pyproject.toml",
        "README.md",
        "qomfs/py.typed",
        "qomfs/api.py",
        "docs/man/parsers.py",
        "docs/man/qom-tree.txt",
    ):
        assert need in names, need


def test_the_wheel_is_typed_and_has_every_module() -> None:
    with zipfile.ZipFile(dists().wheel) as z:
        names = set(z.namelist())
    source = {str(p.relative_to(ROOT)) for p in (ROOT / "qomfs").rglob("*.py")}
    assert source <= names, source - names
    assert "qomfs/py.typed" in names


def test_the_installed_package_comes_from_the_wheel(venv: Path) -> None:
    r = run(
        venv,
        str(venv / "bin" / "python"),
        "-c",
        "import qomfs, qomfs.api, sys; print(qomfs.__file__); print(sys.version_info[:2])",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(str(venv)), r.stdout


@pytest.mark.parametrize("prog", SCRIPTS)
def test_every_console_script_answers_help_and_version(venv: Path, prog: str) -> None:
    exe = venv / "bin" / prog
    helped = run(venv, str(exe), "--help")
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: ") and prog in helped.stdout.splitlines()[0]
    assert helped.stderr == ""
    version = run(venv, str(exe), "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"{prog} {__version__}", version.stdout


def test_the_installed_package_is_typed(venv: Path, tmp_path: Path) -> None:
    """mypy --strict, pointed at the fresh venv, takes qomfs' own hints (py.typed):
    README's example passes, and a wrong use of a result is caught."""
    from tests.test_api import EXAMPLE

    (tmp_path / "example.py").write_text(EXAMPLE)
    (tmp_path / "wrong.py").write_text(
        'import qomfs\n\n\ndef f(vm: qomfs.VM) -> int:\n    return vm.list("/")\n'
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--python-executable",
            str(venv / "bin" / "python"),
            "example.py",
            "wrong.py",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    errors = [line for line in r.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and errors[0].startswith("wrong.py:5:"), r.stdout
    assert 'got "list[Property]", expected "int"' in errors[0]
