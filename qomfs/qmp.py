"""A thread-safe QMP client.

One :class:`QMPClient` owns one socket to one QEMU monitor and is shared by any
number of threads.  A reader thread parses the byte stream with an incremental
JSON decoder (so ``pretty=on`` monitors work), matches replies to commands in
the order they were sent (QEMU answers in-band commands one at a time, in
order; commands carry no ``id``, which costs QEMU CPU on every command), hands
events to subscribers and logs the errors QEMU sends for input it could not
parse without giving up the session.  Every command has a timeout.

Life cycle (:class:`State`): ``IDLE`` -> ``READY`` after :meth:`QMPClient.connect`;
``READY`` -> ``LOST`` when the peer goes away; ``LOST`` -> ``READY`` again when a
later command reconnects (with back-off); any state -> ``CLOSED`` after
:meth:`QMPClient.close`.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import enum
import functools
import json
import logging
import math
import os
import re
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qomfs.errors import (
    CommandTimeout,
    ConnectError,
    ConnectionLost,
    ExecuteError,
    ProtocolError,
    QMPError,
)

log = logging.getLogger("qomfs.qmp")

#: The QMP spec allows at most this many in-band commands in flight.
MAX_IN_FLIGHT = 8
#: Commands :meth:`QMPClient.submit` sends at once (half the limit).
MAX_BATCH = MAX_IN_FLIGHT // 2
#: Commands sent by :meth:`QMPClient.submit` in flight at once: the rest of
#: the slots are kept for commands someone waits for.
MAX_ASYNC = MAX_IN_FLIGHT - 2
#: A message larger than this is not QMP (QEMU's own limit is far lower).
MAX_MESSAGE = 64 * 1024 * 1024

_JSON_SPACE = " \t\r\n"
_FIRST_CHAR = re.compile(r"[ \t\r\n]*(.)", re.DOTALL)


class JSONStreamDecoder:
    """Split a byte stream into JSON objects, whatever the line breaks.

    QMP messages are JSON objects; a monitor with ``pretty=on`` spreads each
    over many lines, and a read from the socket may end anywhere, even inside a
    UTF-8 sequence.  Not thread-safe: one reader feeds it.
    """

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._buf = ""
        self._decoder = json.JSONDecoder()

    @property
    def pending(self) -> str:
        """Text received but not yet decoded into a whole message."""
        return self._buf

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """Add bytes; return the messages they complete, in order.

        Raises :class:`ProtocolError` when the stream cannot be QMP: a message
        that is not a JSON object, or one that grows past :data:`MAX_MESSAGE`.
        """
        text = self._utf8.decode(data)
        self._buf += text
        out: list[dict[str, Any]] = []
        first = _FIRST_CHAR.match(self._buf)
        if first and first.group(1) == "{" and "\n" not in text and text.rstrip()[-1:] != "}":
            # No message ends in these bytes (QEMU ends each with a newline):
            # a large reply comes in many reads, and decoding what has come
            # so far at each would cost time quadratic in its size.
            if len(self._buf) > MAX_MESSAGE:
                raise ProtocolError("message too large or not valid JSON")
            return out
        buf, pos, end = self._buf, 0, len(self._buf)
        while True:
            while pos < end and buf[pos] in _JSON_SPACE:
                pos += 1
            if pos == end:
                self._buf = ""
                return out
            if buf[pos] != "{":
                raise ProtocolError(f"expected a JSON object, got {buf[pos : pos + 40]!r}")
            try:
                obj, pos = self._decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                # Most likely an incomplete message: wait for more bytes.
                self._buf = buf[pos:]
                if len(self._buf) > MAX_MESSAGE:
                    raise ProtocolError("message too large or not valid JSON") from None
                return out
            out.append(obj)


@dataclass(frozen=True)
class Event:
    """An asynchronous QMP event."""

    name: str
    data: dict[str, Any]
    timestamp: float


class State(enum.Enum):
    IDLE = "idle"
    READY = "ready"
    LOST = "lost"
    CLOSED = "closed"


class _Pending:
    """A command sent and not yet answered.

    Either a thread waits for it (``done``) or, sent by
    :meth:`QMPClient.submit`, ``callback`` takes its answer.  It is settled
    once: by its reply, by the loss of the connection, or by its deadline
    (async only); :meth:`take` (under the connection's lock) decides which.
    """

    __slots__ = ("callback", "command", "deadline", "done", "lost", "reply", "taken", "timeout")

    def __init__(
        self,
        command: str,
        callback: Callable[[_Pending], None] | None = None,
        timeout: float = math.inf,
    ) -> None:
        self.command = command
        self.callback = callback
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout if callback is not None else math.inf
        self.done = threading.Event() if callback is None else None
        self.reply: dict[str, Any] | None = None
        self.lost: QMPError | None = None
        self.taken = False

    def take(self) -> bool:
        """Whether this is the one settling (call under the connection's lock)."""
        if self.taken:
            return False
        self.taken = True
        return True

    def settle(self, reply: dict[str, Any] | None, lost: QMPError | None = None) -> None:
        """Hand over the reply, or why none comes (after :meth:`take`)."""
        self.reply, self.lost = reply, lost
        if self.callback is not None:
            self.callback(self)
        else:
            assert self.done is not None
            self.done.set()


class _Connection:
    """One negotiated socket and its reader thread; never reused once dead."""

    def __init__(self, sock: socket.socket, decoder: JSONStreamDecoder, peer: str) -> None:
        self.sock = sock
        self.decoder = decoder
        self.peer = peer
        # Commands sent and not yet answered, oldest first: QMP answers
        # in-band commands one at a time, in the order they arrive.
        self.pending: collections.deque[_Pending] = collections.deque()
        self.lock = threading.Lock()  # guards pending and dead
        self.send_lock = threading.Lock()  # a send and its place in pending go together
        self.dead: QMPError | None = None
        self.reader: threading.Thread | None = None
        # The reader blocks with no deadline while no async command waits;
        # the first one sent then wakes it through this pair, to time it out.
        self.blocked = False
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_w.setblocking(False)

    def fail(self, why: QMPError) -> None:
        """Mark dead and wake every waiter with ``why``."""
        with self.lock:
            if self.dead is not None:
                return
            self.dead = why
            waiters = [p for p in self.pending if p.take()]
            self.pending.clear()
        for p in waiters:
            p.settle(None, why)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def expire(self, now: float) -> float | None:
        """Time out the async commands past their deadline; the seconds until
        the next deadline, None when no async command is waiting (the reader
        then blocks until :meth:`wake`)."""
        overdue: list[_Pending] = []
        upcoming = math.inf
        with self.lock:
            for p in self.pending:
                if p.callback is None or p.taken:
                    continue
                if p.deadline <= now:
                    p.take()
                    overdue.append(p)
                else:
                    upcoming = min(upcoming, p.deadline)
            self.blocked = upcoming == math.inf
        for p in overdue:
            # Its reply, when it comes, still takes its place in line.
            p.settle(None, CommandTimeout(p.command, p.timeout))
        return None if upcoming == math.inf else upcoming - now

    def wake(self) -> None:
        """Make the reader look at the deadlines again (under ``lock``)."""
        with contextlib.suppress(OSError):  # full, or closed with the connection
            self.wake_w.send(b"!")


#: QEMU's JSON parser gives up on a message nested deeper than 1024, of more
#: than 2M tokens or with a token over 64 MiB, and then answers with errors
#: that carry no id, possibly several.  Commands never come near: checked.
MAX_NESTING = 100  # no QOM value comes near
MAX_REQUEST = 1024 * 1024
#: How the errors QEMU sends for unparsable input begin (its JSON parser and
#: its check of the request's shape); none can answer a well-formed command.
STRAY_ERRORS = ("JSON ", "QMP input", "Expected 'execute'")


def _too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists and objects ``limit`` levels or deeper."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth + 1 >= limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def _encode(command: str, arguments: dict[str, Any] | None) -> bytes:
    """The request on the wire; refuses what QEMU's parser would reject
    without saying for which command."""
    msg: dict[str, Any] = {"execute": command}
    if arguments:
        msg["arguments"] = arguments
    if arguments and _too_deep(arguments, MAX_NESTING):
        raise ExecuteError(command, arguments, "GenericError", "value nested too deeply")
    data = json.dumps(msg).encode() + b"\n"
    if len(data) > MAX_REQUEST:
        raise ExecuteError(
            command, arguments or {}, "GenericError", f"request of {len(data)} bytes is too large"
        )
    return data


def _result(command: str, arguments: dict[str, Any] | None, pending: _Pending) -> Any:
    """A settled command's ``return`` value, or the :class:`ExecuteError` it got.

    Raises :class:`CommandTimeout` or :class:`ConnectionLost` when no reply came.
    """
    if pending.lost is not None:
        if isinstance(pending.lost, CommandTimeout):
            raise pending.lost
        raise ConnectionLost(str(pending.lost)) from pending.lost
    reply = pending.reply
    assert reply is not None
    if "error" in reply:
        error = reply["error"]
        cls, desc = str(error.get("class", "?")), str(error.get("desc", ""))
        return ExecuteError(command, arguments or {}, cls, desc)
    return reply.get("return")


def _is_stray_error(msg: dict[str, Any]) -> bool:
    error = msg.get("error")
    desc = error.get("desc", "") if isinstance(error, dict) else ""
    return isinstance(desc, str) and desc.startswith(STRAY_ERRORS)


def describe_address(address: str) -> str:
    """How an address is named in messages."""
    return address if "/" in address else f"tcp:{address}"


def is_unix_address(address: str) -> bool:
    """A path (it contains a slash, or names an existing file) is a unix socket."""
    return "/" in address or ":" not in address or os.path.exists(address)


class QMPClient:
    """A QMP connection shared by many threads.

    ``address`` is a unix socket path or ``HOST:PORT``.  With ``listen=True``
    the client creates a unix socket at ``address`` and waits for QEMU to
    connect to it (QEMU started with ``-qmp unix:PATH`` and no ``server=on``).

    :meth:`execute` is thread-safe.  Event callbacks run on the reader thread:
    they must be quick and must not call :meth:`execute`.
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 5.0,
        connect_timeout: float = 5.0,
        reconnect: bool = True,
        listen: bool = False,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.reconnect = reconnect
        self.listen = listen
        self.greeting: dict[str, Any] = {}
        self.commands: frozenset[str] = frozenset()
        self._conn: _Connection | None = None
        self._state = State.IDLE
        self._state_lock = threading.Lock()
        self._ready = threading.Condition(self._state_lock)  # a connection came or went
        self._connect_lock = threading.Lock()
        self._in_flight = threading.BoundedSemaphore(MAX_IN_FLIGHT)
        self._async = 0  # slots held by submit()
        self._async_lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        self._counts_lock = threading.Lock()
        self._subscribers: list[Callable[[Event], None]] = []
        self._reconnect_hooks: list[Callable[[], None]] = []
        self._next_attempt = 0.0
        self._backoff = 0.0
        self._listener: socket.socket | None = None

    # --- life cycle ---------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def closed(self) -> bool:
        return self._state is State.CLOSED

    def __enter__(self) -> QMPClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        """Connect, read the greeting, negotiate capabilities, list commands.

        With ``listen=True``: create the socket and return at once; QEMU is
        accepted (again and again, after each loss) by a background thread,
        and commands wait for it.  Raises :class:`ConnectError` with a message
        fit for a user.
        """
        with self._connect_lock:
            if self._state is State.CLOSED:
                raise ConnectError("client is closed")
            if self.listen:
                self._start_listening()
                return
            self._open()

    def close(self) -> None:
        """Close the connection; pending and later commands fail."""
        with self._state_lock:
            self._state = State.CLOSED
            conn, self._conn = self._conn, None
            self._ready.notify_all()
        if conn is not None:
            conn.fail(ConnectionLost("connection closed by qomfs"))
            conn.sock.close()
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self.address)
            self._listener = None

    def subscribe(self, callback: Callable[[Event], None]) -> None:
        """Call ``callback(event)`` for every event, on the reader thread."""
        self._subscribers.append(callback)

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every successful reconnection."""
        self._reconnect_hooks.append(callback)

    def has_command(self, name: str) -> bool:
        """Whether the server lists ``name`` in ``query-commands``."""
        return name in self.commands

    @property
    def version(self) -> str:
        v = self.greeting.get("QMP", {}).get("version", {}).get("qemu", {})
        return f"{v.get('major', '?')}.{v.get('minor', '?')}.{v.get('micro', '?')}"

    # --- command counting ---------------------------------------------------

    def command_counts(self) -> dict[str, int]:
        """How many of each command this client has sent since it was made."""
        with self._counts_lock:
            return dict(self._counts)

    def total_commands(self) -> int:
        with self._counts_lock:
            return sum(self._counts.values())

    # --- commands -----------------------------------------------------------

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Run ``command`` and return its ``return`` value.

        Raises :class:`ExecuteError` (QEMU's ``class`` and ``desc``),
        :class:`CommandTimeout`, or :class:`ConnectionLost`.  Thread-safe.
        """
        conn = self._ready_connection()
        return self._execute_on(
            conn, command, arguments, self.timeout if timeout is None else timeout
        )

    def _execute_on(
        self, conn: _Connection, command: str, arguments: dict[str, Any] | None, timeout: float
    ) -> Any:
        data = _encode(command, arguments)
        deadline = time.monotonic() + timeout
        if not self._in_flight.acquire(timeout=timeout):
            raise CommandTimeout(command, timeout)
        try:
            pending = _Pending(command)
            self._send(conn, [pending], data)
            assert pending.done is not None
            if not pending.done.wait(max(0.0, deadline - time.monotonic())):
                # Its reply, when it comes, still takes its place in line.
                raise CommandTimeout(command, timeout)
        finally:
            self._in_flight.release()
        result = _result(command, arguments, pending)
        if isinstance(result, ExecuteError):
            raise result
        return result

    def submit(
        self,
        calls: list[tuple[str, dict[str, Any] | None]],
        callback: Callable[[int, Any], None],
    ) -> bool:
        """Send up to :data:`MAX_BATCH` commands in one write and return at once.

        ``callback(i, result)`` takes the answer to ``calls[i]``, in order, on
        the reader thread (or on this one if sending fails): the command's
        ``return`` value, the :class:`ExecuteError` QEMU answered,
        :class:`CommandTimeout` or :class:`ConnectionLost`.  It must be quick;
        it may submit more.

        Returns False, having sent nothing, when no connection is up (this
        does not reconnect) or fewer than ``len(calls)`` of the
        :data:`MAX_ASYNC` slots are free.  Meant for work nobody waits for.
        """
        if not 0 < len(calls) <= MAX_BATCH:
            raise ValueError(f"{len(calls)} commands at once; 1 to {MAX_BATCH} may be sent")
        conn = self._conn
        if conn is None or conn.dead is not None:
            return False
        data = b"".join(_encode(command, arguments) for command, arguments in calls)
        with self._async_lock:
            if not self.has_room(len(calls)):
                return False
            taken = 0
            while taken < len(calls) and self._in_flight.acquire(blocking=False):
                taken += 1
            if taken < len(calls):
                for _ in range(taken):
                    self._in_flight.release()
                return False
            self._async += taken

        pendings = [
            _Pending(
                command,
                functools.partial(self._answered, callback, i, command, arguments),
                self.timeout,
            )
            for i, (command, arguments) in enumerate(calls)
        ]
        self._send(conn, pendings, data)
        return True

    def _answered(
        self,
        callback: Callable[[int, Any], None],
        index: int,
        command: str,
        arguments: dict[str, Any] | None,
        pending: _Pending,
    ) -> None:
        """A submitted command is settled: free its slot, tell ``callback``."""
        with self._async_lock:
            self._async -= 1
        self._in_flight.release()
        try:
            result = _result(command, arguments, pending)
        except QMPError as err:
            result = err
        try:
            callback(index, result)
        except Exception:
            log.exception("callback for %r failed", command)

    def has_room(self, count: int) -> bool:
        """Whether :meth:`submit` of ``count`` commands would find free slots
        (a hint: another thread may take them first)."""
        return self._async + count <= MAX_ASYNC

    def _send(self, conn: _Connection, pendings: list[_Pending], data: bytes) -> None:
        """Queue ``pendings`` for replies and send ``data``: their commands."""
        with self._counts_lock:
            for pending in pendings:
                self._counts[pending.command] += 1
        try:
            with conn.send_lock:
                with conn.lock:
                    dead = conn.dead
                    if dead is None:
                        conn.pending.extend(pendings)
                        if conn.blocked and pendings[0].callback is not None:
                            conn.blocked = False
                            conn.wake()
                if dead is None:
                    conn.sock.sendall(data)
        except OSError as err:
            what = pendings[0].command if len(pendings) == 1 else f"{len(pendings)} commands"
            self._lost(conn, ConnectionLost(f"sending {what!r} to {conn.peer}: {err}"))
            return
        if dead is not None:
            if pendings[0].callback is None:
                raise ConnectionLost(str(dead))
            for pending in pendings:  # async: told through their callbacks
                pending.take()
                pending.settle(None, dead)

    def _ready_connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and conn.dead is None:
            return conn
        if self._state is State.CLOSED:
            raise ConnectionLost("client is closed")
        if self.listen:
            return self._wait_for_qemu()
        if self._state is State.IDLE:
            raise ConnectionLost("not connected")
        if not self.reconnect:
            raise ConnectionLost(f"connection to {describe_address(self.address)} lost")
        with self._connect_lock:
            conn = self._conn
            if conn is not None and conn.dead is None:
                return conn  # another thread reconnected meanwhile
            now = time.monotonic()
            if now < self._next_attempt:
                raise ConnectionLost(f"connection to {describe_address(self.address)} lost")
            self._backoff = min(max(self._backoff * 2, 0.1), 2.0)
            self._next_attempt = now + self._backoff
            try:
                self._open(reconnecting=True)
            except ConnectError as err:
                raise ConnectionLost(f"reconnecting: {err}") from err
            self._backoff = 0.0
            log.warning("reconnected to %s (QEMU %s)", describe_address(self.address), self.version)
        self._reconnected()
        conn = self._conn
        assert conn is not None
        return conn

    # --- connection ---------------------------------------------------------

    def _socket(self) -> tuple[socket.socket, str]:
        """A connected socket, or ConnectError."""
        where = describe_address(self.address)
        try:
            if is_unix_address(self.address):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.connect_timeout)
                sock.connect(self.address)
            else:
                host, _, port = self.address.rpartition(":")
                sock = socket.create_connection(
                    (host.strip("[]"), int(port)), timeout=self.connect_timeout
                )
        except FileNotFoundError:
            raise ConnectError(f"{where}: no such socket (is QEMU running with -qmp?)") from None
        except ConnectionRefusedError:
            raise ConnectError(f"{where}: connection refused (nobody is listening)") from None
        except (OSError, ValueError) as err:
            raise ConnectError(f"{where}: {err}") from err
        return sock, where

    # --- listening (QEMU connects to us) ----------------------------------------

    #: How long a command waits for QEMU to (re)connect in listen mode.
    LISTEN_WAIT = 1.0

    def _start_listening(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.address)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.address)
            listener.listen(1)
        except OSError as err:
            listener.close()
            raise ConnectError(f"cannot listen on {self.address}: {err}") from err
        listener.settimeout(0.2)  # so the acceptor notices close()
        self._listener = listener
        threading.Thread(target=self._accept_loop, name="qmp-acceptor", daemon=True).start()
        log.info("listening on %s for QEMU", self.address)

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        accepted = 0
        while True:
            with self._ready:
                while self._alive() and not self.closed:
                    self._ready.wait()
                if self.closed:
                    return
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError as err:
                if self.closed:
                    return
                log.warning("accepting on %s: %s", self.address, err)
                time.sleep(0.2)
                continue
            try:
                self._adopt(sock, self.address, reconnecting=accepted > 0)
            except ConnectError as err:
                log.warning("a peer on %s: %s", self.address, err)
                continue
            accepted += 1
            log.warning("QEMU %s connected on %s", self.version, self.address)
            if accepted > 1:
                self._reconnected()

    def _reconnected(self) -> None:
        for hook in self._reconnect_hooks:
            hook()

    def _alive(self) -> bool:
        return self._conn is not None and self._conn.dead is None

    def _wait_for_qemu(self) -> _Connection:
        deadline = time.monotonic() + min(self.timeout, self.LISTEN_WAIT)
        with self._ready:
            while not self._alive():
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    raise ConnectionLost(f"QEMU is not connected to {self.address}")
                self._ready.wait(left)
            assert self._conn is not None
            return self._conn

    def _open(self, reconnecting: bool = False) -> None:
        sock, where = self._socket()
        self._adopt(sock, where, reconnecting)

    def _adopt(self, sock: socket.socket, where: str, reconnecting: bool) -> None:
        """Greet and negotiate on a fresh socket; make it the connection."""
        try:
            decoder = JSONStreamDecoder()
            greeting = self._read_greeting(sock, decoder, where)
            sock.settimeout(None)
            conn = _Connection(sock, decoder, where)
            conn.reader = threading.Thread(
                target=self._read_loop, args=(conn, greeting[1:]), name="qmp-reader", daemon=True
            )
            conn.reader.start()
            try:
                self._execute_on(conn, "qmp_capabilities", None, self.connect_timeout)
                commands = self._execute_on(conn, "query-commands", None, self.connect_timeout)
            except QMPError as err:
                conn.fail(ConnectionLost(str(err)))
                raise ConnectError(f"{where}: negotiating capabilities failed: {err}") from err
        except BaseException:
            sock.close()
            raise
        self.greeting = greeting[0]
        self.commands = frozenset(
            c["name"] for c in commands if isinstance(c, dict) and "name" in c
        )
        with self._state_lock:
            if self._state is State.CLOSED:
                conn.fail(ConnectionLost("client is closed"))
                return
            old, self._conn = self._conn, conn
            self._state = State.READY
            self._ready.notify_all()
        if old is not None:
            old.sock.close()
        if not reconnecting:
            log.info("connected to %s (QEMU %s)", where, self.version)

    def _read_greeting(
        self, sock: socket.socket, decoder: JSONStreamDecoder, where: str
    ) -> list[dict[str, Any]]:
        """Read until the greeting; return it and any messages after it."""
        deadline = time.monotonic() + self.connect_timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                if decoder.pending.strip():
                    raise ConnectError(
                        f"{where} does not speak QMP (it sent {decoder.pending[:60]!r})"
                    )
                raise ConnectError(
                    f"{where}: connected, but no QMP greeting within {self.connect_timeout:g} s; "
                    "the monitor is probably busy with another client (a QMP monitor serves one "
                    "client at a time: give qomfs its own -qmp socket), or QEMU is stopped"
                )
            sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as err:
                raise ConnectError(f"{where}: {err}") from err
            if not data:
                raise ConnectError(f"{where} closed the connection before greeting")
            try:
                messages = decoder.feed(data)
            except ProtocolError:
                raise ConnectError(f"{where} does not speak QMP (it sent {data[:60]!r})") from None
            if messages:
                if "QMP" not in messages[0]:
                    raise ConnectError(
                        f"{where} does not speak QMP (first message {messages[0]!r})"
                    )
                return messages

    def _read_loop(self, conn: _Connection, early: list[dict[str, Any]]) -> None:
        for msg in early:
            self._dispatch(conn, msg)
        why: QMPError
        poller = select.poll()
        poller.register(conn.sock, select.POLLIN)
        poller.register(conn.wake_r, select.POLLIN)
        sock_fd = conn.sock.fileno()
        while True:
            try:
                wait = conn.expire(time.monotonic())
                ready = poller.poll(None if wait is None else max(1, math.ceil(wait * 1000)))
                if any(fd != sock_fd for fd, _ in ready):
                    conn.wake_r.recv(64)
                if not any(fd == sock_fd for fd, _ in ready):
                    continue  # deadlines to look at
                data = conn.sock.recv(65536)
            except OSError as err:
                why = ConnectionLost(f"reading from {conn.peer}: {err}")
                break
            if not data:
                why = ConnectionLost(f"{conn.peer} closed the connection (QEMU gone?)")
                break
            try:
                messages = conn.decoder.feed(data)
            except ProtocolError as err:
                why = err
                break
            for msg in messages:
                self._dispatch(conn, msg)
        self._lost(conn, why)
        with conn.lock:
            conn.wake_r.close()
            conn.wake_w.close()

    def _lost(self, conn: _Connection, why: QMPError) -> None:
        if conn.dead is None and self._state is not State.CLOSED:
            log.error("QMP connection lost: %s", why)
        conn.fail(why)
        with self._state_lock:
            if self._conn is conn and self._state is State.READY:
                self._state = State.LOST
            self._ready.notify_all()

    def _dispatch(self, conn: _Connection, msg: dict[str, Any]) -> None:
        if "event" in msg:
            ts = msg.get("timestamp", {})
            event = Event(
                str(msg["event"]),
                msg.get("data") or {},
                ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6,
            )
            log.debug("event %s %s", event.name, event.data)
            for callback in list(self._subscribers):
                try:
                    callback(event)
                except Exception:
                    log.exception("event subscriber failed on %s", event.name)
            return
        if "return" in msg or "error" in msg:
            if "id" in msg or _is_stray_error(msg):
                # Not an answer to one of our (id-less, well-formed) commands:
                # QEMU's complaint about input it could not parse.
                log.warning("QEMU reported an error for no command: %s", msg.get("error"))
                return
            with conn.lock:
                pending = conn.pending.popleft() if conn.pending else None
                answers = pending is not None and pending.take()
            if pending is None:
                log.warning("QEMU answered a command never sent: %.200s", json.dumps(msg))
            elif answers:  # (else it timed out, or the connection is gone)
                pending.settle(msg)
            return
        log.warning("ignoring unexpected QMP message: %.200s", json.dumps(msg))
