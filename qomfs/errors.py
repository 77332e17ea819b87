"""The exceptions of qomfs: one root, subclasses that carry what callers need.

Nothing here knows about FUSE or errno; :mod:`qomfs.fs` maps these classes to
errno values in one table.
"""

from __future__ import annotations

from typing import Any


class QomfsError(Exception):
    """Root of every error qomfs raises on purpose."""


# --- QMP transport and protocol -------------------------------------------------


class QMPError(QomfsError):
    """Something went wrong talking QMP."""


class ConnectError(QMPError):
    """Could not reach a QMP server, or what answered is not a usable one.

    Raised for a socket path that does not exist, a refused connection, a
    monitor that already serves another client (no greeting arrives), and a
    peer that does not speak QMP.
    """


class ConnectionLost(QMPError):
    """The connection closed or failed while (or before) a command ran."""


class CommandTimeout(QMPError):
    """No reply arrived within the command timeout.

    QEMU may be stopped (SIGSTOP), stuck, or very slow; the connection is kept.
    """

    def __init__(self, command: str, timeout: float) -> None:
        super().__init__(f"no reply to {command!r} within {timeout:g} s")
        self.command = command
        self.timeout = timeout


class ProtocolError(QMPError):
    """The peer sent something QMP does not allow."""


class ExecuteError(QMPError):
    """QEMU answered a command with ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(
        self, command: str, arguments: dict[str, Any], error_class: str, desc: str
    ) -> None:
        super().__init__(f"{command}: {error_class}: {desc}")
        self.command = command
        self.arguments = arguments
        self.error_class = error_class
        self.desc = desc


# --- QOM model outcomes ---------------------------------------------------------


class QOMError(QomfsError):
    """A QOM operation failed for a reason a user can act on.

    ``cause`` (also ``__cause__``) keeps the :class:`ExecuteError` when QEMU
    said something, so the log can show QEMU's own words.
    """

    def __init__(self, message: str, cause: QMPError | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class NotFound(QOMError):
    """No such object or property (it may have vanished)."""


class NotADirectory(QOMError):
    """A path goes through something that is a property, not an object."""


class NotWritable(QOMError):
    """The property has no setter (QEMU: "is not writable"), or it is a child."""


class Guarded(QOMError):
    """A write qomfs refuses on purpose: it would tear down part of the VM
    (``realized`` set to false) and the mount was not told to allow that."""


class NotReadable(QOMError):
    """The property has no getter (QEMU: "is not readable")."""


class InvalidValue(QOMError):
    """The text written cannot be converted, or QEMU refused the value."""


class ValueTooLarge(InvalidValue):
    """More bytes than any property value may have."""


class ReadFailed(QOMError):
    """The property's getter failed inside QEMU."""


class WaitTimeout(CommandTimeout):
    """A thread waited longer than its bound for the answer another thread
    was fetching for it (the cache's single flight): a timeout, as for a
    command of its own."""

    def __init__(self, key: object, timeout: float) -> None:
        super().__init__(f"the fetch of {key!r}", timeout)
        self.args = (f"waited {timeout:g} s for another thread's fetch of {key!r}",)
        self.key = key
