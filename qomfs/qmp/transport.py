"""Sockets for QMP-shaped protocols: connect to unix or TCP, listen and accept, bounded sends.

Knows nothing of JSON or QMP.  Every listening socket qomfs makes comes from
:func:`listen_unix`, so every tool that listens gets the same rules: only a
stale socket is ever replaced, and the new one is private (mode 0600, or 0660
for a chosen group) before anyone can connect to it.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import select
import socket
import stat
import time

from qomfs.errors import ConnectError


def describe_address(address: str) -> str:
    """How an address is named in messages."""
    return address if "/" in address else f"tcp:{address}"


def is_unix_address(address: str) -> bool:
    """A path (it contains a slash, or names an existing file) is a unix socket."""
    return "/" in address or ":" not in address or os.path.exists(address)


def connect(address: str, timeout: float) -> socket.socket:
    """A blocking socket connected to ``address`` (a unix socket path or ``HOST:PORT``).

    Raises :class:`ConnectError` with a message fit for a user within about
    ``timeout`` seconds.
    """
    where = describe_address(address)
    sock: socket.socket | None = None
    try:
        if is_unix_address(address):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(address)
        else:
            host, _, port = address.rpartition(":")
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except FileNotFoundError:
        _close(sock)
        raise ConnectError(f"{where}: no such socket (is QEMU running with -qmp?)") from None
    except ConnectionRefusedError:
        _close(sock)
        raise ConnectError(f"{where}: connection refused (nobody is listening)") from None
    except (OSError, ValueError) as err:
        _close(sock)
        raise ConnectError(f"{where}: {err}") from err
    sock.settimeout(None)
    return sock


def _close(sock: socket.socket | None) -> None:
    if sock is not None:
        sock.close()


def send_all(sock: socket.socket, data: bytes, deadline: float) -> None:
    """Write all of ``data`` to the non-blocking ``sock`` by ``deadline`` (monotonic).

    Raises :class:`TimeoutError` when the peer does not take the bytes in
    time (a stopped QEMU whose socket buffer is full), or :class:`OSError`.
    Either way part of ``data`` may be on the wire already: the stream is
    out of step, and the caller must drop the connection.
    """
    try:
        sent = sock.send(data)  # most often all of it, at once
    except BlockingIOError:
        sent = 0
    if sent == len(data):
        return
    view = memoryview(data)[sent:]
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the peer took {len(data) - len(view)} of {len(data)} bytes")
        poller.poll(max(1, int(left * 1000)))
        with contextlib.suppress(BlockingIOError):  # (a spurious wake-up)
            view = view[sock.send(view) :]
        if not view:
            return


# --- listening ------------------------------------------------------------------


def _live(path: str) -> bool | None:
    """Whether a unix socket at ``path`` has a listener: True, False (refused:
    stale), or None when that cannot be told (no permission, ...)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return False
    except (BlockingIOError, TimeoutError):
        return True  # a full backlog: somebody listens
    except OSError:
        return None
    finally:
        probe.close()
    return True


def _group_id(group: str | int) -> int:
    if isinstance(group, int) or group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConnectError(f"no such group: {group}") from None


class UnixListener:
    """A listening unix socket that removes its file on :meth:`close` (if still its own)."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self.sock = sock
        self.path = path
        st = os.stat(path)
        self._identity = (st.st_dev, st.st_ino)

    def accept(self, timeout: float) -> socket.socket | None:
        """A connected blocking socket, or None when none came within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            conn, _ = self.sock.accept()
        except TimeoutError:
            return None
        conn.settimeout(None)
        return conn

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)


def listen_unix(path: str, *, group: str | int | None = None, backlog: int = 1) -> UnixListener:
    """Listen on a new unix socket at ``path``, private to this user (or ``group``).

    What is at ``path`` already is removed only if it is a stale socket (one
    that refuses connections); a regular file, a directory, a live socket or
    anything else is refused.  The socket gets mode 0600 (0660 and the
    group ``group`` with ``group``) whatever the umask, before it listens:
    until then a connect() is refused, so no one gets in early.

    Raises :class:`ConnectError` with a one-line message.
    """
    gid = None if group is None else _group_id(group)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise ConnectError(f"cannot listen on {path}: {err.strerror}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a socket"
            raise ConnectError(
                f"cannot listen on {path}: it exists and is {what}; not replacing it"
            )
        live = _live(path)
        if live is not False:
            why = "another program listens on it" if live else "cannot tell whether it is in use"
            raise ConnectError(f"cannot listen on {path}: a socket is there and {why}")
        with contextlib.suppress(FileNotFoundError):
            again = os.lstat(path)
            if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
                raise ConnectError(f"cannot listen on {path}: it changed while being checked")
            os.unlink(path)  # a stale socket, as QEMU itself replaces one
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        sock.bind(path)
        bound = True
        # Bound but not listening: every connect() is refused until listen().
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, 0o660 if gid is not None else 0o600)
        sock.listen(backlog)
        return UnixListener(sock, path)
    except OSError as err:
        sock.close()
        if bound:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if err.errno == errno.EADDRINUSE:
            raise ConnectError(f"cannot listen on {path}: something appeared there") from None
        if err.errno == errno.EPERM and gid is not None:
            raise ConnectError(
                f"cannot give {path} to group {group}: this user is not a member of it"
            ) from None
        raise ConnectError(f"cannot listen on {path}: {err.strerror or err}") from None
