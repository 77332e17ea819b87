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
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
#: Commands :meth:`QMPClient.execute_many` sends at once (half the limit).
MAX_BATCH = MAX_IN_FLIGHT // 2
#: A message larger than this is not QMP (QEMU's own limit is far lower).
MAX_MESSAGE = 64 * 1024 * 1024

_JSON_SPACE = " \t\r\n"


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
        self._buf += self._utf8.decode(data)
        out: list[dict[str, Any]] = []
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


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    reply: dict[str, Any] | None = None
    lost: QMPError | None = None


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

    def fail(self, why: QMPError) -> None:
        """Mark dead and wake every waiter with ``why``."""
        with self.lock:
            if self.dead is not None:
                return
            self.dead = why
            waiters = list(self.pending)
            self.pending.clear()
        for p in waiters:
            p.lost = why
            p.done.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


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
        self._batch_lock = threading.Lock()
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

    def execute_many(
        self, calls: list[tuple[str, dict[str, Any] | None]], timeout: float | None = None
    ) -> Iterator[Any]:
        """Send up to :data:`MAX_BATCH` commands in one write; yield their
        results in order as they come, each the command's ``return`` value or
        the :class:`ExecuteError` QEMU answered.  Raises :class:`CommandTimeout`
        or :class:`ConnectionLost` at the first result that cannot come.
        Thread-safe.
        """
        conn = self._ready_connection()
        return self._results(conn, calls, self.timeout if timeout is None else timeout)

    def _execute_on(
        self, conn: _Connection, command: str, arguments: dict[str, Any] | None, timeout: float
    ) -> Any:
        (result,) = list(self._results(conn, [(command, arguments)], timeout))
        if isinstance(result, ExecuteError):
            raise result
        return result

    def _results(
        self,
        conn: _Connection,
        calls: list[tuple[str, dict[str, Any] | None]],
        timeout: float,
    ) -> Iterator[Any]:
        if not 0 < len(calls) <= MAX_BATCH:
            raise ValueError(f"{len(calls)} commands at once; 1 to {MAX_BATCH} may be sent")
        data = b"".join(_encode(command, arguments) for command, arguments in calls)
        deadline = time.monotonic() + timeout
        taken = 0
        try:
            # One thread at a time gathers several slots: two holding some
            # each and waiting for more could wait for each other.
            with self._batch_lock if len(calls) > 1 else contextlib.nullcontext():
                for _ in calls:
                    if not self._in_flight.acquire(timeout=max(0.0, deadline - time.monotonic())):
                        raise CommandTimeout(calls[0][0], timeout)
                    taken += 1
            pendings = [_Pending() for _ in calls]
            with self._counts_lock:
                for command, _ in calls:
                    self._counts[command] += 1
            try:
                with conn.send_lock:
                    with conn.lock:
                        if conn.dead is not None:
                            raise ConnectionLost(str(conn.dead))
                        conn.pending.extend(pendings)
                    conn.sock.sendall(data)
            except OSError as err:
                what = calls[0][0] if len(calls) == 1 else f"{len(calls)} commands"
                self._lost(conn, ConnectionLost(f"sending {what!r} to {conn.peer}: {err}"))
            for (command, arguments), pending in zip(calls, pendings, strict=True):
                if not pending.done.wait(max(0.0, deadline - time.monotonic())):
                    # Its reply, when it comes, still takes its place in line.
                    raise CommandTimeout(command, timeout)
                self._in_flight.release()
                taken -= 1
                if pending.lost is not None:
                    raise ConnectionLost(str(pending.lost)) from pending.lost
                reply = pending.reply
                assert reply is not None
                if "error" in reply:
                    error = reply["error"]
                    cls, desc = str(error.get("class", "?")), str(error.get("desc", ""))
                    yield ExecuteError(command, arguments or {}, cls, desc)
                else:
                    yield reply.get("return")
        finally:
            for _ in range(taken):
                self._in_flight.release()

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
        while True:
            try:
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
            if pending is None:
                log.warning("QEMU answered a command never sent: %.200s", json.dumps(msg))
                return
            pending.reply = msg
            pending.done.set()
            return
        log.warning("ignoring unexpected QMP message: %.200s", json.dumps(msg))
