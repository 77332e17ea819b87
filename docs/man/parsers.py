"""The argparse parser of every console script, for argparse-manpage at build time.

pyproject.toml's ``[tool.build_manpages]`` names one function of this file per
page.  Each returns the very parser the command parses its arguments with, so a
man page's options never drift from ``--help``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

# argparse-manpage loads this file by its path, from the project's root, with
# the source tree not on sys.path (an isolated build): put it there.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def captured(main: Callable[..., int], *args: Any) -> argparse.ArgumentParser:
    """The parser that ``main(*args)`` builds: its parsing is stopped before it
    parses anything (``parse_args`` and ``parse_intermixed_args`` go through
    ``parse_known_args``).  For the commands whose parser is built inside
    their ``main`` (qom, qom-get, ...)."""

    def stop(self: argparse.ArgumentParser, *_: Any, **__: Any) -> NoReturn:
        raise _Captured(self)

    original = argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_known_args = stop  # type: ignore[method-assign]
    try:
        main(*args)
    except _Captured as got:
        return got.parser
    finally:
        argparse.ArgumentParser.parse_known_args = original  # type: ignore[method-assign]
    raise RuntimeError(f"{main.__name__} returned without parsing its arguments")


def qom_fuse() -> argparse.ArgumentParser:
    from qomfs.cli import build_parser

    return build_parser()


def qom() -> argparse.ArgumentParser:
    from qomfs import tools

    return captured(tools.main, [])


def qom_get() -> argparse.ArgumentParser:
    from qomfs import tools

    return captured(tools.main_get, [], "qom-get")


def qom_set() -> argparse.ArgumentParser:
    from qomfs import tools

    return captured(tools.main_set, [], "qom-set")


def qom_list() -> argparse.ArgumentParser:
    from qomfs import tools

    return captured(tools.main_list, [], "qom-list")


def qom_tree() -> argparse.ArgumentParser:
    from qomfs import tools

    return captured(tools.main_tree, [], "qom-tree")


def qmp() -> argparse.ArgumentParser:
    from qomfs.qmpcmd import make_parser

    return make_parser()


def qmp_shell() -> argparse.ArgumentParser:
    from qomfs.shell.main import make_parser

    return make_parser()


def qmp_shell_wrap() -> argparse.ArgumentParser:
    from qomfs.shell.wrap import make_parser

    return make_parser()


def qemu_ga_client() -> argparse.ArgumentParser:
    from qomfs.ga import main

    return captured(main.main, [])


#: Console script -> the function that gives its parser.
PAGES: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "qom-fuse": qom_fuse,
    "qom": qom,
    "qom-get": qom_get,
    "qom-set": qom_set,
    "qom-list": qom_list,
    "qom-tree": qom_tree,
    "qmp": qmp,
    "qmp-shell": qmp_shell,
    "qmp-shell-wrap": qmp_shell_wrap,
    "qemu-ga-client": qemu_ga_client,
}
