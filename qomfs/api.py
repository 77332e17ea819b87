"""The Python API: :func:`connect` gives a :class:`VM`, a thread-safe handle on one
QEMU's QMP monitor built on the same QMPClient and QOMTree the mount and the tools use.

    import qomfs
    with qomfs.connect("/tmp/vm.sock") as vm:
        vm.get("/machine", "type")
"""

from __future__ import annotations

import collections
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from qomfs.errors import ConnectionLost
from qomfs.model import QOMTree
from qomfs.qmp import Event, QMPClient, State
from qomfs.tree import Property, join

#: Events kept for :meth:`VM.events` that nobody has taken yet; older ones are dropped.
MAX_QUEUED_EVENTS = 10_000


class VM:
    """One QEMU, through its QMP monitor.  Made by :func:`connect`.

    Every method may be called from any thread.  Every error is a
    :class:`qomfs.errors.QomfsError`: :class:`~qomfs.errors.ExecuteError`
    carries QEMU's ``error_class`` and ``desc``;
    :class:`~qomfs.errors.NotFound`, :class:`~qomfs.errors.InvalidValue`,
    :class:`~qomfs.errors.NotWritable` and the other
    :class:`~qomfs.errors.QOMError` classes say what a QOM call met;
    :class:`~qomfs.errors.CommandTimeout` and
    :class:`~qomfs.errors.ConnectionLost` say that QEMU did not answer.
    Answers are never cached: each call asks QEMU.
    """

    def __init__(self, client: QMPClient, tempdir: str | None = None) -> None:
        self.client = client
        self.qom = QOMTree(client, ttl=0, readahead=False)
        self._events: collections.deque[Event] = collections.deque(maxlen=MAX_QUEUED_EVENTS)
        self._event_ready = threading.Condition()
        self._tempdir = tempdir
        client.subscribe(self._on_event)

    @property
    def address(self) -> str:
        """The monitor's address; with ``listen``, the socket QEMU should connect to
        (``-qmp unix:ADDRESS``, without ``server=on``)."""
        return self.client.address

    @property
    def version(self) -> str:
        """QEMU's version from its greeting, ``"MAJOR.MINOR.MICRO"`` (``"?.?.?"`` before it)."""
        return self.client.version

    # --- QOM --------------------------------------------------------------------

    def get(self, path: str, prop: str) -> Any:
        """``qom-get``: the JSON value of property ``prop`` of the object at ``path``."""
        self._wait()
        return self.qom.get(join(path, prop))

    def set(self, path: str, prop: str, value: Any) -> None:
        """``qom-set`` to the JSON ``value`` (a bool for a bool property, an int for a size)."""
        self._wait()
        self.qom.set(join(path, prop), value)

    def list(self, path: str = "/") -> list[Property]:
        """``qom-list``: the properties of the object at ``path``, in QEMU's order;
        each has ``name``, ``type``, ``is_child`` and ``is_link``."""
        self._wait()
        return list(self.qom.listing(path).properties.values())

    def tree(
        self, path: str = "/", *, depth: int | None = None, links: bool = True
    ) -> dict[str, Any]:
        """The subtree at ``path`` as nested dicts, as ``qom-tree --format json`` prints
        it: ``{"path", "type", "properties": {NAME: {"type", "value" | "error"}},
        "children": {NAME: {...}}}``.  ``depth`` limits how far down objects are read;
        ``links=False`` leaves ``link<>`` properties out.  One ``qom-list-get`` per
        level where QEMU has it (10.1 and later)."""
        from qomfs.tools import tree_json  # (tools imports much; only when needed)

        self._wait()
        return tree_json(self.qom, path, depth=depth, links=links)

    # --- any command, and events ---------------------------------------------------

    def execute(self, command: str, arguments: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """Run a QMP command; its ``return`` value.  Arguments as a dict, or as
        keywords (``vm.execute("qom-get", path="/machine", property="type")``)."""
        args = {**(arguments or {}), **kwargs}
        self._wait()
        return self.client.execute(command, args or None)

    def events(self, timeout: float | None = 0.0) -> Iterator[Event]:
        """The events QEMU sent since connecting (or since the last call took
        them), then those that come within ``timeout`` seconds of this call;
        ``None`` waits for ever.  Each has ``name``, ``data`` and ``timestamp``.
        At most :data:`MAX_QUEUED_EVENTS` are kept waiting (the oldest go)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._event_ready:
                while not self._events:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return
                    self._event_ready.wait(left)
                event = self._events.popleft()
            yield event

    def _on_event(self, event: Event) -> None:
        with self._event_ready:
            self._events.append(event)
            self._event_ready.notify_all()

    def _wait(self) -> None:
        """With ``listen``: wait (up to the connect timeout) for QEMU to connect."""
        if not self.client.listen:
            return
        deadline = time.monotonic() + self.client.connect_timeout
        while not self._connected():
            if self.client.closed:
                raise ConnectionLost("closed")
            if time.monotonic() > deadline:
                raise ConnectionLost(
                    f"QEMU did not connect to {self.address} within "
                    f"{self.client.connect_timeout:g} s"
                )
            time.sleep(0.01)

    def _connected(self) -> bool:
        return self.client.state is State.READY

    # --- life cycle -------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (and a listening socket made by ``listen=True``)."""
        self.qom.close()
        self.client.close()
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None

    def __enter__(self) -> VM:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def connect(
    address: str | os.PathLike[str] | None = None,
    *,
    listen: bool | str | os.PathLike[str] = False,
    timeout: float = 5.0,
    connect_timeout: float = 5.0,
    reconnect: bool = False,
) -> VM:
    """Connect to QEMU's QMP monitor at ``address`` (a unix socket path or
    ``HOST:PORT``) and return a :class:`VM`; use it as a context manager.

    ``listen=True`` makes a private socket (in a new 0700 directory) that QEMU
    connects to: start QEMU with ``-qmp unix:{vm.address}`` after this call
    returns, and there is no race with QEMU's start.  ``listen=PATH`` listens
    at PATH instead.  Calls then wait up to ``connect_timeout`` for QEMU.
    ``timeout`` bounds each command.  ``reconnect``: whether a lost
    connection is made again by the next call.

    Raises :class:`~qomfs.errors.ConnectError` (a subclass of
    :class:`~qomfs.errors.QomfsError`) when QEMU cannot be reached.
    """
    tempdir = None
    if listen:
        if address is not None:
            raise ValueError("give an address or listen, not both")
        if listen is True:
            tempdir = tempfile.mkdtemp(prefix="qomfs-")
            path = os.path.join(tempdir, "qmp.sock")
        else:
            path = os.fspath(listen)
        client = QMPClient(
            path, timeout=timeout, connect_timeout=connect_timeout, listen=True, reconnect=True
        )
    else:
        if address is None:
            raise ValueError("give an address (a socket path or HOST:PORT) or listen=True")
        client = QMPClient(
            os.fspath(address),
            timeout=timeout,
            connect_timeout=connect_timeout,
            reconnect=reconnect,
        )
    vm = VM(client, tempdir)  # subscribed before connecting: no event is missed
    try:
        client.connect()
    except BaseException:
        vm.close()
        raise
    return vm
