"""Man pages: the wheel carries one per console script under share/man/man1, made
from the command's own parser, and man finds them in a fresh virtualenv from PATH."""

from __future__ import annotations

import argparse
import configparser
import os
import re
import runpy
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ROOT, missing
from tests.packaging import dists, install_wheel

PARSERS = runpy.run_path(str(ROOT / "docs" / "man" / "parsers.py"))
#: roff requests the pages may use (a line that starts with '.' is a request).
REQUESTS = {"TH", "SH", "SS", "TP", "PP", "B", "BR", "I", "IR", "RS", "RE", "nf", "fi", "UR", "UE"}


def console_scripts() -> list[str]:
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        return sorted(tomllib.load(f)["project"]["scripts"])


def test_every_console_script_has_a_parser_and_hand_written_text() -> None:
    pages: dict[str, object] = PARSERS["PAGES"]
    assert sorted(pages) == console_scripts()
    for name, make in pages.items():
        parser = make()  # type: ignore[operator]
        assert isinstance(parser, argparse.ArgumentParser)
        assert parser.prog == name
        text = (ROOT / "docs" / "man" / f"{name}.txt").read_text()
        assert "[EXAMPLES]" in text and "[<DESCRIPTION]" in text, name


def test_the_page_parser_is_the_one_the_command_parses_with() -> None:
    """qom-get's page comes from the parser that main_get builds: an option added
    there shows in the page (captured, not a copy)."""
    parser = PARSERS["qom_get"]()
    options = {s for a in parser._actions for s in a.option_strings}
    assert {"--socket", "--timeout"} <= options
    helped = subprocess.run(
        [Path(sys.executable).parent / "qom-get", "--help"], capture_output=True, text=True
    )
    for option in options:
        assert option in helped.stdout


@pytest.fixture(scope="module")
def wheel() -> Path:
    """The wheel ``python -m build`` makes (built once per session, shared with
    tests/test_package.py)."""
    return dists().wheel


def man_pages(wheel: Path) -> dict[str, str]:
    with zipfile.ZipFile(wheel) as z:
        return {
            Path(n).name: z.read(n).decode()
            for n in z.namelist()
            if re.fullmatch(r"qomfs-[^/]+\.data/data/share/man/man1/[^/]+\.1", n)
        }


def entry_points(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
        config = configparser.ConfigParser()
        config.read_string(z.read(name).decode())
    return sorted(config["console_scripts"])


def test_the_wheel_has_a_page_for_every_console_script(wheel: Path) -> None:
    pages = man_pages(wheel)
    scripts = entry_points(wheel)
    assert "qmp" in scripts and "qom-fuse" in scripts
    assert set(pages) == {f"{s}.1" for s in scripts}
    for name, text in pages.items():
        prog = name.removesuffix(".1")
        assert text.startswith(f'.TH {prog.upper().replace("-", chr(92) + "-")} "1"'), name
        assert "\n.SH EXAMPLES\n" in text and "\n.SH OPTIONS\n" in text, name
        for number, line in enumerate(text.splitlines(), 1):
            # a line that starts with ' or an unknown .request would vanish from the page
            assert not line.startswith("'"), f"{name}:{number}: {line}"
            if line.startswith("."):
                assert line[1:].split(" ")[0] in REQUESTS, f"{name}:{number}: {line}"


def test_every_option_of_each_parser_is_in_its_page(wheel: Path) -> None:
    pages = man_pages(wheel)
    for prog, make in PARSERS["PAGES"].items():
        text = pages[f"{prog}.1"].replace("\\-", "-")
        for action in make()._actions:
            if isinstance(action, argparse._HelpAction):
                continue  # (argparse-manpage leaves -h out)
            for option in action.option_strings:
                assert option in text, (prog, option)


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtualenv with the wheel installed (its dependencies left out)."""
    where = tmp_path_factory.mktemp("venv") / "v"
    install_wheel(where, wheel, deps=False, timeout=300)
    yield where


def man(venv: Path, *args: str, lang: str = "C") -> subprocess.CompletedProcess[str]:
    """``man ARGS`` with the venv's bin first on PATH (as activate does), no MANPATH."""
    if shutil.which("man") is None:
        missing("man is not installed (apt-get install man-db)")
    env = {
        "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(venv),
        "LC_ALL": lang,
        "MANPAGER": "cat",
        "MANWIDTH": "100",
    }
    return subprocess.run(["man", *args], capture_output=True, text=True, env=env, timeout=60)


def test_man_finds_the_venvs_pages(venv: Path) -> None:
    for name in ("qmp", "qom-fuse", "qemu-ga-client"):
        r = man(venv, "-w", name)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == str(venv / "share" / "man" / "man1" / f"{name}.1")
    # and not without the venv on PATH
    r = subprocess.run(
        ["man", "-w", "qmp"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(venv)},
    )
    assert str(venv) not in r.stdout


@pytest.mark.parametrize("lang", ["C", "C.UTF-8"])
def test_man_qom_fuse_shows_ttl(venv: Path, lang: str) -> None:
    r = man(venv, "qom-fuse", lang=lang)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(line.strip().startswith("--ttl SECONDS") for line in lines), r.stdout
    assert "EXAMPLES" in lines
    assert any("qom-fuse -s /tmp/vm.sock /mnt/qom" in line for line in lines)


def test_man_qmp_shows_its_options_and_examples(venv: Path) -> None:
    r = man(venv, "qmp")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    for option in ("-s ADDR, --path ADDR", "--json", "--wait EVENT[,EVENT...]", "--timeout S"):
        assert option in text, option
    assert "qmp --wait RESUME cont" in text
    assert "QMP_PATH" in text


def test_installed_scripts_run_in_the_fresh_venv(venv: Path) -> None:
    """The console scripts are there; qmp's usage error needs no QEMU."""
    assert os.access(venv / "bin" / "qmp", os.X_OK)
    r = subprocess.run(
        [venv / "bin" / "qmp", "query-status"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 2 and "no QMP socket" in r.stderr
