"""Shell completion for every qomfs command, through argcomplete: options from
each command's own parser, QOM paths from the live tree for qom-get, qom-set,
qom-list and qom-tree.

Costs nothing unless the shell asks (``_ARGCOMPLETE`` set), and nothing breaks
when argcomplete is not installed: there is then no completion.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

#: How long a completion may wait for QEMU: a <TAB> must not hang the shell.
TIMEOUT = 2.0


def autocomplete(parser: argparse.ArgumentParser) -> None:
    """Answer the shell's completion request, if this run is one (argcomplete's
    protocol: ``_ARGCOMPLETE``, ``COMP_LINE``, ``COMP_POINT``; the answer goes
    to fd 8), and exit; return at once otherwise."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(parser)


def _address(parsed_args: argparse.Namespace | None) -> str | None:
    address = getattr(parsed_args, "socket", None) or os.environ.get("QMP_SOCKET")
    return address if isinstance(address, str) and address else None


def _listing(address: str, path: str) -> list[tuple[str, bool]]:
    """(name, is_child) of the object at ``path``; [] when anything fails."""
    from qomfs.errors import QomfsError
    from qomfs.qmp import QMPClient

    client = QMPClient(address, timeout=TIMEOUT, connect_timeout=TIMEOUT, reconnect=False)
    try:
        client.connect()
        props = client.execute("qom-list", {"path": path})
    except (QomfsError, OSError):
        return []
    finally:
        client.close()
    out = []
    for p in props if isinstance(props, list) else []:
        if isinstance(p, dict) and isinstance(p.get("name"), str):
            out.append((p["name"], str(p.get("type", "")).startswith("child<")))
    return out


def _join(parent: str, name: str) -> str:
    return f"{parent.rstrip('/')}/{name}"


def qom_paths(prefix: str, address: str | None, properties: bool) -> list[str]:
    """Completions of ``prefix`` from the live tree at ``address``.

    Objects complete as ``PATH/`` (to go on down); with ``properties`` (qom-get's
    and qom-set's ``PATH.PROPERTY``) also as ``PATH.``, and once an object and
    its ``.`` are typed, its properties as ``PATH.PROPERTY``.
    """
    if address is None:
        return []
    if not prefix.startswith("/"):
        prefix = "/" + prefix
    parent, _, partial = prefix.rpartition("/")
    parent = parent or "/"
    listed = _listing(address, parent)
    out: list[str] = []
    for name, is_child in listed:
        if not is_child:
            continue
        if name.startswith(partial):
            out.append(_join(parent, name) + "/")
            if properties:
                out.append(_join(parent, name) + ".")
        elif properties and partial.startswith(name + "."):
            obj = _join(parent, name)
            rest = partial[len(name) + 1 :]
            out.extend(
                f"{obj}.{prop}"
                for prop, child in _listing(address, obj)
                if not child and prop.startswith(rest)
            )
    return out


def path_completer(properties: bool) -> Callable[..., list[str]]:
    """An argcomplete completer of QOM paths, the socket from ``-s`` or $QMP_SOCKET."""

    def complete(prefix: str, parsed_args: argparse.Namespace | None = None, **_: Any) -> list[str]:
        return qom_paths(prefix, _address(parsed_args), properties)

    return complete


def set_completer(action: argparse.Action, completer: Callable[..., list[str]]) -> None:
    """Attach ``completer`` to ``action`` (argcomplete reads the attribute)."""
    action.completer = completer  # type: ignore[attr-defined]
