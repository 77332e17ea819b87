"""QMPClient: one QEMU monitor shared by many threads; commands with ids, replies, events.

A reader thread parses the byte stream (:mod:`~qomfs.qmp.framing`) and hands
each reply to the command that carries its ``id``, each event to the
subscribers.  Sockets come from :mod:`~qomfs.qmp.transport`.

What a caller can rely on:

* A reply goes to the command whose ``id`` it echoes, never by position.  An
  error with no id (QEMU's complaint about input it could not parse) is
  logged and answers nobody; a late reply to a command that timed out is
  dropped; any other reply that matches nothing (an unknown id, a duplicate,
  a ``return`` without id) is a protocol error: the connection is dropped,
  its pending commands fail with :class:`ConnectionLost`, and the next command
  reconnects.
* Nothing waits forever.  A command (the wait for an in-flight slot, the send
  and the reply) is bounded by its timeout: :class:`CommandTimeout`.  A send
  that times out leaves part of a message on the wire, so it drops the
  connection.  A command that timed out keeps its in-flight slot until its
  reply comes or the connection ends; a connection on which a command stays
  unanswered :data:`STUCK_GRACE` seconds (at least its timeout) past its
  deadline is dropped.  Reconnecting is bounded by ``connect_timeout``.
* Any failure of the reader thread, whatever it meets, becomes a lost
  connection: logged, pending commands failed, reconnect on the next command.

Life cycle (:class:`State`): ``IDLE`` -> ``READY`` after :meth:`QMPClient.connect`;
``READY`` -> ``LOST`` when the peer goes away; ``LOST`` -> ``READY`` again when a
later command reconnects (with back-off); any state -> ``CLOSED`` after
:meth:`QMPClient.close`.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
import itertools
import json
import logging
import math
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
from qomfs.qmp import framing, transport
from qomfs.qmp.framing import JSONStreamDecoder
from qomfs.qmp.transport import describe_address

log = logging.getLogger("qomfs.qmp")

#: The QMP spec allows at most this many in-band commands in flight.
MAX_IN_FLIGHT = 8
#: Commands :meth:`QMPClient.submit` sends at once (half the limit).
MAX_BATCH = MAX_IN_FLIGHT // 2
#: Commands sent by :meth:`QMPClient.submit` in flight at once: the rest of
#: the slots are kept for commands someone waits for.
MAX_ASYNC = MAX_IN_FLIGHT - 2
#: A connection with a command unanswered this long (or its timeout, if
#: longer) past its deadline is given up: QEMU lost it, or is stuck.
STUCK_GRACE = 1.0


@dataclass(frozen=True)
class Event:
    """An asynchronous QMP event.  ``timestamp`` is 0 when QEMU's was malformed."""

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
    once: by its reply, by the loss of the connection, or by its deadline;
    :meth:`take` (under the connection's lock) decides which.  It holds an
    in-flight slot while it is in its connection's ``pending`` map: whoever
    removes it from there calls ``release``.
    """

    __slots__ = (
        "callback",
        "command",
        "deadline",
        "done",
        "id",
        "lost",
        "release",
        "reply",
        "taken",
        "timeout",
    )

    def __init__(
        self,
        ident: int,
        command: str,
        timeout: float,
        release: Callable[[], None],
        callback: Callable[[_Pending], None] | None = None,
    ) -> None:
        self.id = ident
        self.command = command
        self.callback = callback
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.release = release
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

    @property
    def give_up(self) -> float:
        """When an unanswered command means the connection is stuck."""
        return self.deadline + max(self.timeout, STUCK_GRACE)


class _Connection:
    """One negotiated socket and its reader thread; never reused once dead."""

    def __init__(self, sock: socket.socket, decoder: JSONStreamDecoder, peer: str) -> None:
        self.sock = sock
        self.decoder = decoder
        self.peer = peer
        # Commands sent and not yet answered (or timed out, their reply not
        # yet come), by id.
        self.pending: dict[int, _Pending] = {}
        self.lock = threading.Lock()  # guards pending, dead and blocked
        self.send_lock = threading.Lock()  # one message on the wire at a time
        self.dead: QMPError | None = None
        self.reader: threading.Thread | None = None
        # The reader blocks with no deadline while no async command waits;
        # the first one sent then wakes it through this pair, to time it out.
        self.blocked = False
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_w.setblocking(False)

    def fail(self, why: QMPError) -> bool:
        """Mark dead and wake every waiter with ``why``; False if already dead."""
        with self.lock:
            if self.dead is not None:
                return False
            self.dead = why
            held = list(self.pending.values())
            self.pending.clear()
            waiters = [p for p in held if p.take()]
        for p in held:
            p.release()
        for p in waiters:
            p.settle(None, why)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        return True

    def pop(self, ident: int) -> tuple[_Pending | None, bool]:
        """Remove the command ``ident`` (releasing its slot): it, and whether
        the caller settles it (False: it timed out already)."""
        with self.lock:
            pending = self.pending.pop(ident, None)
            answers = pending is not None and pending.take()
        if pending is not None:
            pending.release()
        return pending, answers

    def stuck(self, now: float) -> _Pending | None:
        """A command unanswered far past its deadline, if any (under ``lock``)."""
        for p in self.pending.values():
            if p.give_up <= now:
                return p
        return None

    def expire(self, now: float) -> tuple[float | None, _Pending | None]:
        """Time out the async commands past their deadline.  Returns the
        seconds until the next deadline (None when no async command is
        waiting: the reader then blocks until :meth:`wake`), and a command
        that shows the connection is stuck, if one does."""
        overdue: list[_Pending] = []
        upcoming = math.inf
        with self.lock:
            stuck = self.stuck(now)
            for p in self.pending.values():
                if p.callback is None:
                    continue
                if not p.taken:
                    if p.deadline <= now:
                        p.take()  # its slot stays held until its reply comes
                        overdue.append(p)
                    else:
                        upcoming = min(upcoming, p.deadline)
                upcoming = min(upcoming, p.give_up)
            self.blocked = upcoming == math.inf
        for p in overdue:
            p.settle(None, CommandTimeout(p.command, p.timeout))
        return (None if upcoming == math.inf else max(0.0, upcoming - now)), stuck

    def wake(self) -> None:
        """Make the reader look at the deadlines again (under ``lock``)."""
        with contextlib.suppress(OSError):  # full, or closed with the connection
            self.wake_w.send(b"!")


def _error_of(command: str, arguments: dict[str, Any] | None, reply: dict[str, Any]) -> QMPError:
    """The exception an ``error`` reply stands for."""
    error = reply["error"]
    if not isinstance(error, dict):
        return ProtocolError(f"malformed error reply to {command!r}: {json.dumps(error)[:200]}")
    cls, desc = error.get("class", "?"), error.get("desc", "")
    return ExecuteError(command, arguments or {}, str(cls), str(desc))


def _result(command: str, arguments: dict[str, Any] | None, pending: _Pending) -> Any:
    """A settled command's ``return`` value, or the :class:`ExecuteError` (or
    :class:`ProtocolError`, for a malformed error) it got.

    Raises :class:`CommandTimeout` or :class:`ConnectionLost` when no reply came.
    """
    if pending.lost is not None:
        if isinstance(pending.lost, CommandTimeout):
            raise pending.lost
        raise ConnectionLost(str(pending.lost)) from pending.lost
    reply = pending.reply
    assert reply is not None
    if "error" in reply:
        return _error_of(command, arguments, reply)
    return reply["return"]


def _timestamp(value: Any) -> float:
    """An event's ``timestamp`` in seconds; 0 when it is malformed."""
    if not isinstance(value, dict):
        return 0.0
    seconds, micro = value.get("seconds"), value.get("microseconds", 0)
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (seconds, micro))
    return float(seconds + micro / 1e6) if numbers else 0.0


