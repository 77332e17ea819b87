"""qomfs: a running QEMU's object model (QOM) as an ordinary filesystem, and a
Python API on the same QMP client (:func:`connect`).

``import qomfs`` stays light: :func:`connect`, :class:`VM` and the exceptions
are loaded on first use.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# A library logs, it does not print: without a handler of the program's own
# (qom-fuse makes one), qomfs' log lines go nowhere, not to stderr.
logging.getLogger("qomfs").addHandler(logging.NullHandler())

if TYPE_CHECKING:
    from qomfs.api import VM, connect
    from qomfs.errors import (
        CommandTimeout,
        ConnectError,
        ConnectionLost,
        ExecuteError,
        InvalidValue,
        NotFound,
        NotWritable,
        QMPError,
        QOMError,
        QomfsError,
    )
    from qomfs.qmp import Event
    from qomfs.tree import Property

__all__ = [
    "VM",
    "CommandTimeout",
    "ConnectError",
    "ConnectionLost",
    "Event",
    "ExecuteError",
    "InvalidValue",
    "NotFound",
    "NotWritable",
    "Property",
    "QMPError",
    "QOMError",
    "QomfsError",
    "__version__",
    "connect",
]

_WHERE = {
    "VM": "qomfs.api",
    "connect": "qomfs.api",
    "Event": "qomfs.qmp",
    "Property": "qomfs.tree",
}


def __getattr__(name: str) -> Any:
    if name in __all__ and name != "__version__":
        import importlib

        return getattr(importlib.import_module(_WHERE.get(name, "qomfs.errors")), name)
    raise AttributeError(f"module 'qomfs' has no attribute {name!r}")