def _event(msg: dict[str, Any]) -> Event:
    """An event message as an :class:`Event`; odd fields are tolerated."""
    data = msg.get("data")
    return Event(
        str(msg["event"]), data if isinstance(data, dict) else {}, _timestamp(msg.get("timestamp"))
    )


class QMPClient:
    """A QMP connection shared by many threads.

    ``address`` is a unix socket path or ``HOST:PORT``.  With ``listen=True``
    the client creates a unix socket at ``address`` (see
    :func:`~qomfs.qmp.transport.listen_unix`; ``listen_group`` lets that
    group in) and waits for QEMU to connect to it (QEMU started with ``-qmp
    unix:PATH`` and no ``server=on``).  With ``negotiate=False`` nothing is
    sent after the greeting (no ``qmp_capabilities``, no ``query-commands``):
    the caller negotiates, as ``qmp-shell -N`` does.

    :meth:`execute`, :meth:`request` and :meth:`submit` are thread-safe.
    Event callbacks run on the reader thread: they must be quick and must
    not call :meth:`execute`.
    """

    #: How long a command waits for QEMU to (re)connect in listen mode.
    LISTEN_WAIT = 1.0

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 5.0,
        connect_timeout: float = 5.0,
        reconnect: bool = True,
        listen: bool = False,
        listen_group: str | int | None = None,
        negotiate: bool = True,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.reconnect = reconnect
        self.listen = listen
        self.listen_group = listen_group
        self.negotiate = negotiate
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
        self._ids = itertools.count(1)
        self._counts: collections.Counter[str] = collections.Counter()
        self._counts_lock = threading.Lock()
        self._subscribers: list[Callable[[Event], None]] = []
        self._reconnect_hooks: list[Callable[[], None]] = []
        self._next_attempt = 0.0
        self._backoff = 0.0
        self._listener: transport.UnixListener | None = None

    # --- life cycle ---------------------------------------------------------

    @property
    def state(self) -> State:
        state, conn = self._state, self._conn
        if state is State.READY and (conn is None or conn.dead is not None):
            return State.LOST  # (the reader is about to say so; a waiter may hear first)
        return state

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
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()

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
        qmp = self.greeting.get("QMP")
        version = qmp.get("version") if isinstance(qmp, dict) else None
        v = version.get("qemu") if isinstance(version, dict) else None
        if not isinstance(v, dict):
            return "?.?.?"
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

        Raises :class:`ExecuteError` (QEMU's ``class`` and ``desc``; also for
        a request refused before sending because QEMU could not parse it),
        :class:`CommandTimeout`, :class:`ConnectionLost`, or
        :class:`ProtocolError` for a malformed error reply.  Thread-safe.
        """
        conn = self._ready_connection()
        return self._execute_on(
            conn, command, arguments, self.timeout if timeout is None else timeout
        )

    def request(self, message: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send the raw QMP message ``message`` (as typed in a shell); return the whole reply.

        The client puts its own ``id`` on the wire and gives the reply back
        with the caller's ``id`` (or none, if ``message`` had none).  The
        reply holds ``return`` or ``error``: QEMU's error is not raised.
        Raises :class:`CommandTimeout`, :class:`ConnectionLost`, and
        :class:`ExecuteError` for a message refused before sending.
        """
        command = message.get("execute", message.get("exec-oob", "?"))
        command = command if isinstance(command, str) else "?"
        timeout = self.timeout if timeout is None else timeout
        conn = self._ready_connection()
        pending = self._call(conn, command, message.get("arguments"), message, timeout)
        reply = dict(pending.reply or {})
        reply.pop("id", None)
        if "id" in message:
            reply["id"] = message["id"]
        return reply

    def _execute_on(
        self, conn: _Connection, command: str, arguments: dict[str, Any] | None, timeout: float
    ) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        pending = self._call(conn, command, arguments, message, timeout)
        result = _result(command, arguments, pending)
        if isinstance(result, QMPError):
            raise result
        return result

    def _encode(self, command: str, arguments: Any, message: dict[str, Any], ident: int) -> bytes:
        try:
            return framing.encode({**message, "id": ident})
        except ValueError as err:
            args = arguments if isinstance(arguments, dict) else {}
            raise ExecuteError(command, args, "GenericError", str(err)) from None

    def _call(
        self,
        conn: _Connection,
        command: str,
        arguments: Any,
        message: dict[str, Any],
        timeout: float,
    ) -> _Pending:
        """Send ``message`` as command ``command`` and wait for its reply
        (:class:`CommandTimeout`, :class:`ConnectionLost`); the settled command."""
        ident = next(self._ids)
        data = self._encode(command, arguments, message, ident)
        started = time.monotonic()
        if not self._in_flight.acquire(timeout=timeout):
            # Every slot is held, by commands waiting or timed out: drop
            # the connection if one of them shows that it is stuck.
            self._check_stuck(conn)
            raise CommandTimeout(command, timeout)
        pending = _Pending(ident, command, timeout, self._in_flight.release)
        pending.deadline = started + timeout
        self._send(conn, [pending], data)
        assert pending.done is not None
        if not pending.done.wait(max(0.0, pending.deadline - time.monotonic())):
            with conn.lock:
                mine = pending.take()  # (it keeps its slot until its reply comes)
            if mine:
                raise CommandTimeout(command, timeout)
            # Settled just now, by its reply or the connection's end.
            if not pending.done.wait(timeout):
                raise CommandTimeout(command, timeout)
        if pending.lost is not None:
            _result(command, arguments, pending)  # raises
        return pending

    def submit(
        self,
        calls: list[tuple[str, dict[str, Any] | None]],
        callback: Callable[[int, Any], None],
    ) -> bool:
        """Send up to :data:`MAX_BATCH` commands in one write and return at once.

        ``callback(i, result)`` takes the answer to ``calls[i]``, on the
        reader thread (or on this one if sending fails): the command's
        ``return`` value, the :class:`ExecuteError` QEMU answered,
        :class:`CommandTimeout`, :class:`ConnectionLost` or
        :class:`ProtocolError`.  It must be quick; it may submit more.

        Returns False, having sent nothing, when no connection is up (this
        does not reconnect) or fewer than ``len(calls)`` of the
        :data:`MAX_ASYNC` slots are free.  Meant for work nobody waits for.
        A submitted command holds its slot until its reply comes or the
        connection ends, even after it timed out.
        """
        if not 0 < len(calls) <= MAX_BATCH:
            raise ValueError(f"{len(calls)} commands at once; 1 to {MAX_BATCH} may be sent")
        conn = self._conn
        if conn is None or conn.dead is not None:
            return False
        idents = [next(self._ids) for _ in calls]
        data = b"".join(
            self._encode(command, arguments, _message(command, arguments), ident)
            for (command, arguments), ident in zip(calls, idents, strict=True)
        )
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
                ident,
                command,
                self.timeout,
                self._release_async,
                functools.partial(self._answered, callback, i, command, arguments),
            )
            for i, ((command, arguments), ident) in enumerate(zip(calls, idents, strict=True))
        ]
        self._send(conn, pendings, data)
        return True

    def _release_async(self) -> None:
        with self._async_lock:
            self._async -= 1
        self._in_flight.release()

    def _answered(
        self,
        callback: Callable[[int, Any], None],
        index: int,
        command: str,
        arguments: dict[str, Any] | None,
        pending: _Pending,
    ) -> None:
        """A submitted command is settled: tell ``callback``."""
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

    def _check_stuck(self, conn: _Connection) -> None:
        with conn.lock:
            stuck = conn.stuck(time.monotonic()) if conn.dead is None else None
        if stuck is not None:
            self._lost(conn, self._stuck_error(conn, stuck))

    @staticmethod
    def _stuck_error(conn: _Connection, stuck: _Pending) -> ConnectionLost:
        waited = time.monotonic() - stuck.deadline + stuck.timeout
        return ConnectionLost(
            f"{conn.peer}: no reply to {stuck.command!r} for {waited:.1f} s; "
            "dropping the connection (QEMU stopped or stuck?)"
        )

    def _send(self, conn: _Connection, pendings: list[_Pending], data: bytes) -> None:
        """Register ``pendings`` for their replies and send ``data``: their commands.

        A sync command (one pending) hears of failure by an exception
        (:class:`CommandTimeout`, :class:`ConnectionLost`); async ones
        through their callbacks.  The whole is bounded by the first
        command's deadline.
        """
        with self._counts_lock:
            for pending in pendings:
                self._counts[pending.command] += 1
        is_async = pendings[0].callback is not None
        deadline = pendings[0].deadline
        what = pendings[0].command if len(pendings) == 1 else f"{len(pendings)} commands"
        failure: QMPError | None = None
        if not conn.send_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            failure = CommandTimeout(pendings[0].command, pendings[0].timeout)
        else:
            try:
                with conn.lock:
                    failure = conn.dead
                    stuck = conn.stuck(time.monotonic()) if failure is None else None
                    if failure is None and stuck is None:
                        for pending in pendings:
                            conn.pending[pending.id] = pending
                        if conn.blocked and is_async:
                            conn.blocked = False
                            conn.wake()
                if stuck is not None:
                    failure = self._stuck_error(conn, stuck)
                    self._lost(conn, failure)
                elif failure is None:
                    try:
                        transport.send_all(conn.sock, data, deadline)
                    except TimeoutError:
                        sent = self._unregister(conn, pendings)
                        timeout = pendings[0].timeout
                        self._lost(
                            conn,
                            ConnectionLost(
                                f"sending {what!r} to {conn.peer}: not taken within "
                                f"{timeout:g} s (QEMU stopped?); a partial message is on the wire"
                            ),
                        )
                        for pending in sent:
                            pending.settle(None, CommandTimeout(pending.command, timeout))
                        if not is_async:
                            raise CommandTimeout(pendings[0].command, timeout) from None
                        return
                    except OSError as err:
                        self._lost(conn, ConnectionLost(f"sending {what!r} to {conn.peer}: {err}"))
                        return  # conn.fail settled them
            finally:
                conn.send_lock.release()
        if failure is None:
            return
        # Never registered: their slots go back here.
        for pending in pendings:
            pending.release()
            pending.take()
        if not is_async:
            if isinstance(failure, CommandTimeout):
                raise failure
            raise ConnectionLost(str(failure)) from failure
        for pending in pendings:
            pending.settle(None, failure)

    @staticmethod
    def _unregister(conn: _Connection, pendings: list[_Pending]) -> list[_Pending]:
        """Take ``pendings`` back out of ``conn`` (releasing their slots); the
        ones this caller settles."""
        mine: list[_Pending] = []
        for pending in pendings:
            got, answers = conn.pop(pending.id)
            if got is not None and answers:
                mine.append(got)
        return mine

    def _ready_connection(self) -> _Connection:
        """The live connection, reconnecting if need be (ConnectionLost if not)."""
        conn = self._conn
        if conn is not None and conn.dead is None:
            self._check_stuck(conn)  # (then reconnect below)
            if conn.dead is None:
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
            if self.closed:
                raise ConnectionLost("client is closed")
            now = time.monotonic()
            if now < self._next_attempt:
                raise ConnectionLost(f"connection to {describe_address(self.address)} lost")
            self._backoff = min(max(self._backoff * 2, 0.1), 2.0)
            self._next_attempt = now + self._backoff
            try:
                self._open(reconnecting=True)
            except ConnectError as err:
                raise ConnectionLost(f"reconnecting: {err}") from err
            self._backoff = self._next_attempt = 0.0
            log.warning("reconnected to %s (QEMU %s)", describe_address(self.address), self.version)
        self._reconnected()
        conn = self._conn
        if conn is None:
            raise ConnectionLost("client is closed")
        return conn

    # --- listening (QEMU connects to us) ----------------------------------------

    def _start_listening(self) -> None:
        listener = transport.listen_unix(self.address, group=self.listen_group)
        self._listener = listener
        threading.Thread(
            target=self._accept_loop, args=(listener,), name="qmp-acceptor", daemon=True
        ).start()
        log.info("listening on %s for QEMU", self.address)

    def _accept_loop(self, listener: transport.UnixListener) -> None:
        accepted = 0
        while True:
            with self._ready:
                while self._alive() and not self.closed:
                    self._ready.wait()
                if self.closed:
                    return
            try:
                sock = listener.accept(0.2)  # short, so that close() is noticed
            except OSError as err:
                if self.closed:
                    return
                log.warning("accepting on %s: %s", self.address, err)
                time.sleep(0.2)
                continue
            if sock is None:
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
            try:
                hook()
            except Exception:
                log.exception("reconnect hook failed")

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

    # --- connection ---------------------------------------------------------

    def _open(self, reconnecting: bool = False) -> None:
        sock = transport.connect(self.address, self.connect_timeout)
        self._adopt(sock, describe_address(self.address), reconnecting)

    def _adopt(self, sock: socket.socket, where: str, reconnecting: bool) -> None:
        """Greet and negotiate on a fresh socket; make it the connection."""
        try:
            decoder = JSONStreamDecoder()
            greeting = self._read_greeting(sock, decoder, where)
            sock.setblocking(False)  # sends are bounded: transport.send_all
            conn = _Connection(sock, decoder, where)
            conn.reader = threading.Thread(
                target=self._read_loop, args=(conn, greeting[1:]), name="qmp-reader", daemon=True
            )
            conn.reader.start()
            commands: Any = []
            if self.negotiate:
                try:
                    self._execute_on(conn, "qmp_capabilities", None, self.connect_timeout)
                    commands = self._execute_on(conn, "query-commands", None, self.connect_timeout)
                    if not isinstance(commands, list):
                        raise ProtocolError(f"query-commands returned {json.dumps(commands)[:80]}")
                except QMPError as err:
                    conn.fail(ConnectionLost(str(err)))
                    raise ConnectError(f"{where}: negotiating capabilities failed: {err}") from err
        except BaseException:
            sock.close()
            raise
        self.greeting = greeting[0]
        self.commands = frozenset(
            c["name"] for c in commands if isinstance(c, dict) and isinstance(c.get("name"), str)
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
                if not isinstance(messages[0].get("QMP"), dict):
                    raise ConnectError(
                        f"{where} does not speak QMP (first message {messages[0]!r:.100})"
                    )
                return messages

    def _read_loop(self, conn: _Connection, early: list[dict[str, Any]]) -> None:
        why: QMPError
        try:
            why = self._read(conn, early)
        except Exception as err:
            # Whatever went wrong, the stream can no longer be trusted.
            log.exception("QMP reader failed on %s", conn.peer)
            why = ConnectionLost(f"reading from {conn.peer}: internal error: {err!r}")
        try:
            self._lost(conn, why)
        finally:
            with conn.lock:
                conn.wake_r.close()
                conn.wake_w.close()

    def _read(self, conn: _Connection, early: list[dict[str, Any]]) -> QMPError:
        """Read and dispatch until the connection ends; why it ended."""
        for msg in early:
            self._dispatch(conn, msg)
        poller = select.poll()
        poller.register(conn.sock, select.POLLIN)
        poller.register(conn.wake_r, select.POLLIN)
        sock_fd = conn.sock.fileno()
        while True:
            wait, stuck = conn.expire(time.monotonic())
            if stuck is not None:
                return self._stuck_error(conn, stuck)
            if conn.dead is not None:
                return conn.dead
            try:
                ready = poller.poll(None if wait is None else max(1, math.ceil(wait * 1000)))
                if any(fd != sock_fd for fd, _ in ready):
                    conn.wake_r.recv(64)
                if not any(fd == sock_fd for fd, _ in ready):
                    continue  # deadlines to look at
                data = conn.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as err:
                return ConnectionLost(f"reading from {conn.peer}: {err}")
            if not data:
                return ConnectionLost(f"{conn.peer} closed the connection (QEMU gone?)")
            try:
                messages = conn.decoder.feed(data)
                for msg in messages:
                    self._dispatch(conn, msg)
            except ProtocolError as err:
                return ConnectionLost(f"{conn.peer}: protocol error: {err}")

    def _lost(self, conn: _Connection, why: QMPError) -> None:
        if conn.fail(why) and self._state is not State.CLOSED:
            log.error("QMP connection lost: %s", why)
        with self._state_lock:
            if self._conn is conn and self._state is State.READY:
                self._state = State.LOST
            self._ready.notify_all()

    def _dispatch(self, conn: _Connection, msg: dict[str, Any]) -> None:
        """Hand one message on.  Raises :class:`ProtocolError` for a reply
        that matches no command: the connection must go."""
        if "event" in msg:
            event = _event(msg)
            log.debug("event %s %s", event.name, event.data)
            for callback in list(self._subscribers):
                try:
                    callback(event)
                except Exception:
                    log.exception("event subscriber failed on %s", event.name)
            return
        if "return" not in msg and "error" not in msg:
            log.warning("ignoring unexpected QMP message: %.200s", json.dumps(msg))
            return
        if "id" not in msg:
            if "error" in msg:
                # QEMU's complaint about input it could not parse: every
                # command we send carries an id, so it answers none of them.
                log.warning("QEMU reported an error for no command: %.200s", json.dumps(msg))
                return
            raise ProtocolError(f"a reply without id: {json.dumps(msg)[:200]}")
        ident = msg["id"]
        pending: _Pending | None = None
        answers = False
        if isinstance(ident, int) and not isinstance(ident, bool):
            pending, answers = conn.pop(ident)
        if pending is None:
            raise ProtocolError(f"a reply to no command in flight: {json.dumps(msg)[:200]}")
        if not answers:
            log.info("late reply to %r (timed out) dropped", pending.command)
            return
        pending.settle(msg)


def _message(command: str, arguments: dict[str, Any] | None) -> dict[str, Any]:
    message: dict[str, Any] = {"execute": command}
    if arguments:
        message["arguments"] = arguments
    return message
